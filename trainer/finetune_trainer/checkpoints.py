"""Checkpoints in the run folder: upload in the background, manifest last, keep last K, resume.

Layout: `<run>/checkpoints/step-NNNNNN/` holds what transformers' Trainer saved locally
(safetensors weights or LoRA adapter, config, tokenizer, optimizer, scheduler, RNG states,
trainer_state.json with the step and epoch = the data position) and `manifest.json`, written
last, listing every file with size and SHA-256 plus the step's metrics. A checkpoint without its
manifest does not exist. Only rank 0 uploads; every rank may download (reads only).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_trainer.contract import CheckpointRecord
from finetune_trainer.storage import Store, iter_local_files, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints/"
MANIFEST = "manifest.json"


def step_key(step: int) -> str:
    return f"{CHECKPOINTS}step-{step:06d}/"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_complete(store: Store) -> list[dict[str, Any]]:
    """Manifests of complete checkpoints, oldest first."""
    manifests = []
    for obj in store.list(CHECKPOINTS):
        if obj.key.endswith("/" + MANIFEST) and obj.key.count("/") == 2:
            manifests.append(json.loads(store.read_bytes(obj.key)))
    return sorted(manifests, key=lambda m: int(m["step"]))


def upload_folder(store: Store, local: Path, prefix: str, *, step: int, metrics: dict[str, float]) -> dict[str, Any]:
    """Upload every file of `local` under `prefix`, then the manifest. Returns the manifest."""
    files: list[dict[str, Any]] = []
    for path in iter_local_files(local):
        rel = path.relative_to(local).as_posix()
        if rel == MANIFEST:
            continue
        size = path.stat().st_size
        files.append({"path": rel, "size": size, "sha256": store.upload_file_hashed(path, prefix + rel)})
    manifest = {
        "step": step,
        "time": utc_now(),
        "uri": store.uri + prefix,
        "metrics": metrics,
        "files": files,
        "bytes": sum(f["size"] for f in files),
    }
    store.write_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def download_checkpoint(store: Store, manifest: dict[str, Any], local: Path) -> Path:
    """Fetch a complete checkpoint and verify sizes and checksums against its manifest."""
    prefix = step_key(int(manifest["step"]))
    tmp = local.with_name(local.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for entry in manifest["files"]:
        target = tmp / entry["path"]
        store.download_file(prefix + entry["path"], target)
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise OSError(f"checkpoint {prefix}{entry['path']}: checksum mismatch")
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    return local


def record_of(manifest: dict[str, Any]) -> CheckpointRecord:
    return CheckpointRecord(
        step=int(manifest["step"]), uri=manifest["uri"], time=manifest["time"], metrics=manifest.get("metrics", {})
    )


@dataclass
class Uploader:
    """One background thread that uploads checkpoint folders in order and applies retention.

    `on_complete(manifest, seconds)` runs in the upload thread after the manifest is written;
    `on_failure(error)` there after an upload failed (the training thread raises it on its next
    `submit`, `wait` or `close`).
    """

    store: Store
    keep_last: int
    on_complete: Callable[[dict[str, Any], float], None]
    on_failure: Callable[[BaseException], None] | None = None
    _queue: queue.Queue[tuple[Path, int, dict[str, float], bool] | None] = field(default_factory=queue.Queue)
    _errors: list[BaseException] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, local: Path, step: int, metrics: dict[str, float], *, remove_after: bool) -> None:
        self.raise_errors()
        self._queue.put((local, step, metrics, remove_after))

    def wait(self) -> None:
        """Block until every submitted checkpoint is uploaded."""
        self._queue.join()
        self.raise_errors()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.raise_errors()

    def raise_errors(self) -> None:
        if self._errors:
            raise RuntimeError("checkpoint upload failed") from self._errors[0]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                local, step, metrics, remove_after = item
                started = time.perf_counter()
                manifest = upload_folder(self.store, local, step_key(step), step=step, metrics=metrics)
                self._retain()
                self.on_complete(manifest, time.perf_counter() - started)
                if remove_after:
                    shutil.rmtree(local, ignore_errors=True)
            except BaseException as exc:  # reported to the training thread on its next call
                log.exception("checkpoint upload failed")
                self._errors.append(exc)
                if self.on_failure is not None:
                    self.on_failure(exc)
            finally:
                self._queue.task_done()

    def _retain(self) -> None:
        complete = list_complete(self.store)
        for manifest in complete[: max(0, len(complete) - self.keep_last)]:
            prefix = step_key(int(manifest["step"]))
            self.store.delete_prefix(prefix + MANIFEST)  # not a checkpoint from here on
            self.store.delete_prefix(prefix.rstrip("/"))
