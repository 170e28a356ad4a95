"""Data: resolve the sources, preflight and tokenize records with loss masks, and give the loop
memory-mapped datasets of packed sequences.

Called by the training recipe (`train.py`): `plan_data` once (lists the files, no reading), then
`token_dataset` for the training set and for every model evaluated on the eval set (each with
its own tokenizer). `kubectl finetune add dataset` and `finetune-trainer check` call the same
streaming `preflight` (records checked by `records.check_record`, tokens counted by
`records.encode_batch`, as the shards are made). No torch or transformers at import
time. The pipeline at scale: `sources` streams records, `shards` tokenizes them in parallel into
memory-mapped token shards cached in object storage, `packing` cuts sequences out of them.

Formats (DatasetSpec.format):
- text: JSONL or Parquet `{"<textField>": str}` or `.txt` files (one document per file); loss on
  all tokens.
- prompt-completion: `{"<promptField>": str, "<completionField>": str}`; loss on the completion
  and the EOS token only (unless trainOnInputs).
- chat: `{"<messagesField>": [{"role", "content"}, …]}` rendered with the tokenizer's chat
  template; loss only on assistant turns (their content and end-of-turn tokens).

Every example (document) ends with the EOS token. Packing modes are described in `packing`.
Without packing, an example longer than sequenceLength is split into several sequences, never
truncated.

There is one way to read data: `plan_data` lists the files, `token_dataset` (through
`shards_for`) streams and tokenizes them into shards and memory-maps them. `SequenceDataset` only
holds sequences already in memory (an empty eval set, metric tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.packing import Collator as Collator  # re-exported: the collator of every dataset here
from finetune_trainer.packing import PackingMode, TokenDataset
from finetune_trainer.records import IGNORE as IGNORE  # re-exported: the label of a token without loss
from finetune_trainer.records import Example as Example  # re-exported: one tokenized document
from finetune_trainer.records import encode_batch, eos_id
from finetune_trainer.shards import BATCH_RECORDS, ShardSet, TokenStore, build_shards, shard_key
from finetune_trainer.sources import (
    NO_RECORDS,
    SourceFile,
    fingerprint,
    list_files,
    read_unit,
    units_of,
    where,
)
from finetune_trainer.sources import BadRecords as BadRecords  # re-exported: what preflight raises
from finetune_trainer.storage import Store, expand, open_store

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.bos_token_id],
        default=str,
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


# ---- the trainer's path: plan, shards, datasets --------------------------------------------------
@dataclass(frozen=True)
class DataPlan:
    """The files of a run's data, listed but not read. `eval_files` None: the eval set is
    `eval_size` documents held out of the training files (chosen by `seed`)."""

    train_files: tuple[SourceFile, ...]
    eval_files: tuple[SourceFile, ...] | None
    eval_size: int
    seed: int

    @property
    def fingerprint(self) -> str:
        parts = [
            fingerprint(self.train_files),
            fingerprint(self.eval_files) if self.eval_files is not None else "holdout",
        ]
        if self.eval_files is None:
            parts.append(f"{self.eval_size}:{self.seed}")
        return hashlib.sha256(":".join(parts).encode()).hexdigest()


def plan_data(
    spec: DatasetSpec,
    *,
    seed: int,
    need_train: bool = True,
    datasets_uri: str | None = None,
    endpoint: str | None = None,
    region: str | None = None,
) -> DataPlan:
    """Which files hold train and eval: `dataset.eval`, else a registered dataset's eval/ files,
    else evalSize documents held out of train. `need_train=False` (mode Evaluate) lists no train
    files when the eval sources are known. InvalidData names each URI matching nothing."""
    eval_uris: list[str] | None = list(spec.eval) if spec.eval else None
    if spec.name is not None:
        assert datasets_uri is not None
        base = datasets_uri.rstrip("/") + f"/{spec.name}/"
        train_uris = [base + "train/**"]
        if eval_uris is None and expand(base + "eval/**", endpoint=endpoint, region=region):
            eval_uris = [base + "eval/**"]
    else:
        train_uris = list(spec.train or [])
    settings = {"endpoint": endpoint, "region": region}
    eval_files = tuple(list_files(eval_uris, **settings)) if eval_uris is not None else None
    need = need_train or eval_files is None
    train_files = tuple(list_files(train_uris, **settings)) if need and train_uris else ()
    return DataPlan(train_files, eval_files, spec.eval_size, seed)


def packing_mode(spec: DatasetSpec) -> PackingMode:
    if not spec.packing:
        return "none"
    return spec.packing_strategy


def shard_cache_uri(*, datasets_uri: str | None, run_uri: str) -> str:
    """Where token shards are cached in object storage: beside the registered datasets (so every
    job shares them), else in the run folder (so restarts and every node do)."""
    if datasets_uri is not None:
        return datasets_uri.rstrip("/") + "/.tokens/"
    return run_uri.rstrip("/") + "/tokens/"


def node_topology(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(node rank, number of nodes) of this process, from torchrun's environment."""
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    node_rank = int(env.get("GROUP_RANK", env.get("NODE_RANK", "0")))
    return node_rank, max(1, world // max(1, local_world))


@dataclass(frozen=True)
class ShardSettings:
    """Where shards live and who makes them: the same for every split and tokenizer of a run."""

    local_root: Path
    remote_uri: str | None
    node_rank: int = 0
    nodes: int = 1
    workers: int | None = None  # tokenizing processes; None: one per core
    endpoint: str | None = None
    region: str | None = None

    def remote(self) -> Store | None:
        return (
            open_store(self.remote_uri, endpoint=self.endpoint, region=self.region)
            if self.remote_uri
            else None
        )


_STORES: dict[Path, TokenStore] = {}


def shards_for(
    files: Sequence[SourceFile], spec: DatasetSpec, tokenizer: Any, settings: ShardSettings
) -> ShardSet:
    key = shard_key(fingerprint(files), tokenizer_fingerprint(tokenizer), spec)
    return build_shards(
        files,
        spec,
        tokenizer,
        key=key,
        local_root=settings.local_root,
        remote=settings.remote(),
        node_rank=settings.node_rank,
        nodes=settings.nodes,
        workers=settings.workers,
        endpoint=settings.endpoint,
        region=settings.region,
    )


def _token_store(shards: ShardSet) -> TokenStore:
    store = _STORES.get(shards.folder)
    if store is None:
        store = _STORES[shards.folder] = TokenStore(shards)
    return store


def holdout(documents: int, size: int, seed: int) -> np.ndarray[Any, Any]:
    """The documents held out for evaluation: `size` of them, chosen by `seed`, in order."""
    if documents <= size:
        raise InvalidData(
            f"dataset.evalSize={size} holds out all {documents} training records; lower evalSize or give dataset.eval"
        )
    return np.sort(np.random.default_rng(seed).permutation(documents)[:size])


def token_dataset(
    plan: DataPlan, spec: DatasetSpec, tokenizer: Any, *, split: str, length: int, settings: ShardSettings
) -> TokenDataset:
    """The memory-mapped dataset of one split for one tokenizer, tokenizing (and caching) the
    shards it needs unless a complete set exists. Call it in one process per node first (the
    recipe's local-rank-0-first), then in the others, which then find the local set."""
    held_out = plan.eval_files is None
    files = plan.eval_files if split == "eval" and plan.eval_files is not None else plan.train_files
    store = _token_store(shards_for(files, spec, tokenizer, settings))
    every = np.arange(store.documents, dtype=np.int64)
    if held_out:
        held = holdout(store.documents, plan.eval_size, plan.seed)
        documents = held if split == "eval" else np.setdiff1d(every, held, assume_unique=True)
    else:
        documents = every
    dataset = TokenDataset(store, documents, length=length, mode=packing_mode(spec))
    if len(dataset) == 0:
        raise InvalidData(
            f"the {split} set has no trained tokens after tokenization: every sequence of its "
            f"{len(documents)} record(s) from {files[0].name if files else '(no files)'}"
            + (f" and {len(files) - 1} more file(s)" if len(files) > 1 else "")
            + " carries no loss (dataset.format, trainOnInputs)"
        )
    return dataset


@dataclass(frozen=True)
class PreflightReport:
    """Records (and, when a tokenizer was given, tokens) per file of a preflight that found no
    problem. Tokens are what the token shards will hold: every document with its EOS token."""

    records: dict[str, int]
    tokens: dict[str, int] | None = None

    @property
    def total(self) -> int:
        return sum(self.records.values())

    @property
    def total_tokens(self) -> int | None:
        return None if self.tokens is None else sum(self.tokens.values())


def preflight(
    files: Sequence[SourceFile],
    spec: DatasetSpec,
    *,
    tokenizer: Any = None,
    endpoint: str | None = None,
    region: str | None = None,
) -> PreflightReport:
    """Stream every record of the files and check it; with a tokenizer, also tokenize valid
    records BATCH_RECORDS at a time (`encode_batch`, as the token shards do) and count tokens.
    InvalidData lists the first MAX_REPORTED_ERRORS problems as `file:line: …` and counts them
    all. Memory: one batch of records."""
    shown: list[str] = []
    total = 0
    counts: dict[str, int] = {}
    tokens: dict[str, int] = {}
    line_offsets: dict[str, int] = {}
    stores: dict[str, Store] = {}
    batch: list[tuple[str, str, dict[str, Any]]] = []  # (file, file:line, record)
    reported: set[str] = set()  # files with a problem

    def problem(text: str) -> None:
        nonlocal total
        total += 1
        if len(shown) < MAX_REPORTED_ERRORS:
            shown.append(text)

    def flush() -> None:
        encoded = encode_batch([data for _, _, data in batch], spec, tokenizer)
        for (name, located, _), result in zip(batch, encoded, strict=True):
            if isinstance(result, str):
                problem(f"{located}: {result}")
            else:
                tokens[name] = tokens.get(name, 0) + len(result[0])
        batch.clear()

    if tokenizer is not None:
        eos_id(tokenizer)
    for unit in units_of(files):
        store = stores.get(unit.file.store_uri) or stores.setdefault(
            unit.file.store_uri, open_store(unit.file.store_uri, endpoint=endpoint, region=region)
        )
        offset = line_offsets.get(unit.file.name, 0)
        last = 0
        for item in read_unit(unit, store, spec):
            last = max(last, item.line)
            if item.problem is not None:
                reported.add(unit.file.name)
                problem(f"{where(unit, item.line, offset)}: {item.problem}")
            elif item.data is not None:
                counts[unit.file.name] = counts.get(unit.file.name, 0) + 1
                if tokenizer is not None:
                    batch.append((unit.file.name, where(unit, item.line, offset), item.data))
                    if len(batch) >= BATCH_RECORDS:
                        flush()
        line_offsets[unit.file.name] = offset + last
    if batch:
        flush()
    for file in files:  # a file read in several units, none with a record (a unit cannot tell)
        if file.name not in counts and file.name not in reported and file.kind == "jsonl":
            problem(f"{file.name}: {NO_RECORDS['jsonl']}")
    if total:
        raise BadRecords(total, shown)
    if not counts:
        raise InvalidData(
            f"no records in {len(files)} file(s) ({', '.join(f.name for f in files[:3])}"
            + (", …" if len(files) > 3 else "")
            + ")"
        )
    return PreflightReport(
        counts, {name: tokens.get(name, 0) for name in counts} if tokenizer is not None else None
    )


# ---- torch side --------------------------------------------------------------------------------
class SequenceDataset:
    """A map-style dataset of token sequences (torch Dataset protocol)."""

    def __init__(self, sequences: Sequence[Example]):
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        s = self.sequences[index]
        return {"input_ids": s.input_ids, "labels": s.labels}

    def trained_tokens(self) -> int:
        """Tokens that carry loss: the label at position t is predicted from position t-1."""
        return sum(sum(1 for x in s.labels[1:] if x != IGNORE) for s in self.sequences)
