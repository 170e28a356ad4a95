"""Streaming sources and the streaming preflight: every file kind, compression, file:line in every
message, clear errors for what users get wrong. Real files on disk and, for s3://, the real S3
server of tests/trainer/test_storage.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import parse_file, plan_data, preflight
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import list_files, read_unit, units_of
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
        out.extend(item.data[spec.text_field] for item in read_unit(unit, store, spec) if item.data is not None)
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
        pytest.param("data.jsonl", gzip.compress(b'{"text": "a"}\n'), "is gzip-compressed data; name it .gz", id="gzip-unnamed"),
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


def test_parse_file_the_cli_uses_reads_compressed_uploads() -> None:
    errors: list[str] = []
    content = gzip.compress(b'{"text": "one"}\n\n{"text": 2}\n')
    records = parse_file("up.jsonl.gz", content, DatasetSpec(name="d"), errors)
    assert [r.data["text"] for r in records] == ["one"]
    assert errors == ["up.jsonl.gz:3: field 'text' must be a string, got int"]
