"""Storage faults: the S3 server stopped and started again while the trainer's store uploads,
downloads and lists (a real versitygw of this test's own, stopped and restarted here), and the
retry rule itself (`storage.with_retries`, with a fake clock).

What a user sees: a warning per retry in the pod's log, and the same objects afterwards as
without the fault; past FINETUNE_STORAGE_RETRY_SECONDS the error itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import binaries
from finetune_trainer import storage
from finetune_trainer.storage import S3Store, with_retries

# ---------------------------------------------------------------------------------------------
# the rule


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "done"


def _run(operation: Flaky, clock: Clock, budget: float = 600) -> str:
    return with_retries(
        operation,
        what="upload x",
        budget_seconds=budget,
        transient=lambda exc: isinstance(exc, ConnectionError),
        sleep=clock.sleep,
        clock=lambda: clock.now,
        jitter=lambda: 1.0,
    )


@pytest.mark.parametrize("failures", [1, 3, 8])
def test_transient_errors_are_retried_with_growing_backoff(failures: int) -> None:
    clock, operation = Clock(), Flaky(failures, ConnectionError("refused"))
    assert _run(operation, clock) == "done"
    assert operation.calls == failures + 1
    assert clock.sleeps == [min(2.0**i, storage.MAX_BACKOFF_SECONDS) for i in range(failures)]


def test_permanent_errors_are_not_retried() -> None:
    clock, operation = Clock(), Flaky(1, PermissionError("403 AccessDenied"))
    with pytest.raises(PermissionError):
        _run(operation, clock)
    assert operation.calls == 1 and clock.sleeps == []


def test_the_budget_ends_the_retries_with_the_last_error() -> None:
    clock, operation = Clock(), Flaky(1000, ConnectionError("refused"))
    with pytest.raises(storage.StorageUnreachable) as gave_up:
        _run(operation, clock, budget=60)
    assert sum(clock.sleeps) <= 60 and operation.calls > 3
    assert isinstance(gave_up.value.__cause__, ConnectionError)
    message = str(gave_up.value)
    assert f"failed {operation.calls} times over" in message and "ConnectionError: refused" in message
    assert storage.ENV_RETRY_SECONDS in message and "storage.endpoint" in message


def test_botocore_errors_are_classified() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert storage.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    unavailable = {"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
    assert storage.is_transient(ClientError(unavailable, "PutObject"))
    denied = {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    assert not storage.is_transient(ClientError(denied, "PutObject"))
    missing = {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}
    assert not storage.is_transient(ClientError(missing, "GetObject"))


# ---------------------------------------------------------------------------------------------
# a real S3 server, stopped and started


_KEYS = ("test" + secrets.token_hex(6), secrets.token_urlsafe(18))


class Server:
    """A private versitygw on a free loopback port, over a folder of this test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        # one key pair per test process: boto3's default session keeps the first it reads
        self.access, self.secret = _KEYS
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ROOT_ACCESS_KEY": self.access, "ROOT_SECRET_KEY": self.secret}
        self.process = subprocess.Popen(
            [str(binaries.binary("versitygw")), "--port", f"127.0.0.1:{self.port}", "posix", str(self.root)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("versitygw did not start listening within 60 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def start_after(self, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        thread.start()
        return thread


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server(tmp_path / "s3")
    (srv.root / "runs").mkdir(parents=True)  # the bucket (versitygw posix: a folder)
    srv.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret)
    yield srv
    srv.stop()


def _store(server: Server, budget: float = 120) -> S3Store:
    return S3Store("s3://runs/job/", endpoint=server.endpoint, retry_seconds=budget)


def _file(path: Path, megabytes: int) -> str:
    path.write_bytes(os.urandom(megabytes * 1024 * 1024))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_waits_for_a_stopped_server(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Multipart (above 8 MiB): the checkpoint shard arrives whole once the server is back."""
    store = _store(server)
    local = tmp_path / "model.safetensors"
    digest = _file(local, 20)
    server.stop()
    starter = server.start_after(3)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.storage"):
        assert store.upload_file_hashed(local, "checkpoints/step-000010/model.safetensors") == digest
    starter.join()
    assert "retrying in" in caplog.text, "the fault was hit and reported"
    stored = server.root / "runs" / "job" / "checkpoints" / "step-000010" / "model.safetensors"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest


def test_server_restarted_in_the_middle_of_an_upload(server: Server, tmp_path: Path) -> None:
    store = _store(server)
    local = tmp_path / "optimizer.pt"
    digest = _file(local, 48)

    def restart() -> None:
        time.sleep(0.3)
        server.stop()
        time.sleep(2)
        server.start()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    store.upload_file(local, "checkpoints/step-000020/optimizer.pt")
    thread.join()
    stored = server.root / "runs" / "job" / "checkpoints" / "step-000020" / "optimizer.pt"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest


def test_resume_download_and_listing_wait_for_the_server(server: Server, tmp_path: Path) -> None:
    store = _store(server)
    store.write_bytes("checkpoints/step-000010/manifest.json", b'{"step": 10}')
    local = tmp_path / "weights.bin"
    digest = _file(local, 12)
    store.upload_file(local, "checkpoints/step-000010/weights.bin")
    server.stop()
    server.start_after(2).join(timeout=0)
    keys = [o.key for o in store.list("checkpoints/")]
    assert keys == ["checkpoints/step-000010/manifest.json", "checkpoints/step-000010/weights.bin"]
    server.stop()
    server.start_after(2)
    store.download_file("checkpoints/step-000010/weights.bin", tmp_path / "back.bin")
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest
    server.stop()
    server.start_after(2)
    assert store.exists("checkpoints/step-000010/manifest.json"), "an outage does not make a manifest vanish"


def test_a_server_that_stays_down_ends_in_its_error(server: Server, tmp_path: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    store = _store(server, budget=4)
    server.stop()
    with pytest.raises(storage.StorageUnreachable) as gave_up:
        store.write_bytes("metrics.jsonl", b"{}\n")
    assert isinstance(gave_up.value.__cause__, EndpointConnectionError)


def test_a_run_whose_storage_stays_down_fails_with_one_clear_line(
    server: Server, tmp_path: Path, model_dir: Any, text_data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real trainer, its run folder on a server that is down past the retry budget: exit 1
    (the Job retries it) with a termination message that says what failed, for how long and what
    to check — not a traceback."""
    from finetune_trainer import contract
    from tests.trainer.conftest import base_config, run_trainer

    monkeypatch.setenv(storage.ENV_RETRY_SECONDS, "3")
    config = base_config(
        model_dir("llama"), text_data, tmp_path / "unused", hyperparameters={"maxSteps": 2},
        checkpoints={"outputUri": "s3://runs/down/"}, run={"storageEndpoint": server.endpoint},
    )  # fmt: skip
    server.stop()
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_FAILURE
    assert summary["reason"] == "Error"
    assert summary["message"].startswith("object storage: "), summary["message"]
    assert "EndpointConnectionError" in summary["message"] and storage.ENV_RETRY_SECONDS in summary["message"]
    assert "Traceback" not in summary["message"] and 'File "' not in summary["message"]


# ---------------------------------------------------------------------------------------------
# a full local disk


def _enospc() -> OSError:
    """A real ENOSPC from the kernel: /dev/full is a device that is always full."""
    try:
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"checkpoint")
    except OSError as exc:
        return exc
    raise AssertionError("/dev/full accepted a write")


@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "wrapped-by-a-library"])
def test_a_full_disk_is_named_not_a_traceback(wrapped: bool) -> None:
    from finetune_trainer.cli import disk_full

    error: BaseException = _enospc()
    if wrapped:
        try:
            raise RuntimeError("safetensors: failed to save") from error
        except RuntimeError as outer:
            error = outer
    message = disk_full(error)
    assert message is not None
    assert message.startswith("no space left on the pod's local disk")
    assert "ephemeral storage" in message and "Traceback" not in message
    assert disk_full(ValueError("other")) is None
    import errno

    named = disk_full(OSError(errno.ENOSPC, "No space left on device", "/var/cache/finetune/model.bin"))
    assert named is not None and "writing /var/cache/finetune/model.bin" in named


def test_a_run_that_fills_its_local_disk_ends_with_the_message_not_a_traceback(
    tmp_path: Path, model_dir: Any, text_data: dict[str, str]
) -> None:
    """The real trainer in a process of its own whose cache (FINETUNE_CACHE_DIR: the model
    cache and the checkpoints staged before upload) is a tmpfs too small for a checkpoint — a
    real ENOSPC from the kernel, in a mount namespace of the test's own: exit 1 and the termination
    message names the full disk and what to change."""
    import json

    from finetune_trainer import contract
    from tests.trainer.conftest import base_config, write_config

    config = write_config(
        tmp_path / "config.json",
        base_config(model_dir("llama"), text_data, tmp_path / "run", hyperparameters={"maxSteps": 4}),
    )
    cache, termination = tmp_path / "cache", tmp_path / "termination-log"
    cache.mkdir()
    termination.write_text("")
    script = (
        f'mount -t tmpfs -o size={FULL_DISK_BYTES} tmpfs "$1" && exec "$2" -m finetune_trainer --config "$3"'
    )
    env = {
        **os.environ,
        contract.ENV_CACHE_DIR: str(cache),
        "FINETUNE_TERMINATION_LOG": str(termination),
    }
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(cache), sys.executable, str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == contract.EXIT_FAILURE, result.stderr[-3000:]
    assert termination.read_text(), result.stderr[-6000:]
    summary = json.loads(termination.read_text())
    assert summary["message"].startswith("no space left on the pod's local disk"), summary["message"]
    assert contract.ENV_CACHE_DIR in summary["message"]
    assert "Traceback" not in summary["message"] and "Traceback" not in result.stderr
    assert not any(cache.iterdir()), "the tmpfs was the process's own: nothing reached the test's folder"


# A tmpfs that holds the tiny model's tokenized data but not its checkpoints (each ~0.7 MiB with
# AdamW state): the run fills it at its first checkpoint (100 KB to 600 KB all end the same way).
FULL_DISK_BYTES = 400_000


# ---------------------------------------------------------------------------------------------
# a training run through outages


def test_a_run_through_two_outages_ends_as_one_without(
    server: Server, tmp_path: Path, model_dir: Any, text_data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real trainer, run folder in S3: the server stops while the first checkpoint uploads
    and again when the final export starts. Training goes on (uploads are in the background),
    the export waits for the server, and the run ends with the evaluations, checkpoints and final
    model of a run that saw no fault; every listed checkpoint has all its files."""
    import json

    from finetune_trainer import contract
    from tests.trainer.conftest import base_config, final_eval, run_trainer

    monkeypatch.setenv(storage.ENV_RETRY_SECONDS, "120")
    model = model_dir("llama")

    def config(prefix: str) -> dict[str, Any]:
        return base_config(
            model, text_data, tmp_path / "unused", hyperparameters={"maxSteps": 6},
            checkpoints={"everySteps": 2, "keepLast": 3, "outputUri": f"s3://runs/{prefix}/"},
            run={"storageEndpoint": server.endpoint},
        )  # fmt: skip

    code, clean = run_trainer(config("clean"), tmp_path, "clean.json")
    assert code == contract.EXIT_OK, clean

    faulty = server.root / "runs" / "faulty"
    outages: list[str] = []

    def cut_when(path: Path, what: str) -> None:
        deadline = time.monotonic() + 300
        while not path.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        server.stop()
        outages.append(what)
        time.sleep(3)
        server.start()

    def faults() -> None:
        cut_when(faulty / "checkpoints" / "step-000002", "first checkpoint upload")
        cut_when(faulty / "final", "final export")

    thread = threading.Thread(target=faults, daemon=True)
    thread.start()
    code, summary = run_trainer(config("faulty"), tmp_path, "faulty.json")
    thread.join(timeout=60)
    assert code == contract.EXIT_OK, summary
    assert outages == ["first checkpoint upload", "final export"], "both faults happened"
    assert [e["step"] for e in summary["evaluations"]] == [e["step"] for e in clean["evaluations"]]
    assert final_eval(summary)["loss"] == pytest.approx(final_eval(clean)["loss"], abs=1e-6)
    assert (
        [c["step"] for c in summary["checkpoints"]] == [c["step"] for c in clean["checkpoints"]] == [2, 4, 6]
    )
    for record in summary["checkpoints"]:
        folder = faulty / "checkpoints" / f"step-{record['step']:06d}"
        manifest = json.loads((folder / "manifest.json").read_text())
        for entry in manifest["files"]:
            stored = folder / entry["path"]
            assert stored.stat().st_size == entry["size"], stored
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry["sha256"], stored
    final_files = sorted(
        p.relative_to(faulty / "final") for p in (faulty / "final").rglob("*") if p.is_file()
    )
    clean_final = server.root / "runs" / "clean" / "final"
    assert final_files == sorted(p.relative_to(clean_final) for p in clean_final.rglob("*") if p.is_file())
    for rel in final_files:
        if rel.suffix == ".safetensors":
            assert (faulty / "final" / rel).read_bytes() == (clean_final / rel).read_bytes(), rel


def test_a_corrupt_newest_checkpoint_in_s3_resumes_from_the_one_before(
    server: Server, tmp_path: Path, trained: Any
) -> None:
    """The fallback on the S3 path: a run folder in the bucket whose newest checkpoint has a
    flipped byte resumes from the one before, says so, and takes the corrupt one out of the list
    (its manifest moved aside in the bucket)."""
    import json
    import shutil

    from finetune_trainer import contract
    from tests.trainer.conftest import base_config, flip_a_byte, run_trainer

    first = trained("llama")  # 4 steps, checkpoints at 2 and 4
    folder = server.root / "runs" / "corrupt"
    shutil.copytree(first.run, folder)  # the bucket is a folder of versitygw's posix backend
    shard = flip_a_byte(next((folder / "checkpoints" / "step-000004" / "state").glob("*.distcp")))
    config = base_config(
        first.model, first.data, tmp_path / "unused", hyperparameters={"maxSteps": 6},
        checkpoints={"outputUri": "s3://runs/corrupt/"}, run={"storageEndpoint": server.endpoint},
    )  # fmt: skip
    code, resumed = run_trainer(config, tmp_path)
    assert code == contract.EXIT_OK, resumed
    assert resumed["resumedFrom"]["step"] == 2
    [skipped] = resumed["resumedFrom"]["skipped"]
    assert (
        skipped["step"] == 4 and "SHA-256 mismatch" in skipped["reason"] and shard.name in skipped["reason"]
    )
    assert [c["step"] for c in resumed["checkpoints"]] == [4, 6]
    manifest = json.loads((folder / "checkpoints" / "step-000004" / "manifest.json").read_text())
    for entry in manifest["files"]:  # step 4 trained again and saved anew, intact
        stored = folder / "checkpoints" / "step-000004" / entry["path"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry["sha256"], stored
