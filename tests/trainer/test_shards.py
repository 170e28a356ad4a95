"""Token shards: the tokens and loss masks computed from the tokenizer directly, in parallel and split over nodes,
cached complete-or-absent in object storage and reused; clear errors. Real files, real worker
processes, the tiny real tokenizer of factories."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finetune_trainer import shards
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import ShardSettings, plan_data, shards_for, token_dataset
from finetune_trainer.errors import InvalidData
from finetune_trainer.shards import TokenStore, build_shards, token_dtype
from finetune_trainer.sources import list_files
from tests.trainer.conftest import s3_root
from tests.trainer.factories import make_tokenizer, reference_document


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _records(fmt: str, n: int) -> list[dict[str, Any]]:
    words = [
        "the",
        "market",
        "rose",
        "and",
        "the",
        "shares",
        "fell",
        "while",
        "the",
        "bank",
        "said",
        "profit",
    ]
    out: list[dict[str, Any]] = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(1 + (i * 7) % 23))
        if fmt == "text":
            out.append({"text": text})
        elif fmt == "prompt-completion":
            out.append({"prompt": f"question {i}", "completion": text})
        else:
            out.append(
                {"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": text}]}
            )
    return out


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _documents(store: TokenStore) -> list[tuple[list[int], list[int]]]:
    out = []
    for d in range(store.documents):
        ids, mask = store.span(int(store.doc_starts[d]), int(store.doc_starts[d + 1]))
        labels = ids if mask is None else np.where(mask, ids, -100)
        out.append((ids.tolist(), labels.tolist()))
    return out


def _settings(tmp_path: Path, name: str = "local", **extra: Any) -> ShardSettings:
    return ShardSettings(local_root=tmp_path / name, remote_uri=f"file://{tmp_path}/remote/", **extra)


@pytest.mark.parametrize("fmt", ["text", "prompt-completion", "chat"])
def test_shards_hold_the_tokens_and_loss_masks_the_tokenizer_gives(
    tmp_path: Path, tokenizer: Any, fmt: str
) -> None:
    _write(tmp_path / "data" / "a.jsonl", _records(fmt, 40))
    _write(tmp_path / "data" / "b.jsonl", _records(fmt, 25))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/*.jsonl"], format=fmt)  # type: ignore[arg-type]
    shard_set = shards_for(list_files(spec.train or []), spec, tokenizer, _settings(tmp_path, workers=2))
    store = TokenStore(shard_set)
    assert store.dtype == np.uint16  # 384 tokens need more than 8 bits
    assert store.masked == (fmt != "text")
    expected = [reference_document(r, spec, tokenizer) for r in [*_records(fmt, 40), *_records(fmt, 25)]]
    assert _documents(store) == expected
    assert shard_set.manifest["documents"] == 65


def test_parallel_units_give_the_same_shards_as_one_process(tmp_path: Path, tokenizer: Any) -> None:
    _write(tmp_path / "data" / "big.jsonl", _records("text", 600))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/big.jsonl"])
    files = list_files(spec.train or [])
    one = build_shards(files, spec, tokenizer, key="k", local_root=tmp_path / "one", remote=None, workers=1)
    many = build_shards(
        files, spec, tokenizer, key="k", local_root=tmp_path / "many", remote=None, workers=2, unit_bytes=4096
    )
    assert len(many.manifest["parts"]) > 4
    assert _documents(TokenStore(one)) == _documents(TokenStore(many))


def test_the_cached_set_is_reused_by_a_restart_other_lengths_and_packing(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "data" / "a.jsonl", _records("text", 100))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/a.jsonl"], eval_size=5)
    plan = plan_data(spec, seed=3)
    first = token_dataset(
        plan, spec, tokenizer, split="train", length=32, settings=_settings(tmp_path, "node-a")
    )
    remote_files = sorted(p.name for p in (tmp_path / "remote").rglob("*") if p.is_file())
    assert remote_files == ["manifest.json", "part-00000.docs", "part-00000.ids"]

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(shards, "tokenize_units", no_tokenizing)
    # a fresh node (empty local cache), another sequence length and packing mode: downloaded
    other = DatasetSpec(train=spec.train, eval_size=5, packing_strategy="documents")
    again = token_dataset(
        plan, other, tokenizer, split="train", length=64, settings=_settings(tmp_path, "node-b")
    )
    assert again.documents == first.documents == 95
    assert again.total_tokens() == first.total_tokens()


def test_bad_records_publish_nothing(tmp_path: Path, tokenizer: Any) -> None:
    records = _records("text", 30)
    path = _write(tmp_path / "data" / "a.jsonl", records)
    lines = path.read_text().splitlines()
    lines[11] = json.dumps({"text": ""})
    path.write_text("\n".join(lines) + "\n")
    spec = DatasetSpec(train=[f"file://{path}"])
    with pytest.raises(InvalidData) as caught:
        shards_for(list_files(spec.train or []), spec, tokenizer, _settings(tmp_path))
    assert caught.value.details == [f"file://{path}:12: field 'text' is empty"]
    assert not list((tmp_path / "remote").rglob("manifest.json"))
    assert not list((tmp_path / "local").rglob("manifest.json"))


def _node(args: tuple[Path, int, Any, DatasetSpec, Any]) -> Any:
    tmp_path, rank, tokenizer, spec, queue = args
    files = list_files(spec.train or [])
    try:
        result = build_shards(
            files,
            spec,
            tokenizer,
            key="k",
            local_root=tmp_path / f"node-{rank}",
            remote=_settings(tmp_path).remote(),
            node_rank=rank,
            nodes=2,
            workers=1,
            unit_bytes=2048,
        )
        queue.put((rank, result.manifest, None))
    except InvalidData as exc:
        queue.put((rank, None, (str(exc), exc.details)))


def _run_nodes(tmp_path: Path, tokenizer: Any, spec: DatasetSpec) -> dict[int, Any]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [
        context.Process(target=_node, args=((tmp_path, r, tokenizer, spec, queue),)) for r in range(2)
    ]
    for p in processes:
        p.start()
    results = {}
    for _ in processes:
        rank, manifest, error = queue.get(timeout=120)
        results[rank] = (manifest, error)
    for p in processes:
        p.join(30)
    return results


def test_two_nodes_split_the_units_and_both_get_the_whole_set(tmp_path: Path, tokenizer: Any) -> None:
    _write(tmp_path / "data" / "a.jsonl", _records("text", 400))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/a.jsonl"])
    results = _run_nodes(tmp_path, tokenizer, spec)
    assert results[0][1] is None and results[1][1] is None
    assert results[0][0] == results[1][0]
    node_records = {
        r: json.loads((tmp_path / "remote" / "k" / f"node-{r}.json").read_text()) for r in range(2)
    }
    assert [p["index"] % 2 for p in node_records[0]["parts"]] == [0] * len(node_records[0]["parts"])
    assert [p["index"] % 2 for p in node_records[1]["parts"]] == [1] * len(node_records[1]["parts"])
    alone = build_shards(
        list_files(spec.train or []), spec, tokenizer, key="k", local_root=tmp_path / "alone", remote=None
    )
    expected = _documents(TokenStore(alone))
    for r in range(2):
        assert (
            _documents(TokenStore(shards.ShardSet(tmp_path / f"node-{r}" / "k", results[r][0]))) == expected
        )


def test_a_bad_record_on_one_node_fails_every_node_with_its_line(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path / "data" / "a.jsonl", _records("text", 400))
    lines = path.read_text().splitlines()
    lines[-1] = "{oops"  # in the last unit; which node has it depends on the unit count
    path.write_text("\n".join(lines) + "\n")
    spec = DatasetSpec(train=[f"file://{path}"])
    results = _run_nodes(tmp_path, tokenizer, spec)
    for r in range(2):
        manifest, error = results[r]
        assert manifest is None
        assert error[1] == [
            f"file://{path}:400: invalid JSON (Expecting property name enclosed in double quotes)"
        ]
    assert not (tmp_path / "remote" / "k" / "manifest.json").exists()


def test_token_dtype_is_the_narrowest_that_holds_the_vocabulary() -> None:
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(InvalidData, match=r"a vocabulary of 4294967297 tokens does not fit 32-bit token ids"):
        token_dtype(2**32 + 1)


class _ShortVocabulary:
    """A tokenizer that produces ids beyond the size it reports (a broken vocabulary)."""

    def __init__(self, inner: Any, size: int) -> None:
        self.inner = inner
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def test_ids_that_do_not_fit_the_dtype_are_an_error(tmp_path: Path, tokenizer: Any) -> None:
    _write(tmp_path / "data" / "a.jsonl", _records("text", 5))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/a.jsonl"])
    with pytest.raises(
        InvalidData, match=r"token id \d+ does not fit the uint8 token shards .* of 256 tokens"
    ):
        build_shards(
            list_files(spec.train or []),
            spec,
            _ShortVocabulary(tokenizer, 256),
            key="k",
            local_root=tmp_path / "l",
            remote=None,
        )


def test_a_corpus_without_records_names_its_files(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blank.jsonl").write_text("\n\n  \n")
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/blank.jsonl"])
    with pytest.raises(InvalidData) as caught:
        shards_for(list_files(spec.train or []), spec, tokenizer, _settings(tmp_path))
    assert caught.value.details == [
        f"file://{tmp_path}/data/blank.jsonl: no records: the file is empty or holds only blank lines "
        "(JSONL is one JSON object per line)"
    ]


def test_s3_sources_stream_by_range_and_the_cache_lives_in_s3(
    tmp_path: Path, tokenizer: Any, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer.storage import open_store

    root = s3_root(s3_server)
    store = open_store(root, endpoint=s3_server)
    try:
        local = _write(tmp_path / "data" / "a.jsonl", _records("text", 300))
        store.upload_file(local, "data/a.jsonl")
        import gzip

        store.write_bytes("data/b.jsonl.gz", gzip.compress(local.read_bytes()))
        spec = DatasetSpec(train=[root + "data/*"])
        files = list_files(spec.train or [], endpoint=s3_server)
        assert [f.version for f in files] and all(f.version for f in files)  # ETags
        settings = ShardSettings(
            local_root=tmp_path / "node-a", remote_uri=root + "tokens/", workers=2, endpoint=s3_server
        )
        monkeypatch.setattr("finetune_trainer.sources.UNIT_BYTES", 4096)  # ranged reads of one object
        first = shards_for(files, spec, tokenizer, settings)
        assert len(first.manifest["parts"]) > 3
        expected = build_shards(
            list_files([f"file://{local}", f"file://{local}"]),
            spec,
            tokenizer,
            key="k",
            local_root=tmp_path / "ref",
            remote=None,
        )
        assert _documents(TokenStore(first)) == _documents(TokenStore(expected))
        assert store.exists(f"tokens/{first.manifest['key']}/manifest.json")

        monkeypatch.setattr(
            shards, "tokenize_units", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again"))
        )
        other = ShardSettings(local_root=tmp_path / "node-b", remote_uri=root + "tokens/", endpoint=s3_server)
        again = shards_for(files, spec, tokenizer, other)
        assert _documents(TokenStore(again)) == _documents(TokenStore(expected))
    finally:
        store.delete_prefix("")


@pytest.mark.timeout(180)  # a hang fails here, not at the suite's 900 s
def test_a_trainer_that_survives_sigterm_does_not_hang_the_tokenizer_pool(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer handles SIGTERM by checkpointing at the step end, so it does not exit; forked
    tokenizer workers inherit that handler. Both a finished pool and a pool stopped by a worker's
    error must still end, even when the error comes before a worker has set itself up (every
    worker but the first starts 2 s late here: that race once hung CI for its 900 s timeout)."""
    import os
    import signal
    import time

    first_worker = tmp_path / "first-worker"
    set_up = shards._init_worker

    def late_but_first(job: Any) -> None:
        try:
            os.close(os.open(first_worker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(2)  # still holding the trainer's handler when the pool is terminated
        set_up(job)

    monkeypatch.setattr(shards, "_init_worker", late_but_first)
    _write(tmp_path / "data" / "big.jsonl", _records("text", 300))
    spec = DatasetSpec(train=[f"file://{tmp_path}/data/big.jsonl"])
    files = list_files(spec.train or [])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        done = build_shards(
            files,
            spec,
            tokenizer,
            key="k",
            local_root=tmp_path / "ok",
            remote=None,
            workers=2,
            unit_bytes=2048,
        )
        assert done.manifest["documents"] == 300
        first_worker.unlink()
        with pytest.raises(InvalidData, match="does not fit the uint8 token shards"):
            build_shards(
                files,
                spec,
                _ShortVocabulary(tokenizer, 256),
                key="k",
                local_root=tmp_path / "bad",
                remote=None,
                workers=2,
                unit_bytes=2048,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
