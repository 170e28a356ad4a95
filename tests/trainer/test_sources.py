"""Streaming sources and the streaming preflight: every file kind, compression, file:line in every
message, clear errors for what users get wrong. Real files on disk and, for s3://, the real S3
server of tests/trainer/test_storage.py."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import plan_data, preflight
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import FirstRecord, SourceFile, first_record, list_files, read_unit, units_of
from finetune_trainer.storage import open_store


def _lines(n: int, *, field: str = "text") -> list[str]:
    return [json.dumps({field: f"record number {i} " * (1 + i % 5)}) for i in range(n)]


def _spec(uri: str, **extra: Any) -> DatasetSpec:
    return DatasetSpec(train=[uri], **extra)


def _texts(uri: str, spec: DatasetSpec, *, unit_bytes: int | None = None) -> list[str]:
    files = list_files([uri])
    units = units_of(files, unit_bytes=unit_bytes)
    out = []
    for unit in units:
        store = open_store(unit.file.store_uri)
        out.extend(
            item.data[spec.text_field] for item in read_unit(unit, store, spec) if item.data is not None
        )
    return out


def test_jsonl_gzip_zstd_parquet_and_txt_give_the_same_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = _lines(50)
    text = "\n".join(lines) + "\n"
    (tmp_path / "plain.jsonl").write_text(text)
    (tmp_path / "gz.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    table = pa.table({"text": [json.loads(line)["text"] for line in lines], "other": list(range(50))})
    pq.write_table(table, tmp_path / "table.parquet", row_group_size=7)
    expected = [json.loads(line)["text"] for line in lines]
    spec = _spec(f"file://{tmp_path}/*")
    for name in ["plain.jsonl", "gz.jsonl.gz", "zst.jsonl.zst", "table.parquet"]:
        assert _texts(f"file://{tmp_path}/{name}", spec) == expected, name
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("a whole document\nover two lines\n")
    assert _texts(f"file://{tmp_path}/docs", spec) == ["a whole document\nover two lines\n"]


def test_a_large_file_is_cut_into_units_that_keep_every_line_once(tmp_path: Path) -> None:
    lines = _lines(997)
    lines[500] = ""  # a blank line inside
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    uri = f"file://{tmp_path}/big.jsonl"
    units = units_of(list_files([uri]), unit_bytes=1000)
    assert len(units) > 10
    expected = [json.loads(line)["text"] for line in lines if line]
    assert _texts(uri, _spec(uri), unit_bytes=1000) == expected


def test_preflight_streams_every_bad_record_with_file_and_line_across_units(tmp_path: Path) -> None:
    lines = _lines(3000)
    bad = {7: "{not json", 1500: json.dumps({"text": 3}), 2999: json.dumps({"txt": "x"})}
    for number, line in bad.items():
        lines[number - 1] = line
    for i in range(100, 130):  # 30 more bad ones: the report shows 20, counts all
        lines[i - 1] = json.dumps({"text": ""})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    files = list_files([f"file://{path}"])
    import finetune_trainer.sources as sources

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "UNIT_BYTES", 2048)  # many units: line numbers must still be exact
        with pytest.raises(InvalidData) as caught:
            preflight(files, _spec(f"file://{path}"))
    message = str(caught.value)
    assert "33 bad record(s) (13 not shown)" in message
    details = caught.value.details
    assert len(details) == 20
    assert details[0] == f"file://{path}:7: invalid JSON (Expecting property name enclosed in double quotes)"
    assert details[1].startswith(f"file://{path}:100: field 'text' is empty")


def test_preflight_counts_the_records_of_each_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(_lines(5)) + "\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(_lines(3)) + "\n").encode()))
    plan = plan_data(_spec(f"file://{tmp_path}/*"), seed=0)
    report = preflight(plan.train_files, _spec(f"file://{tmp_path}/*"))
    assert report.records == {f"file://{tmp_path}/a.jsonl": 5, f"file://{tmp_path}/b.jsonl.gz": 3}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("data.jsonl.bz2", b"x", "compression 'bz2' is not supported", id="unknown-compression"),
        pytest.param("data.jsonl.gz", b"{}", "named .gz but is not gzip data", id="gz-not-gzip"),
        pytest.param(
            "data.jsonl",
            gzip.compress(b'{"text": "a"}\n'),
            "is gzip-compressed data; name it .gz",
            id="gzip-unnamed",
        ),
    ],
)
def test_compression_mistakes_name_the_file(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    (tmp_path / name).write_bytes(content)
    uri = f"file://{tmp_path}/{name}"
    with pytest.raises(InvalidData) as caught:
        files = list_files([uri])
        preflight(files, _spec(uri))
    assert f"file://{tmp_path}/{name}" in str(caught.value) + " ".join(caught.value.details)
    assert expected in str(caught.value) + " ".join(caught.value.details)


def test_parquet_without_the_text_field_names_field_setting_and_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    uri = f"file://{tmp_path}/t.parquet"
    with pytest.raises(InvalidData) as caught:
        preflight(list_files([uri]), _spec(uri))
    assert caught.value.details == [
        f"{uri}: no column 'text' (dataset.textField); the file has columns ['body']"
    ]
    # the same file read with the right field name is fine
    assert preflight(list_files([uri]), _spec(uri, text_field="body")).total == 2


def test_parquet_bad_rows_are_reported_by_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", "", "also fine"]}), tmp_path / "t.parquet")
    uri = f"file://{tmp_path}/t.parquet"
    with pytest.raises(InvalidData) as caught:
        preflight(list_files([uri]), _spec(uri))
    assert caught.value.details == [f"{uri}:row 2: field 'text' is empty"]


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _parquet(path: Path, **columns: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_first_record_of_every_kind_reads_only_its_start(tmp_path: Path) -> None:
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    (tmp_path / "a.jsonl").write_text("\n\n" + chat + "\n{not json\n")  # the bad line 4 is never read
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q", "completion": "a"}\n'))
    (tmp_path / "c.jsonl.zst").write_bytes(_zst(b'\n{"text": "x", "id": 1}\n'))
    (tmp_path / "d.jsonl.zstd").write_bytes(_zst(b'{"text": "x"}\n'))
    _parquet(tmp_path / "e.parquet", id=[1, 2], text=["a", "b"])
    (tmp_path / "f.txt").write_text("a document")
    found = {
        f.name.rsplit("/", 1)[1]: first_record(f, open_store(f.store_uri))
        for f in list_files([f"file://{tmp_path}"])
    }
    base = f"file://{tmp_path}"
    assert found == {
        "a.jsonl": FirstRecord("jsonl", f"{base}/a.jsonl:3", ("messages",)),
        "b.jsonl.gz": FirstRecord("jsonl", f"{base}/b.jsonl.gz:1", ("prompt", "completion")),
        "c.jsonl.zst": FirstRecord("jsonl", f"{base}/c.jsonl.zst:2", ("text", "id")),
        "d.jsonl.zstd": FirstRecord("jsonl", f"{base}/d.jsonl.zstd:1", ("text",)),
        "e.parquet": FirstRecord("parquet", f"{base}/e.parquet:row 1", ("id", "text")),
        "f.txt": FirstRecord("txt", f"{base}/f.txt", ()),
    }


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("t.jsonl", b"\n{oops\n", "t.jsonl:2: invalid JSON", id="bad-json"),
        pytest.param(
            "t.jsonl", b"[1, 2]\n", "t.jsonl:1: a record must be a JSON object, got an array", id="array"
        ),
        pytest.param(
            "t.jsonl",
            b"\n \n",
            "t.jsonl: no records: the file is empty or holds only blank lines",
            id="empty",
        ),
        pytest.param(
            "t.jsonl.gz", b'{"text": "x"}\n', "t.jsonl.gz: named .gz but is not gzip data", id="not-gzip"
        ),
        pytest.param(
            "t.jsonl.zst", gzip.compress(b"{}"), "t.jsonl.zst: named .zst but is not Zstandard", id="not-zstd"
        ),
        pytest.param("t.jsonl.xz", b"x", "t.jsonl.xz: compression 'xz' is not supported; use JSONL", id="xz"),
        pytest.param("t.parquet", b"PAR1 not really", "t.parquet: not a Parquet file", id="not-parquet"),
    ],
)
def test_first_record_names_the_file_and_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    (tmp_path / name).write_bytes(content)
    file = SourceFile(f"file://{tmp_path}/", name, len(content), "v")
    with pytest.raises(InvalidData, match=re.escape(f"file://{tmp_path}/{expected}")):
        first_record(file, open_store(file.store_uri))


def test_an_empty_parquet_file_has_no_records(tmp_path: Path) -> None:
    import pyarrow as pa

    _parquet(tmp_path / "t.parquet", text=pa.array([], pa.string()))
    (file,) = list_files([f"file://{tmp_path}/t.parquet"])
    with pytest.raises(
        InvalidData, match=re.escape(f"{file.name}: no records: the Parquet file has no rows")
    ):
        first_record(file, open_store(file.store_uri))
    with pytest.raises(InvalidData) as caught:
        preflight([file], _spec(file.name))
    assert caught.value.details == [f"{file.name}: no records: the Parquet file has no rows"]


# ---- kubectl finetune add dataset: the same streaming preflight, records and tokens per split -------
def _add_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """Run the real `kubectl finetune add dataset` in this process (a file:// registry, no cluster)."""
    from rich.console import Console

    from finetune_cli.main import run

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # so the cluster's defaults are not read
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache, never the user's
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    code = run(
        ["add", "dataset", "--datasets-uri", f"file://{tmp_path}/registry/", *args],
        console=Console(file=out, width=300, soft_wrap=True),
    )
    return code, out.getvalue(), err.getvalue()


def test_add_dataset_counts_the_tokens_the_shards_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    from finetune_trainer.data import ShardSettings, shards_for
    from finetune_trainer.models import load_tokenizer

    train = tmp_path / "train.jsonl.gz"
    train.write_bytes(gzip.compress(("\n".join(_lines(120)) + "\n").encode()))
    (tmp_path / "eval.jsonl").write_text("\n".join(_lines(9)) + "\n")
    code, out, err = _add_dataset(
        tmp_path,
        monkeypatch,
        "--name",
        "news",
        "--paths",
        str(train),
        "--eval-paths",
        str(tmp_path / "eval.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
    )
    assert code == 0, err
    spec = DatasetSpec(train=[f"file://{train}"])
    expected = {}
    for split, uri in (("train", f"file://{train}"), ("eval", f"file://{tmp_path}/eval.jsonl")):
        made = shards_for(
            list_files([uri]),
            spec,
            load_tokenizer(tokenizer_dir),
            ShardSettings(local_root=tmp_path / f"shards-{split}", remote_uri=None, workers=1),
        )
        expected[split] = made.tokens
    assert (
        f"120 train records ({expected['train']:,} tokens), 9 eval records ({expected['eval']:,} tokens)"
        in out
    )
    metadata = json.loads((tmp_path / "registry" / "news" / "dataset.json").read_text())
    assert (metadata["trainTokens"], metadata["evalTokens"]) == (expected["train"], expected["eval"])
    assert (tmp_path / "registry" / "news" / "train" / "train.jsonl.gz").read_bytes() == train.read_bytes()
    # the registered dataset is what the trainer reads for dataset.name
    plan = plan_data(DatasetSpec(name="news"), seed=0, datasets_uri=f"file://{tmp_path}/registry/")
    assert preflight(plan.train_files, DatasetSpec(name="news")).total == 120


def test_add_dataset_says_why_tokens_are_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train.jsonl").write_text("\n".join(_lines(5)) + "\n")
    code, out, err = _add_dataset(
        tmp_path, monkeypatch, "--name", "gguf", "--paths", str(tmp_path / "train.jsonl")
    )
    assert code == 0, err
    assert "5 train records (eval: evalSize records held out)" in out
    assert "tokens not counted: smollm2-135m-instruct's tokenizer is inside its GGUF file" in out
    code, out, err = _add_dataset(
        tmp_path,
        monkeypatch,
        "--name",
        "hub",
        "--paths",
        str(tmp_path / "train.jsonl"),
        "--tokenizer",
        "pythia-70m",
    )
    assert code == 0, err
    assert (
        f"tokens not counted: pythia-70m (hf://EleutherAI/pythia-70m) is not in the local Hugging Face cache ({tmp_path}/hub)"
        in out
    )
    metadata = json.loads((tmp_path / "registry" / "hub" / "dataset.json").read_text())
    assert metadata["trainTokens"] is None and metadata["tokenizer"].startswith("tokens not counted")


def test_add_dataset_reads_a_catalog_tokenizer_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    import shutil

    snapshot = tmp_path / "hub" / "models--EleutherAI--pythia-70m" / "snapshots" / "abc123"
    shutil.copytree(tokenizer_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (tmp_path / "train.jsonl").write_text("\n".join(_lines(5)) + "\n")
    code, out, err = _add_dataset(
        tmp_path,
        monkeypatch,
        "--name",
        "hub",
        "--paths",
        str(tmp_path / "train.jsonl"),
        "--tokenizer",
        "pythia-70m",
    )
    assert code == 0, err
    assert f"tokens counted with pythia-70m ({snapshot}/tokenizer.json)" in out


def test_add_dataset_reports_bad_records_by_file_and_line_and_uploads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    lines = _lines(60)
    for i in range(5, 60, 2):  # 28 bad records: more than are shown
        lines[i] = json.dumps({"text": ""})
    lines[3] = "{oops"
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = _add_dataset(
        tmp_path,
        monkeypatch,
        "--name",
        "bad",
        "--paths",
        str(tmp_path / "train.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
    )
    assert code == 1
    assert "29 record(s) the trainer would reject (9 more not shown)" in err
    assert f"file://{tmp_path}/train.jsonl:4: invalid JSON" in err
    assert f"file://{tmp_path}/train.jsonl:6: field 'text' is empty" in err
    assert err.count("field 'text' is empty") == 19  # the first 20 problems are shown
    assert not (tmp_path / "registry" / "bad").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param("t.jsonl.gz", b'{"text": "x"}\n', "named .gz but is not gzip data", id="not-gzip"),
        pytest.param(
            "t.jsonl",
            gzip.compress(b'{"text": "x"}\n'),
            "is gzip-compressed data; name it .gz",
            id="gzip-unnamed",
        ),
        pytest.param("t.jsonl", b"\n\n", "t.jsonl: no records", id="no-records"),
        pytest.param("t.jsonl", b'{"body": "x"}\n', "t.jsonl:1: cannot tell the format", id="unknown-format"),
        pytest.param(
            "t.jsonl.zst",
            b'{"text": "x"}\n',
            "t.jsonl.zst: named .zst but is not Zstandard data",
            id="not-zstd",
        ),
        pytest.param(
            "t.jsonl.lz4", b"x", "t.jsonl.lz4: compression 'lz4' is not supported; use JSONL", id="lz4"
        ),
    ],
)
def test_add_dataset_names_the_file_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    code, _, err = _add_dataset(tmp_path, monkeypatch, "--name", "x", "--paths", str(tmp_path / name))
    assert code == 1 and message in err, err
    assert not (tmp_path / "registry" / "x").exists()


def test_add_dataset_reads_parquet_and_zstd_and_counts_their_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    from finetune_trainer.models import load_tokenizer

    texts = [json.loads(line)["text"] for line in _lines(40)]
    _parquet(tmp_path / "train.parquet", id=list(range(40)), text=texts)
    (tmp_path / "eval.jsonl.zst").write_bytes(_zst(("\n".join(_lines(6)) + "\n").encode()))
    code, out, err = _add_dataset(
        tmp_path,
        monkeypatch,
        "--name",
        "mixed",
        "--paths",
        str(tmp_path / "train.parquet"),
        "--eval-paths",
        str(tmp_path / "eval.jsonl.zst"),
        "--tokenizer",
        str(tokenizer_dir),
    )
    assert code == 0, err
    tokenizer = load_tokenizer(tokenizer_dir)
    train = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # every document with its EOS
    evaluation = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts[:6])
    assert f"text, 40 train records ({train:,} tokens), 6 eval records ({evaluation:,} tokens)" in out


def test_add_dataset_parquet_without_the_text_column_says_what_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _parquet(tmp_path / "t.parquet", body=["a", "b"])
    code, _, err = _add_dataset(tmp_path, monkeypatch, "--name", "x", "--paths", str(tmp_path / "t.parquet"))
    assert code == 1
    assert f"file://{tmp_path}/t.parquet:row 1: cannot tell the format from the columns ['body']" in err
    code, _, err = _add_dataset(
        tmp_path, monkeypatch, "--name", "x", "--paths", str(tmp_path / "t.parquet"), "--format", "text"
    )
    assert code == 1
    assert (
        f"file://{tmp_path}/t.parquet: no column 'text' (dataset.textField); the file has columns ['body']"
        in err
    )
    assert not (tmp_path / "registry" / "x").exists()


def test_add_dataset_lists_every_file_kind_in_a_folder_and_refuses_unreadable_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl.zstd").write_bytes(_zst(("\n".join(_lines(3)) + "\n").encode()))
    _parquet(data / "b.parquet", text=["x", "y"])
    (data / "c.txt.gz").write_bytes(gzip.compress(b"a text document"))
    (data / "README.md").write_text("not data: not listed")
    code, out, err = _add_dataset(tmp_path, monkeypatch, "--name", "folder", "--paths", str(data))
    assert code == 0, err
    assert "text, 6 train records" in out and "3 file(s)" in out
    (data / "d.jsonl.bz2").write_bytes(b"x")
    code, _, err = _add_dataset(tmp_path, monkeypatch, "--name", "folder2", "--paths", str(data))
    assert code == 1
    assert (
        "1 file(s) the trainer cannot read" in err and f"file://{data}/d.jsonl.bz2: compression 'bz2'" in err
    )
