"""Storage behind one interface: the same tests for file:// and for s3://.

The s3:// cases run against a real S3-compatible server: the `s3_server` fixture of
tests/trainer/conftest.py (FINETUNE_TEST_S3_ENDPOINT if set, otherwise the local cluster's
versitygw).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from finetune_trainer import checkpoints as ckpt
from finetune_trainer.storage import expand, open_store
from tests.trainer.conftest import base_config, final_eval, run_trainer, s3_root


@pytest.fixture(params=[pytest.param("file", id="file"), pytest.param("s3", id="s3")])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/store/"
        return
    server: str = request.getfixturevalue("s3_server")
    uri = s3_root(server)
    yield uri
    open_store(uri, endpoint=server).delete_prefix("")


@pytest.fixture
def endpoint(root: str, request: pytest.FixtureRequest) -> str | None:
    """The S3 endpoint for an s3:// `root` (None for file://)."""
    return str(request.getfixturevalue("s3_server")) if root.startswith("s3://") else None


def test_write_read_list_delete(root: str, endpoint: str | None, tmp_path: Path) -> None:
    store = open_store(root, endpoint=endpoint)
    store.write_bytes("a/one.json", b"1")
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(9 * 1024 * 1024))  # above the multipart threshold
    store.upload_file(local, "a/b/big.bin")
    assert [(o.key, o.size) for o in store.list("a")] == [("a/b/big.bin", 9 * 1024 * 1024), ("a/one.json", 1)]
    assert store.read_bytes("a/one.json") == b"1" and store.exists("a/one.json")
    store.download_file("a/b/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert store.list("a/o") == []  # a prefix names a folder or one object, not a name prefix
    store.delete_prefix("a/b")
    assert [o.key for o in store.list("a")] == ["a/one.json"]


def test_globs(root: str, endpoint: str | None) -> None:
    store = open_store(root, endpoint=endpoint)
    for key in ("data/train-1.jsonl", "data/train-2.jsonl", "data/eval.jsonl", "data/sub/train-3.jsonl"):
        store.write_bytes(key, b"{}\n")
    assert [s.uri + o.key for s, o in expand(root + "data/train-*.jsonl", endpoint=endpoint)] == [
        root + "data/train-1.jsonl",
        root + "data/train-2.jsonl",
    ]
    assert len(expand(root + "data/**/train-*.jsonl", endpoint=endpoint)) == 3
    assert len(expand(root + "data/", endpoint=endpoint)) == 4


def test_checkpoint_manifest_is_written_last_and_retention_keeps_k(
    root: str, endpoint: str | None, tmp_path: Path
) -> None:
    store = open_store(root, endpoint=endpoint)
    uploaded: list[int] = []
    uploader = ckpt.Uploader(store, keep_last=2, on_complete=lambda m, s: uploaded.append(m["step"]))
    uploader.start()
    for step in (1, 2, 3):
        local = tmp_path / f"checkpoint-{step}"
        local.mkdir()
        (local / "model.safetensors").write_bytes(os.urandom(1000))
        uploader.submit(local, step, {"evalLoss": 1.0 / step}, remove_after=True)
    uploader.wait()
    uploader.close()
    assert uploaded == [1, 2, 3]
    manifests = ckpt.list_complete(store)
    assert [m["step"] for m in manifests] == [2, 3]
    assert not store.list("checkpoints/step-000001")
    # a checkpoint folder without its manifest does not count
    store.write_bytes("checkpoints/step-000009/model.safetensors", b"partial")
    assert [m["step"] for m in ckpt.list_complete(store)] == [2, 3]
    back = ckpt.download_checkpoint(store, manifests[-1], tmp_path / "restored")
    assert (back / "model.safetensors").stat().st_size == 1000


def test_a_failed_upload_is_counted_and_raised_on_the_next_call(tmp_path: Path) -> None:
    from finetune_trainer.telemetry import Metrics

    metrics = Metrics()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the store's root is a file: every write fails
    uploader = ckpt.Uploader(
        open_store(f"file://{blocker}/store/"), keep_last=1, on_complete=lambda m, s: None,
        on_failure=lambda _: metrics.checkpoint_upload_failures.inc(),
    )  # fmt: skip
    uploader.start()
    local = tmp_path / "checkpoint-1"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"weights")
    uploader.submit(local, 1, {}, remove_after=False)
    with pytest.raises(RuntimeError, match="checkpoint upload failed"):
        uploader.wait()
    assert metrics.registry.get_sample_value("finetune_checkpoint_upload_failures_total") == 1


def test_model_data_and_run_folder_on_s3_with_resume(
    s3_server: str, model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    root = s3_root(s3_server)
    store = open_store(root, endpoint=s3_server)
    try:
        ckpt.upload_folder(
            store, model_dir("gpt2"), "models/tiny-gpt2/", step=0, metrics={}
        )  # with a manifest
        for split in ("train", "eval"):
            store.upload_file(Path(text_data[split][len("file://") :]), f"data/{split}.jsonl")
        data = {"train": root + "data/train*.jsonl", "eval": root + "data/eval.jsonl"}
        model = Path("/unused")
        common = {"run": {"storageEndpoint": s3_server}, "model": {"uri": root + "models/tiny-gpt2/"}}
        first = base_config(
            model,
            data,
            tmp_path,
            hyperparameters={"maxSteps": 2},
            checkpoints={"everySteps": 2, "outputUri": root + "run/"},
            **common,
        )
        assert run_trainer(first, tmp_path, "first.json")[0] == 0
        second = base_config(
            model,
            data,
            tmp_path,
            hyperparameters={"maxSteps": 4},
            checkpoints={"everySteps": 2, "outputUri": root + "run/"},
            **common,
        )
        code, summary = run_trainer(second, tmp_path, "second.json")
        assert code == 0 and final_eval(summary)["step"] == 4
        assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
        assert json.loads(store.read_bytes("run/final/manifest.json"))["step"] == 4
        assert store.exists("run/run.json") and store.exists("run/metrics.jsonl")
        assert [m["step"] for m in ckpt.list_complete(open_store(root + "run/", endpoint=s3_server))] == [
            2,
            4,
        ]
    finally:
        store.delete_prefix("")
