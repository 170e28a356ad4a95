"""Data: read records, preflight them, tokenize with loss masks, pack into blocks, cache.

Called by the training recipe (`train.py`) for the training set and for every model evaluated
on the eval set (each with its own tokenizer), and by `kubectl finetune add dataset`
(`parse_file`, the same preflight): so no torch or transformers at import time. The only I/O is
reading source files through `storage` and the tokenization cache on local disk.

Formats (DatasetSpec.format):
- text: JSONL `{"<textField>": str}` or `.txt` files (one document per file); loss on all tokens.
- prompt-completion: JSONL `{"<promptField>": str, "<completionField>": str}`; loss on the
  completion and the EOS token only (unless trainOnInputs).
- chat: JSONL `{"<messagesField>": [{"role", "content"}, …]}` rendered with the tokenizer's chat
  template; loss only on assistant turns (their content and end-of-turn tokens).

Every example ends with the EOS token, which separates documents when packing. Packing
concatenates examples and cuts blocks of sequenceLength tokens; the last partial block is padded,
never dropped. Without packing, an example longer than sequenceLength is split into several
sequences, never truncated. Packed blocks attend across document boundaries (the EOS token is the
separator), as run_clm does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.storage import expand

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
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        errors.append(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})")
        return []
    if name.endswith(".txt"):
        if spec.format != "text":
            errors.append(f"{name}: .txt files hold plain text, but dataset.format is {spec.format}")
            return []
        if not text.strip():
            errors.append(f"{name}: empty file")
            return []
        return [Record(name, {spec.text_field: text})]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: invalid JSON ({exc.msg})")
            continue
        problem = check_record(data, spec)
        if problem:
            errors.append(f"{where}: {problem}")
        else:
            records.append(Record(where, data))
    if not records and not errors:
        errors.append(f"{name}: no records")
    return records


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
    eos = eos_id(tokenizer)
    if spec.format == "text":
        texts = [r.data[spec.text_field] for r in records]
        ids = _batch_encode(tokenizer, texts, special=True)
        return [Example([*x, eos], [*x, eos]) for x in ids]
    if spec.format == "prompt-completion":
        prompts = _batch_encode(tokenizer, [r.data[spec.prompt_field] for r in records], special=True)
        completions = _batch_encode(tokenizer, [r.data[spec.completion_field] for r in records], special=False)
        out = []
        for p, c in zip(prompts, completions, strict=True):
            prompt_labels = list(p) if spec.train_on_inputs else [IGNORE] * len(p)
            out.append(Example([*p, *c, eos], [*prompt_labels, *c, eos]))
        return out
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidData("dataset.format is chat but the model's tokenizer has no chat template")
    errors: list[str] = []
    out = []
    for record in records:
        try:
            out.append(_chat_example(record.data[spec.messages_field], tokenizer, eos, spec.train_on_inputs))
        except ValueError as exc:
            errors.append(f"{record.source}: {exc}")
    if errors:
        raise InvalidData(f"{len(errors)} chat record(s) cannot be templated", details=errors[:MAX_REPORTED_ERRORS])
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


@dataclass
class Collator:
    """Pads a batch to its longest sequence: pad id in inputs, IGNORE in labels, 0 in the mask."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
