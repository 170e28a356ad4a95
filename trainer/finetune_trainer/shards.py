"""Token shards: a corpus tokenized once into memory-mappable files, cached in object storage.

Called by `data.prepare_tokens` (the training recipe, in local rank 0 of every node, and for
each baseline's tokenizer). It streams the records of `sources`, validates and tokenizes them
in batches with the fast tokenizer in a pool of worker processes (one per core), and writes one
*part* per work unit:

    part-00000.ids    token ids, little-endian, the narrowest unsigned dtype for the vocabulary
    part-00000.mask   uint8, 1 where the token is trained (only for formats that mask tokens)
    part-00000.docs   int64, the token length of each document, in order
    node-0.json       what node 0 wrote (parts, records, tokens) or every problem it found
    manifest.json     written last, by node 0, once every node's file is there: the set exists

A shard set is keyed by the data fingerprint, the tokenizer fingerprint and the settings that
change tokens (format, field names, trainOnInputs), not by sequence length or packing: packing is
done when reading (`packing`), so every sequence length and packing mode, every restart, every
node and every job and baseline model with the same tokenizer reuse one set. The set in object
storage is complete or absent (manifest last); the local copy (on the pod's cache disk, which is
memory-mapped) likewise has its manifest written last.

A job of several nodes splits the work units over them by node rank (unit i goes to node
i mod nodes), so each node tokenizes about 1/nodes of the corpus, then downloads the others'
parts. Every record is validated as it is tokenized: the problems of every node are reported
together (the first MAX_REPORTED shown, all counted), and no manifest is written.

No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.config import DatasetSpec
from finetune_trainer.contract import ENV_COLLECTIVE_TIMEOUT, collective_timeout_seconds
from finetune_trainer.errors import InvalidData
from finetune_trainer.records import encode_batch, eos_id
from finetune_trainer.sources import (
    BadRecords,
    Item,
    SourceFile,
    Unit,
    read_unit,
    spec_fields,
    units_of,
    where,
)
from finetune_trainer.storage import Store, open_store

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_REPORTED = 20
BATCH_RECORDS = 1000
WAIT_POLL_SECONDS = 2.0


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype holding every id of a vocabulary of `vocab_size` tokens."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise InvalidData(f"a vocabulary of {vocab_size} tokens does not fit 32-bit token ids")


def masks_tokens(spec: DatasetSpec) -> bool:
    """Whether some tokens of this format carry no loss (so a loss mask is stored)."""
    return spec.format != "text" and not spec.train_on_inputs


def settings_of(spec: DatasetSpec) -> dict[str, Any]:
    """The settings that change the tokens: the shard key holds these and nothing else."""
    return {"format": spec.format, "fields": spec_fields(spec), "trainOnInputs": spec.train_on_inputs}


def shard_key(data_fingerprint: str, tokenizer_fp: str, spec: DatasetSpec) -> str:
    text = json.dumps([FORMAT_VERSION, data_fingerprint, tokenizer_fp, settings_of(spec)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- tokenizing one unit (in a worker process) -----------------------------------------------------
@dataclass(frozen=True)
class PartSummary:
    index: int
    documents: int
    tokens: int
    lines: int  # lines (rows) the unit spans: the next unit of the same file starts its count after
    problems: list[tuple[int, str]]  # (line within the unit, message), the first MAX_REPORTED
    problem_count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "documents": self.documents,
            "tokens": self.tokens,
            "lines": self.lines,
            "problems": [list(p) for p in self.problems],
            "problemCount": self.problem_count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartSummary:
        return cls(
            index=int(data["index"]),
            documents=int(data["documents"]),
            tokens=int(data["tokens"]),
            lines=int(data["lines"]),
            problems=[(int(a), str(b)) for a, b in data["problems"]],
            problem_count=int(data["problemCount"]),
        )


def part_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass
class _Job:
    """What every worker needs, set once per pool (inherited by fork, not pickled)."""

    spec: DatasetSpec
    tokenizer: Any
    folder: Path
    dtype: np.dtype[Any]
    endpoint: str | None
    region: str | None


_JOB: _Job | None = None
_STORES: dict[str, Store] = {}


def _init_worker(job: _Job) -> None:
    global _JOB
    # A forked worker inherits the trainer's SIGTERM handler (checkpoint at the step end), which
    # would make it ignore the pool's terminate and hang its owner: workers die on SIGTERM. The
    # worker was forked with SIGTERM blocked (_sigterm_blocked), so a terminate that came before
    # this line is pending, not lost to the inherited handler: it kills the worker on unblock.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _JOB = job


def _tokenize_indexed(item: tuple[int, Unit]) -> PartSummary:
    assert _JOB is not None
    index, unit = item
    store = _STORES.get(unit.file.store_uri)
    if store is None:
        store = _STORES[unit.file.store_uri] = open_store(
            unit.file.store_uri, endpoint=_JOB.endpoint, region=_JOB.region
        )
    return tokenize_unit(index, unit, store, _JOB)


def tokenize_unit(index: int, unit: Unit, store: Store, job: _Job) -> PartSummary:
    """Stream one unit: validate each record, tokenize valid ones BATCH_RECORDS at a time, append
    them to this part's files. Memory: one batch."""

    name = part_name(index)
    masked = masks_tokens(job.spec)
    limit = np.iinfo(job.dtype).max
    problems: list[tuple[int, str]] = []
    problem_count = 0
    documents = tokens = lines = 0
    batch: list[Item] = []
    with (
        (job.folder / f"{name}.ids").open("wb") as ids_file,
        (job.folder / f"{name}.docs").open("wb") as docs_file,
        (job.folder / f"{name}.mask").open("wb") if masked else open(os.devnull, "wb") as mask_file,
    ):

        def flush() -> None:
            nonlocal documents, tokens, problem_count
            encoded = encode_batch([item.data for item in batch], job.spec, job.tokenizer)  # type: ignore[misc]
            lengths = []
            for item, result in zip(batch, encoded, strict=True):
                if isinstance(result, str):
                    problem_count += 1
                    if len(problems) < MAX_REPORTED:
                        problems.append((item.line, result))
                    continue
                ids, labels = result
                top = max(ids)
                if top > limit:
                    raise InvalidData(
                        f"token id {top} does not fit the {job.dtype.name} token shards chosen for a vocabulary "
                        f"of {limit + 1} tokens: the tokenizer's vocabulary (len(tokenizer)) is smaller than "
                        "the ids it produces"
                    )
                array = np.asarray(ids, dtype=job.dtype)
                ids_file.write(array.tobytes())
                if masked:
                    mask_file.write((np.asarray(labels) != -100).astype(np.uint8).tobytes())
                lengths.append(len(ids))
            docs_file.write(np.asarray(lengths, dtype=np.int64).tobytes())
            documents += len(lengths)
            tokens += sum(lengths)
            batch.clear()

        for item in read_unit(unit, store, job.spec):
            lines = max(lines, item.line)
            if item.problem is not None:
                problem_count += 1
                if len(problems) < MAX_REPORTED:
                    problems.append((item.line, item.problem))
                continue
            if item.data is None:
                continue
            batch.append(item)
            if len(batch) >= BATCH_RECORDS:
                flush()
        if batch:
            flush()
    return PartSummary(index, documents, tokens, lines, problems, problem_count)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tokenize_units(
    indexed: Sequence[tuple[int, Unit]],
    job: _Job,
    *,
    workers: int | None = None,
    on_part: Callable[[PartSummary], None] | None = None,
) -> list[PartSummary]:
    """Tokenize units into parts in `job.folder`, over `workers` processes (default: one per
    core). With one worker or one unit it runs here, and the fast tokenizer's own threads use
    the cores for each batch."""
    count = min(workers or _cores(), len(indexed))
    results: list[PartSummary] = []
    if count <= 1:
        _init_local(job)
        for item in indexed:
            results.append(_tokenize_indexed(item))
            if on_part is not None:
                on_part(results[-1])
        return results
    context = multiprocessing.get_context("fork")
    with _sigterm_blocked():  # the workers and the pool's threads start with it blocked
        pool = context.Pool(count, initializer=_init_worker, initargs=(job,))
    with pool:
        for summary in pool.imap(_tokenize_indexed, indexed, chunksize=1):
            results.append(summary)
            if on_part is not None:
                on_part(summary)
        pool.close()  # every part is done: let the workers exit rather than be terminated
        pool.join()
    return results


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread while the pool forks its workers and starts its threads (all
    inherit the mask; a worker it later replaces is forked from such a thread). A worker that
    gets the pool's terminate before `_init_worker` has run then keeps it pending instead of
    handing it to the trainer's inherited handler and living on, which left the pool's terminate
    waiting for it forever. The trainer's own SIGTERM in this window is delivered on exit."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_local(job: _Job) -> None:
    global _JOB
    _JOB = job


# ---- a shard set: build, publish, fetch ------------------------------------------------------------
@dataclass(frozen=True)
class ShardSet:
    """A complete local shard set (its manifest read)."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])


def _problems_report(
    files: Sequence[SourceFile], units: Sequence[Unit], summaries: Iterable[PartSummary]
) -> InvalidData:
    by_index = {s.index: s for s in summaries}
    # line offsets: a unit's lines are counted from the end of the previous unit of its file
    offsets: dict[int, int] = {}
    running: dict[str, int] = {}
    for i, unit in enumerate(units):
        offsets[i] = running.get(unit.file.name, 0)
        if i in by_index:
            running[unit.file.name] = offsets[i] + by_index[i].lines
        else:  # a part whose line count we do not know (another node failed before writing it)
            running[unit.file.name] = offsets[i]
    shown: list[str] = []
    total = 0
    for i in sorted(by_index):
        s = by_index[i]
        total += s.problem_count
        for line, message in s.problems:
            if len(shown) < MAX_REPORTED:
                shown.append(f"{where(units[i], line, offsets[i])}: {message}")
    return BadRecords(total, shown)


def build_shards(
    files: Sequence[SourceFile],
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    key: str,
    local_root: Path,
    remote: Store | None,
    node_rank: int = 0,
    nodes: int = 1,
    workers: int | None = None,
    endpoint: str | None = None,
    region: str | None = None,
    unit_bytes: int | None = None,
    wait_timeout: float | None = None,
) -> ShardSet:
    """The shard set for `key`: the local copy if complete, else the one in `remote` (downloaded),
    else tokenized here (this node's share of the units) and published. InvalidData lists the bad
    records of every node."""
    folder = local_root / key
    local = _read_manifest(folder)
    if local is not None:
        return ShardSet(folder, local)
    folder.mkdir(parents=True, exist_ok=True)
    if remote is not None:
        manifest = _remote_manifest(remote, key)
        if manifest is not None:
            return _download(remote, key, folder, manifest)
    units = units_of(files, unit_bytes=unit_bytes)

    eos_id(tokenizer)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    mine = [(i, u) for i, u in enumerate(units) if i % nodes == node_rank]
    node_file = f"{key}/node-{node_rank}.json"
    summaries: list[PartSummary]
    if remote is not None and nodes > 1 and remote.exists(node_file):
        summaries = [PartSummary.from_json(p) for p in json.loads(remote.read_bytes(node_file))["parts"]]
    else:
        job = _Job(spec, tokenizer, folder, dtype, endpoint, region)
        started = time.monotonic()
        summaries = tokenize_units(mine, job, workers=workers)
        log.info(
            "tokenized %d unit(s) of %d (node %d of %d) in %.1fs: %d documents, %d tokens",
            len(mine),
            len(units),
            node_rank,
            nodes,
            time.monotonic() - started,
            sum(s.documents for s in summaries),
            sum(s.tokens for s in summaries),
        )
        failed = any(s.problem_count for s in summaries)
        if remote is not None and not failed:
            for s in summaries:
                for suffix in _suffixes(spec):
                    remote.upload_file(
                        folder / f"{part_name(s.index)}{suffix}", f"{key}/{part_name(s.index)}{suffix}"
                    )
        if remote is not None and nodes > 1:
            node_record = {"parts": [s.to_json() for s in summaries], "failed": failed}
            remote.write_bytes(node_file, json.dumps(node_record).encode())
    if any(s.problem_count for s in summaries) and nodes == 1:
        raise _problems_report(files, units, summaries)
    if nodes > 1:
        assert remote is not None, "a job of several nodes shares its shards through object storage"
        # after its own share a node waits for the others at most the collective timeout: a
        # node that died (a gang restart replaces them all) must not hold its peers for hours
        timeout = collective_timeout_seconds() if wait_timeout is None else wait_timeout
        summaries = _gather_nodes(remote, key, nodes, timeout, files, units)
    all_documents = sum(s.documents for s in summaries)
    if all_documents == 0:
        raise InvalidData(
            f"no records to train on in {len(files)} file(s) ({', '.join(f.name for f in files[:3])}"
            + (", …" if len(files) > 3 else "")
            + ")"
        )
    manifest = {
        "version": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "vocabSize": vocab,
        "masked": masks_tokens(spec),
        "settings": settings_of(spec),
        "files": [f.name for f in files],
        "documents": all_documents,
        "tokens": sum(s.tokens for s in summaries),
        "parts": [
            {"index": s.index, "documents": s.documents, "tokens": s.tokens}
            for s in sorted(summaries, key=lambda s: s.index)
        ],
    }
    if nodes > 1:
        missing = [p for p in manifest["parts"] if not (folder / f"{part_name(p['index'])}.ids").exists()]
        assert remote is not None
        for p in missing:
            for suffix in _suffixes(spec):
                remote.download_file(
                    f"{key}/{part_name(p['index'])}{suffix}", folder / f"{part_name(p['index'])}{suffix}"
                )
    if remote is not None and node_rank == 0:
        remote.write_bytes(f"{key}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    _write_manifest(folder, manifest)
    return ShardSet(folder, manifest)


def _suffixes(spec: DatasetSpec) -> list[str]:
    return [".ids", ".docs", *([".mask"] if masks_tokens(spec) else [])]


class NodesLost(RuntimeError):
    """Other nodes never published their token shards: they failed or are gone (a symptom; the
    failing node reports the cause)."""


def _gather_nodes(
    remote: Store, key: str, nodes: int, timeout: float, files: Sequence[SourceFile], units: Sequence[Unit]
) -> list[PartSummary]:
    """Wait for every node's record (each tokenizes its whole share, bad records or not, so the
    report is complete and its line numbers exact); raise the problems of all nodes if any."""
    deadline = time.monotonic() + timeout
    while True:
        present = {r: remote.exists(f"{key}/node-{r}.json") for r in range(nodes)}
        records = {
            r: json.loads(remote.read_bytes(f"{key}/node-{r}.json")) for r, ok in present.items() if ok
        }
        summaries = [PartSummary.from_json(p) for rec in records.values() for p in rec["parts"]]
        if len(records) == nodes:
            if any(rec["failed"] for rec in records.values()):
                raise _problems_report(files, units, summaries)
            return summaries
        if time.monotonic() > deadline:
            waiting = sorted(r for r, ok in present.items() if not ok)
            raise NodesLost(
                f"token shards {key}: node(s) {waiting} did not finish tokenizing within {timeout:.0f}s of this "
                f"node (the collective timeout, {ENV_COLLECTIVE_TIMEOUT}): lost peer"
            )
        time.sleep(WAIT_POLL_SECONDS)


def _remote_manifest(remote: Store, key: str) -> dict[str, Any] | None:
    if not remote.exists(f"{key}/{MANIFEST}"):
        return None
    manifest: dict[str, Any] = json.loads(remote.read_bytes(f"{key}/{MANIFEST}"))
    return manifest if manifest.get("version") == FORMAT_VERSION else None


def _download(remote: Store, key: str, folder: Path, manifest: dict[str, Any]) -> ShardSet:
    suffixes = [".ids", ".docs", *([".mask"] if manifest["masked"] else [])]
    for part in manifest["parts"]:
        for suffix in suffixes:
            name = f"{part_name(part['index'])}{suffix}"
            remote.download_file(f"{key}/{name}", folder / name)
    _write_manifest(folder, manifest)
    log.info("token shards %s: reused from object storage (%d documents)", key, manifest["documents"])
    return ShardSet(folder, manifest)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest if manifest.get("version") == FORMAT_VERSION else None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)


# ---- reading a shard set by memory map ---------------------------------------------------------------
class TokenStore:
    """The token ids, loss masks and document lengths of a shard set, memory-mapped: opening it
    reads only the document lengths (8 bytes a document); tokens are read on access."""

    def __init__(self, shards: ShardSet) -> None:
        manifest = shards.manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.masked = bool(manifest["masked"])
        self._ids: list[np.memmap[Any, Any] | np.ndarray[Any, Any]] = []
        self._mask: list[np.memmap[Any, Any] | np.ndarray[Any, Any] | None] = []
        lengths = []
        for part in manifest["parts"]:
            base = shards.folder / part_name(part["index"])
            self._ids.append(_map(base.with_suffix(".ids"), self.dtype))
            self._mask.append(_map(base.with_suffix(".mask"), np.dtype(np.uint8)) if self.masked else None)
            lengths.append(np.fromfile(base.with_suffix(".docs"), dtype=np.int64))
        self.doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.doc_starts = np.zeros(len(self.doc_lengths) + 1, dtype=np.int64)
        np.cumsum(self.doc_lengths, out=self.doc_starts[1:])
        part_tokens = np.asarray([p["tokens"] for p in manifest["parts"]], dtype=np.int64)
        self.part_starts = np.concatenate([[0], np.cumsum(part_tokens)]).astype(np.int64)

    @property
    def documents(self) -> int:
        return len(self.doc_lengths)

    def span(self, start: int, end: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]:
        """Ids (int64) and trained-mask (bool, None if every token is trained) of global tokens
        [start, end), which lie in one document."""
        part = int(np.searchsorted(self.part_starts, start, side="right")) - 1
        offset = int(self.part_starts[part])
        ids = np.asarray(self._ids[part][start - offset : end - offset], dtype=np.int64)
        mask_part = self._mask[part]
        mask = None if mask_part is None else np.asarray(mask_part[start - offset : end - offset], dtype=bool)
        return ids, mask


def _map(path: Path, dtype: np.dtype[Any]) -> np.memmap[Any, Any] | np.ndarray[Any, Any]:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
