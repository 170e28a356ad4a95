"""Storage behind one interface: the same tests for file:// and for s3://.

The s3:// cases run against a real S3-compatible server: FINETUNE_TEST_S3_ENDPOINT with
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY if set, otherwise the local cluster's versitygw (the
session's `cluster` fixture, started on first use). FINETUNE_TEST_S3_BUCKET (default
finetune-test) is created if missing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from finetune_trainer import checkpoints as ckpt
from finetune_trainer.storage import Store, expand, open_store
from tests.trainer.conftest import base_config, final_eval, run_trainer

S3_ENDPOINT: str | None = os.environ.get("FINETUNE_TEST_S3_ENDPOINT")
S3_BUCKET = os.environ.get("FINETUNE_TEST_S3_BUCKET", "finetune-test")


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The endpoint of a real S3 server, with its credentials in the environment (as in a pod)."""
    global S3_ENDPOINT
    if S3_ENDPOINT:
        yield S3_ENDPOINT
        return
    cluster = request.getfixturevalue("cluster")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            if key.startswith("AWS_"):
                patch.setenv(key, value)
        S3_ENDPOINT = cluster.s3_endpoint
        yield S3_ENDPOINT
        S3_ENDPOINT = None


def _s3_root() -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                      s3={"addressing_style": "path"}),
    )
    try:
        client.head_bucket(Bucket=S3_BUCKET)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=S3_BUCKET)
    return f"s3://{S3_BUCKET}/tests/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(params=[pytest.param("file", id="file"), pytest.param("s3", id="s3")])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/store/"
        return
    request.getfixturevalue("s3_server")
    uri = _s3_root()
    yield uri
    open_store(uri, endpoint=S3_ENDPOINT).delete_prefix("")


def _store(uri: str) -> Store:
    return open_store(uri, endpoint=S3_ENDPOINT)


def test_write_read_list_delete(root: str, tmp_path: Path) -> None:
    store = _store(root)
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


def test_globs(root: str) -> None:
    store = _store(root)
    for key in ("data/train-1.jsonl", "data/train-2.jsonl", "data/eval.jsonl", "data/sub/train-3.jsonl"):
        store.write_bytes(key, b"{}\n")
    assert [s.uri + o.key for s, o in expand(root + "data/train-*.jsonl", endpoint=S3_ENDPOINT)] == [
        root + "data/train-1.jsonl", root + "data/train-2.jsonl"
    ]
    assert len(expand(root + "data/**/train-*.jsonl", endpoint=S3_ENDPOINT)) == 3
    assert len(expand(root + "data/", endpoint=S3_ENDPOINT)) == 4


def test_checkpoint_manifest_is_written_last_and_retention_keeps_k(root: str, tmp_path: Path) -> None:
    store = _store(root)
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
        _store(f"file://{blocker}/store/"), keep_last=1, on_complete=lambda m, s: None,
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
    root = _s3_root()
    store = _store(root)
    try:
        ckpt.upload_folder(store, model_dir("gpt2"), "models/tiny-gpt2/", step=0, metrics={})  # with a manifest
        for split in ("train", "eval"):
            store.upload_file(Path(text_data[split][len("file://"):]), f"data/{split}.jsonl")
        data = {"train": root + "data/train*.jsonl", "eval": root + "data/eval.jsonl"}
        model = Path("/unused")
        common = {"run": {"storageEndpoint": S3_ENDPOINT}, "model": {"uri": root + "models/tiny-gpt2/"}}
        first = base_config(model, data, tmp_path, hyperparameters={"maxSteps": 2},
                            checkpoints={"everySteps": 2, "outputUri": root + "run/"}, **common)
        assert run_trainer(first, tmp_path, "first.json")[0] == 0
        second = base_config(model, data, tmp_path, hyperparameters={"maxSteps": 4},
                             checkpoints={"everySteps": 2, "outputUri": root + "run/"}, **common)
        code, summary = run_trainer(second, tmp_path, "second.json")
        assert code == 0 and final_eval(summary)["step"] == 4
        assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
        assert json.loads(store.read_bytes("run/final/manifest.json"))["step"] == 4
        assert store.exists("run/run.json") and store.exists("run/metrics.jsonl")
        assert [m["step"] for m in ckpt.list_complete(_store(root + "run/"))] == [2, 4]
    finally:
        store.delete_prefix("")
