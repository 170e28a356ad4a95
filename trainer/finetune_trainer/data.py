"""Data: resolve the sources, preflight and tokenize records with loss masks, and give the loop
memory-mapped datasets of packed sequences.

Called by the training recipe (`train.py`): `plan_data` once (lists the files, no reading), then
`token_dataset` for the training set and for every model evaluated on the eval set (each with
its own tokenizer). `kubectl finetune add dataset` and `finetune-trainer check` use the same
record checks (`check_record`, `parse_file`, `preflight`). No torch or transformers at import
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

The in-memory helpers (`read_sources`, `load_raw`, `tokenize`, `to_sequences`,
`build_sequences`, `SequenceDataset`) serve small inputs (tests, the CLI's single files); the
trainer reads through `plan_data` / `token_dataset`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.packing import Collator as Collator  # re-exported: the collator of every dataset here
from finetune_trainer.packing import PackingMode, TokenDataset
from finetune_trainer.shards import ShardSet, TokenStore, build_shards, shard_key
from finetune_trainer.sources import (
    SourceFile,
    Unit,
    compression_of,
    fingerprint,
    list_files,
    read_unit,
    units_of,
    where,
)
from finetune_trainer.storage import Store, expand, open_store

log = logging.getLogger(__name__)

IGNORE = -100
MAX_REPORTED_ERRORS = 20
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class Record:
    source: str  # "file:line" for messages
    data: dict[str, Any]


@dataclass(frozen=True)
class RawData:
    train: list[Record]
    eval: list[Record]
    fingerprint: str  # sha256 over the source files' contents


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


# ---- reading and preflight ---------------------------------------------------------------------
def read_sources(
    uris: Sequence[str], spec: DatasetSpec, *, endpoint: str | None = None, region: str | None = None
) -> tuple[list[Record], str]:
    """Read every file named by the URIs (globs allowed); raise InvalidData listing bad records."""
    records: list[Record] = []
    errors: list[str] = []
    digest = hashlib.sha256()
    for uri in uris:
        matches = expand(uri, endpoint=endpoint, region=region)
        if not matches:
            errors.append(f"{uri}: no files match")
            continue
        for store, obj in matches:
            name = store.uri + obj.key
            content = store.read_bytes(obj.key)
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
            records.extend(parse_file(name, content, spec, errors))
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        raise InvalidData(
            f"dataset preflight failed: {len(errors)} bad record(s)" + (f" ({more} not shown)" if more else ""),
            details=shown,
        )
    return records, digest.hexdigest()


def parse_file(name: str, content: bytes, spec: DatasetSpec, errors: list[str]) -> list[Record]:
    """The records of one file held in memory (the CLI's uploads, small test files), checked by the
    same streaming reader the trainer uses; problems are appended to `errors` as `file:line: …`."""
    try:
        unit = Unit(SourceFile("", name, len(content), ""))
        compression_of(name)
        records = []
        for item in read_unit(unit, _BytesStore(name, content), spec):
            if item.problem is not None:
                errors.append(f"{where(unit, item.line, 0)}: {item.problem}")
            elif item.data is not None:
                records.append(Record(where(unit, item.line, 0), item.data))
    except InvalidData as exc:
        errors.append(str(exc))
        return []
    return records


class _BytesStore:
    """One file's bytes behind the one method `sources.read_unit` uses."""

    def __init__(self, name: str, content: bytes) -> None:
        self.uri = ""
        self.name = name
        self.content = content

    def open_read(self, key: str, start: int = 0) -> IO[bytes]:
        return io.BytesIO(self.content[start:])


def check_record(data: Any, spec: DatasetSpec) -> str | None:
    """Why this record cannot be used, or None. Checks what can be known without a tokenizer."""
    if not isinstance(data, dict):
        return "record is not a JSON object"
    if spec.format == "text":
        return _check_str(data, spec.text_field, "dataset.textField")
    if spec.format == "prompt-completion":
        return _check_str(data, spec.prompt_field, "dataset.promptField", allow_empty=True) or _check_str(
            data, spec.completion_field, "dataset.completionField"
        )
    messages = data.get(spec.messages_field)
    if not isinstance(messages, list) or not messages:
        return f"field {spec.messages_field!r} (dataset.messagesField) must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"{spec.messages_field}[{i}] must be an object with a string 'content'"
        if message.get("role") not in CHAT_ROLES:
            return f"{spec.messages_field}[{i}].role must be one of {sorted(CHAT_ROLES)}"
    if not spec.train_on_inputs and not any(
        m["role"] == "assistant" and m["content"].strip() for m in messages
    ):
        return "no non-empty assistant message: the loss would mask every token"
    return None


def _check_str(data: dict[str, Any], field: str, setting: str, *, allow_empty: bool = False) -> str | None:
    if field not in data:
        return f"missing field {field!r} ({setting})"
    value = data[field]
    if not isinstance(value, str):
        return f"field {field!r} must be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"field {field!r} is empty" + (" (nothing to train on)" if "completion" in setting else "")
    return None


def load_raw(
    spec: DatasetSpec,
    *,
    seed: int,
    need_train: bool = True,
    datasets_uri: str | None = None,
    endpoint: str | None = None,
    region: str | None = None,
) -> RawData:
    """Train and eval records. Eval sources: `dataset.eval`, else a registered dataset's eval/
    files, else `evalSize` records held out of train (after a seeded shuffle of the record
    order). `need_train=False` (mode Evaluate) skips reading train when the eval sources are known."""
    eval_uris: list[str] | None = list(spec.eval) if spec.eval else None
    if spec.name is not None:
        assert datasets_uri is not None
        base = datasets_uri.rstrip("/") + f"/{spec.name}/"
        train_uris = [base + "train/**"]
        if eval_uris is None and expand(base + "eval/**", endpoint=endpoint, region=region):
            eval_uris = [base + "eval/**"]
    else:
        train_uris = list(spec.train or [])
    if eval_uris is not None:
        evaluation, eval_fp = read_sources(eval_uris, spec, endpoint=endpoint, region=region)
        if not (need_train and train_uris):
            return RawData([], evaluation, hashlib.sha256(f"eval-only:{eval_fp}".encode()).hexdigest())
        train, train_fp = read_sources(train_uris, spec, endpoint=endpoint, region=region)
        return RawData(train, evaluation, hashlib.sha256((train_fp + eval_fp).encode()).hexdigest())
    train, train_fp = read_sources(train_uris, spec, endpoint=endpoint, region=region)
    if len(train) <= spec.eval_size:
        raise InvalidData(
            f"dataset.evalSize={spec.eval_size} holds out all {len(train)} training records; "
            "lower evalSize or give dataset.eval"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[: spec.eval_size])
    return RawData(
        [r for i, r in enumerate(train) if i not in held],
        [r for i, r in enumerate(train) if i in held],
        hashlib.sha256(f"{train_fp}:holdout:{spec.eval_size}:{seed}".encode()).hexdigest(),
    )


# ---- tokenization with loss masks ----------------------------------------------------------------
def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidData("the tokenizer has no EOS token to separate documents")
    return int(eos)


def tokenize(records: Sequence[Record], spec: DatasetSpec, tokenizer: Any) -> list[Example]:
    """Token ids and labels (IGNORE where no loss) of each record; InvalidData if a record ends
    up with no trained token."""
    out: list[Example] = []
    errors: list[str] = []
    for record, result in zip(records, encode_batch([r.data for r in records], spec, tokenizer), strict=True):
        if isinstance(result, str):
            errors.append(f"{record.source}: {result}")
        else:
            out.append(Example(*result))
    if errors:
        raise InvalidData(f"{len(errors)} chat record(s) cannot be templated", details=errors[:MAX_REPORTED_ERRORS])
    return out


def encode_batch(
    datas: Sequence[dict[str, Any]], spec: DatasetSpec, tokenizer: Any
) -> list[tuple[list[int], list[int]] | str]:
    """(ids, labels) of each checked record, or why it cannot be used (a chat template that
    fails on it). Text and prompt-completion records are encoded in one call per field."""
    eos = eos_id(tokenizer)
    if spec.format == "text":
        ids = _batch_encode(tokenizer, [d[spec.text_field] for d in datas], special=True)
        return [([*x, eos], [*x, eos]) for x in ids]
    if spec.format == "prompt-completion":
        prompts = _batch_encode(tokenizer, [d[spec.prompt_field] for d in datas], special=True)
        completions = _batch_encode(tokenizer, [d[spec.completion_field] for d in datas], special=False)
        pairs: list[tuple[list[int], list[int]] | str] = []
        for p, c in zip(prompts, completions, strict=True):
            prompt_labels = list(p) if spec.train_on_inputs else [IGNORE] * len(p)
            pairs.append(([*p, *c, eos], [*prompt_labels, *c, eos]))
        return pairs
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidData("dataset.format is chat but the model's tokenizer has no chat template")
    out: list[tuple[list[int], list[int]] | str] = []
    for data in datas:
        try:
            example = _chat_example(data[spec.messages_field], tokenizer, eos, spec.train_on_inputs)
            out.append((example.input_ids, example.labels))
        except ValueError as exc:
            out.append(str(exc))
    return out


def _batch_encode(tokenizer: Any, texts: list[str], *, special: bool, batch: int = 1000) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer(texts[i : i + batch], add_special_tokens=special, return_attention_mask=False)
        out.extend(list(x) for x in encoded["input_ids"])
    return out


def _template(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> list[int]:
    result = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    if hasattr(result, "keys"):
        result = result["input_ids"]
    return [int(x) for x in result]


def _chat_example(messages: list[dict[str, Any]], tokenizer: Any, eos: int, train_on_inputs: bool) -> Example:
    """Label the tokens each assistant turn adds to the rendered conversation. The template must
    render a conversation's prefix as a prefix of its rendering (true of common templates)."""
    full = _template(tokenizer, messages, generation_prompt=False)
    labels = list(full) if train_on_inputs else [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or train_on_inputs:
            continue
        start = len(_template(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        upto = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(upto)] != upto or start > len(upto):
            raise ValueError("the chat template does not render conversations prefix-consistently")
        labels[start : len(upto)] = upto[start:]
    if full[-1] != eos:
        full, labels = [*full, eos], [*labels, IGNORE if not train_on_inputs and labels[-1] == IGNORE else eos]
    if all(x == IGNORE for x in labels):
        raise ValueError("every token is masked (no assistant tokens)")
    return Example(full, labels)


# ---- sequences ---------------------------------------------------------------------------------
def to_sequences(examples: Sequence[Example], *, length: int, packing: bool) -> list[Example]:
    """Fixed-length blocks (packing; last block unpadded here, padded by the collator) or one
    sequence per example split into chunks of at most `length`. Sequences without any trained
    token are dropped (they carry no loss)."""
    out: list[Example] = []
    if packing:
        ids: list[int] = []
        labels: list[int] = []
        for example in examples:
            ids.extend(example.input_ids)
            labels.extend(example.labels)
        for i in range(0, len(ids), length):
            out.append(Example(ids[i : i + length], labels[i : i + length]))
    else:
        for example in examples:
            for i in range(0, len(example.input_ids), length):
                out.append(Example(example.input_ids[i : i + length], example.labels[i : i + length]))
    return [s for s in out if _trained_tokens(s.labels) > 0]


def _trained_tokens(labels: Sequence[int]) -> int:
    """Tokens that contribute to the loss: label at position t is predicted from position t-1."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.bos_token_id], default=str
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


def build_sequences(
    records: Sequence[Record],
    spec: DatasetSpec,
    tokenizer: Any,
    *,
    length: int,
    cache_dir: Path | None,
    data_fingerprint: str,
    split: str,
) -> list[Example]:
    """Tokenize + pack, reusing the on-disk cache when the data, tokenizer and settings match."""
    key = hashlib.sha256(
        json.dumps(
            [data_fingerprint, split, tokenizer_fingerprint(tokenizer), spec.model_dump(mode="json"), length]
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir / f"tokens-{split}-{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        cached = json.loads(path.read_text())
        return [Example(ids, labels) for ids, labels in cached]
    sequences = to_sequences(tokenize(records, spec, tokenizer), length=length, packing=spec.packing)
    if not sequences:
        raise InvalidData(f"the {split} set has no trained tokens after tokenization")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps([[s.input_ids, s.labels] for s in sequences]))
        tmp.replace(path)
    return sequences


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
        parts = [fingerprint(self.train_files), fingerprint(self.eval_files) if self.eval_files is not None else "holdout"]
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
        return open_store(self.remote_uri, endpoint=self.endpoint, region=self.region) if self.remote_uri else None


_STORES: dict[Path, TokenStore] = {}


def shards_for(files: Sequence[SourceFile], spec: DatasetSpec, tokenizer: Any, settings: ShardSettings) -> ShardSet:
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
    """Records per file of a preflight that found no problem."""

    records: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.records.values())


def preflight(files: Sequence[SourceFile], spec: DatasetSpec, *, endpoint: str | None = None, region: str | None = None) -> PreflightReport:
    """Stream every record of the files and check it (no tokenizer): InvalidData lists the first
    MAX_REPORTED_ERRORS problems as `file:line: …` and counts them all. One record in memory."""
    shown: list[str] = []
    total = 0
    counts: dict[str, int] = {}
    line_offsets: dict[str, int] = {}
    stores: dict[str, Store] = {}
    for unit in units_of(files):
        store = stores.get(unit.file.store_uri) or stores.setdefault(
            unit.file.store_uri, open_store(unit.file.store_uri, endpoint=endpoint, region=region)
        )
        offset = line_offsets.get(unit.file.name, 0)
        last = 0
        for item in read_unit(unit, store, spec):
            last = max(last, item.line)
            if item.problem is not None:
                total += 1
                if len(shown) < MAX_REPORTED_ERRORS:
                    shown.append(f"{where(unit, item.line, offset)}: {item.problem}")
            elif item.data is not None:
                counts[unit.file.name] = counts.get(unit.file.name, 0) + 1
        line_offsets[unit.file.name] = offset + last
    if total:
        more = total - len(shown)
        raise InvalidData(
            f"dataset preflight failed: {total} bad record(s)" + (f" ({more} not shown)" if more else ""), details=shown
        )
    if not counts:
        raise InvalidData(f"no records in {len(files)} file(s)")
    return PreflightReport(counts)


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
        return sum(_trained_tokens(s.labels) for s in self.sequences)
