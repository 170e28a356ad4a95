"""Checkpoints in the run folder: upload in the background, manifest last, keep last K, resume.

Layout: `<run>/checkpoints/step-NNNNNN/` holds the checkpoint's files and `manifest.json`,
written last, listing every file with size and SHA-256 plus the step's metrics (and `format`).
A checkpoint without its manifest does not exist.

Format `dcp` (every strategy — data parallel and FSDP2 — on our own loop): `state/` written by
`torch.distributed.checkpoint` — each rank its own `__<rank>_*.distcp` file with its slices of
the weights and the AdamW state (data parallel: the replicated tensors once, deduplicated by
DCP), rank 0 the `.metadata`; an fp16 run adds its loss scaler's state (`scaler.*`, once) —
and `train_state.json` (step, epoch, world size, strategy).
Every rank uploads its own files in its background thread and then a listing
`.ranks/rank-<K>.json`; rank 0 writes the manifest once every rank's listing is there. DCP
reshards on load, so a job may resume with another number of processes or the other strategy
(the data position is the step: `loop.step_indices`; dropout is seeded per step).

Format `trainer` was written by earlier trainer versions (transformers' Trainer, data
parallel); the recipe refuses to resume it with a message saying what to do (docs/trainer.md).
`upload_folder` (a whole local folder, one process) also uploads final/.

Every rank may download (reads only).
"""

from __future__ import annotations

import errno
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

from finetune_trainer.contract import CheckpointRecord, SkippedCheckpoint
from finetune_trainer.storage import Store, iter_local_files, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints/"
MANIFEST = "manifest.json"
STATE = "state"  # the DCP folder of a sharded checkpoint
SCALER = "scaler"  # fp16's loss scaler state inside it
TRAIN_STATE = "train_state.json"
RANKS = ".ranks/"
FORMAT_TRAINER = "trainer"
FORMAT_DCP = "dcp"
RANK_WAIT_SECONDS = 1800.0  # rank 0 waits this long for the other ranks' uploads


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


def upload_files(store: Store, local: Path, prefix: str, paths: list[Path]) -> list[dict[str, Any]]:
    """Upload `paths` (inside `local`) under `prefix`; their manifest entries."""
    files: list[dict[str, Any]] = []
    for path in paths:
        rel = path.relative_to(local).as_posix()
        files.append(
            {"path": rel, "size": path.stat().st_size, "sha256": store.upload_file_hashed(path, prefix + rel)}
        )
    return files


def write_manifest(
    store: Store, prefix: str, files: list[dict[str, Any]], *, step: int, metrics: dict[str, float], fmt: str
) -> dict[str, Any]:
    manifest = {
        "step": step,
        "time": utc_now(),
        "uri": store.uri + prefix,
        "format": fmt,
        "metrics": metrics,
        "files": sorted(files, key=lambda f: str(f["path"])),
        "bytes": sum(f["size"] for f in files),
    }
    store.write_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def upload_folder(
    store: Store, local: Path, prefix: str, *, step: int, metrics: dict[str, float], fmt: str = FORMAT_TRAINER
) -> dict[str, Any]:
    """Upload every file of `local` under `prefix`, then the manifest. Returns the manifest."""
    paths = [p for p in iter_local_files(local) if p.relative_to(local).as_posix() != MANIFEST]
    return write_manifest(
        store, prefix, upload_files(store, local, prefix, paths), step=step, metrics=metrics, fmt=fmt
    )


def upload_rank_share(
    store: Store, local: Path, prefix: str, paths: list[Path], *, rank: int
) -> list[dict[str, Any]]:
    """A rank's part of a sharded checkpoint: its files, then its listing (read by rank 0)."""
    files = upload_files(store, local, prefix, paths)
    store.write_bytes(f"{prefix}{RANKS}rank-{rank}.json", json.dumps(files).encode())
    return files


def collect_rank_shares(
    store: Store, prefix: str, *, world_size: int, timeout: float = RANK_WAIT_SECONDS, poll: float = 0.2
) -> list[dict[str, Any]]:
    """Every rank's listing of a sharded checkpoint (waits for the slowest rank's uploads)."""
    deadline = time.monotonic() + timeout
    files: list[dict[str, Any]] = []
    for rank in range(world_size):
        key = f"{prefix}{RANKS}rank-{rank}.json"
        while not store.exists(key):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"checkpoint {prefix}: rank {rank} did not upload its shard in {timeout:.0f} s"
                )
            time.sleep(poll)
        files.extend(json.loads(store.read_bytes(key)))
    return files


def rank_files(local: Path, *, rank: int) -> list[Path]:
    """The files of a sharded checkpoint folder that `rank` wrote itself."""
    mine = sorted((local / STATE).glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine += [local / STATE / ".metadata", local / TRAIN_STATE]
    return mine


def save_sharded(
    model: Any,
    optimizer: Any,
    local: Path,
    *,
    train_state: dict[str, Any],
    adapters_only: bool,
    is_main: bool,
    scaler: Any = None,
) -> None:
    """Every rank writes its slices of the model and AdamW state (a collective); rank 0 writes
    train_state.json. With `adapters_only` (LoRA), the frozen base is not saved (it is reloaded
    from the model folder). `scaler` (fp16's `torch.amp.GradScaler`) adds its state under
    `scaler.*`: the same on every rank (every rank sees the same reduced gradients), so DCP
    writes it once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=adapters_only)
    )
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    if scaler is not None:
        state[SCALER] = scaler.state_dict()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        save(state, checkpoint_id=str(local / STATE))
    except CheckpointException as exc:  # a BaseException: `except Exception` would not see it
        raise _save_failed(exc, local, state) from exc
    if is_main:
        (local / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))


def _save_failed(exc: BaseException, local: Path, state: Any) -> Exception:
    """What a failed DCP save means, as an ordinary exception: ENOSPC when the checkpoint's disk
    has less room left than the state needs (torch's writer reports a short write on a full disk
    as "unexpected pos …", with no errno), else the error of each rank."""
    import torch

    def tensor_bytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(tensor_bytes(v) for v in value)
        return 0

    folder = local if local.exists() else local.parent
    if shutil.disk_usage(folder).free < tensor_bytes(state):
        return OSError(errno.ENOSPC, "No space left on device", str(local))
    failures = getattr(exc, "failures", None) or {}
    detail = "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in failures.items())
    return RuntimeError(f"saving the checkpoint to {local} failed: {detail or exc}")


def has_scaler_state(local: Path) -> bool:
    """Whether a checkpoint folder holds a loss scaler's state (written by an fp16 run)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    saved = FileSystemReader(str(local / STATE)).read_metadata().state_dict_metadata
    return any(key.startswith(SCALER + ".") for key in saved)


def load_sharded(
    model: Any, optimizer: Any, local: Path, *, adapters_only: bool, scaler: Any = None
) -> dict[str, Any]:
    """Restore the model and AdamW state saved by `save_sharded` (resharded to this run's
    processes), and `scaler`'s state when the checkpoint has one (every rank reads the same);
    returns train_state.json. A checkpoint without scaler state (bf16, fp32, or an earlier
    version) leaves `scaler` at its initial scale; a scaler state without a `scaler` is not read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    options = StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    if scaler is not None:
        if has_scaler_state(local):
            state[SCALER] = scaler.state_dict()
        else:
            log.warning(
                "checkpoint %s holds no loss scaler state: the fp16 scale restarts at %g",
                local,
                scaler.get_scale(),
            )
    load(state, checkpoint_id=str(local / STATE))  # in place
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options
    )
    if SCALER in state:
        scaler.load_state_dict(state[SCALER])
    return dict(json.loads((local / TRAIN_STATE).read_text()))


def load_weights(model: Any, local: Path) -> None:
    """The weights of a checkpoint folder (`save_sharded`, any number of processes) into a plain
    model in this process: DCP reassembles the full tensors. (A LoRA checkpoint holds only
    the adapters: `model` must then be the peft model on its base.)"""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    saved = FileSystemReader(str(local / STATE)).read_metadata().state_dict_metadata
    everything = get_model_state_dict(model)
    state = {name: value for name, value in everything.items() if f"model.{name}" in saved}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(name for name in trained if name in everything and name not in state)
    if missing or not state:
        raise ValueError(f"checkpoint {local}: holds no weights for {missing[:3] or 'this model'}")
    load({"model": state}, checkpoint_id=str(local / STATE))  # in place
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


class CorruptCheckpoint(OSError):
    """A checkpoint file's size or SHA-256 differs from its manifest."""


def download_checkpoint(store: Store, manifest: dict[str, Any], local: Path) -> Path:
    """Fetch a complete checkpoint and verify sizes and checksums against its manifest
    (`CorruptCheckpoint` on a mismatch, leaving nothing behind)."""
    prefix = step_key(int(manifest["step"]))
    tmp = local.with_name(local.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for entry in manifest["files"]:
        target = tmp / entry["path"]
        store.download_file(prefix + entry["path"], target)
        size = target.stat().st_size
        if size != entry["size"] or sha256_file(target) != entry["sha256"]:
            shutil.rmtree(tmp, ignore_errors=True)
            what = (
                f"{size} bytes, the manifest says {entry['size']}"
                if size != entry["size"]
                else "SHA-256 mismatch"
            )
            raise CorruptCheckpoint(f"{prefix}{entry['path']}: {what}")
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    return local


DOWNLOADED_MARKER = ".downloaded"
CORRUPT_MANIFEST = "manifest.corrupt.json"


def download_newest_intact(
    store: Store, manifests: list[dict[str, Any]], local_for: Callable[[int], Path]
) -> tuple[int | None, list[SkippedCheckpoint]]:
    """Download the newest checkpoint whose files match its manifest (once: a marker file says it
    is there) into `local_for(step)`. A corrupt one is skipped for the one before it. Returns the
    step (None when every checkpoint is corrupt) and the skipped ones ({step, reason})."""
    skipped: list[SkippedCheckpoint] = []
    for manifest in reversed(manifests):
        step = int(manifest["step"])
        local = local_for(step)
        if (local / DOWNLOADED_MARKER).exists():
            return step, skipped
        try:
            download_checkpoint(store, manifest, local)
        except CorruptCheckpoint as exc:
            log.warning("checkpoint at step %d is corrupt (%s): trying the one before it", step, exc)
            skipped.append({"step": step, "reason": f"corrupt: {exc}"})
            continue
        (local / DOWNLOADED_MARKER).write_text(str(manifest.get("time", "")))
        return step, skipped
    return None, skipped


def retire_corrupt(store: Store, step: int, reason: str) -> None:
    """Take a corrupt checkpoint out of the run folder's list: its manifest moves to
    `manifest.corrupt.json` (with the reason; the files stay for inspection), so no listing —
    status, CLI, resume — offers it again. Training past its step writes it anew."""
    prefix = step_key(step)
    manifest = json.loads(store.read_bytes(prefix + MANIFEST))
    store.write_bytes(
        prefix + CORRUPT_MANIFEST, json.dumps({**manifest, "corrupt": reason}, indent=1).encode()
    )
    store.delete_prefix(prefix + MANIFEST)


def record_of(manifest: dict[str, Any]) -> CheckpointRecord:
    return CheckpointRecord(
        step=int(manifest["step"]),
        uri=manifest["uri"],
        time=manifest["time"],
        metrics=manifest.get("metrics", {}),
    )


@dataclass
class Uploader:
    """One background thread per process that uploads checkpoints in order and (rank 0)
    applies retention. Data parallel: rank 0 alone uploads a whole folder. Sharded: every rank
    runs one and uploads its own files; rank 0 writes the manifest when all ranks are done.

    `on_complete(manifest, seconds)` runs in rank 0's upload thread after the manifest is written;
    `on_failure(error)` there after an upload failed (the training thread raises it on its next
    `submit`, `wait` or `close`).
    """

    store: Store
    keep_last: int
    on_complete: Callable[[dict[str, Any], float], None]
    rank: int = 0
    world_size: int = 1
    on_failure: Callable[[BaseException], None] | None = None
    _queue: queue.Queue[tuple[Path, int, dict[str, float], bool, bool] | None] = field(
        default_factory=queue.Queue
    )
    _errors: list[BaseException] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(
        self, local: Path, step: int, metrics: dict[str, float], *, remove_after: bool, sharded: bool = False
    ) -> None:
        self.raise_errors()
        self._queue.put((local, step, metrics, remove_after, sharded))

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
                local, step, metrics, remove_after, sharded = item
                started = time.perf_counter()
                if sharded:
                    self._upload_sharded(local, step, metrics, started, remove_after)
                    continue
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

    def _upload_sharded(
        self, local: Path, step: int, metrics: dict[str, float], started: float, remove_after: bool
    ) -> None:
        prefix = step_key(step)
        mine = rank_files(local, rank=self.rank)
        upload_rank_share(self.store, local, prefix, mine, rank=self.rank)
        if self.rank != 0:
            if remove_after:
                for path in mine:
                    path.unlink(missing_ok=True)
            return
        files = collect_rank_shares(self.store, prefix, world_size=self.world_size)
        manifest = write_manifest(self.store, prefix, files, step=step, metrics=metrics, fmt=FORMAT_DCP)
        self.store.delete_prefix(prefix + RANKS.rstrip("/"))
        self._retain()
        self.on_complete(manifest, time.perf_counter() - started)
        if remove_after:
            shutil.rmtree(local, ignore_errors=True)

    def _retain(self) -> None:
        complete = list_complete(self.store)
        for manifest in complete[: max(0, len(complete) - self.keep_last)]:
            prefix = step_key(int(manifest["step"]))
            self.store.delete_prefix(prefix + MANIFEST)  # not a checkpoint from here on
            self.store.delete_prefix(prefix.rstrip("/"))
