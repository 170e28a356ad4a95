"""One record of a dataset: whether it can be used, and its tokens with their loss mask.

`check_record` says what is wrong with a record without a tokenizer (read by `sources` as it
streams, so a bad record is reported with its file and line); `encode_batch` tokenizes checked
records in batches with the fast tokenizer and labels the tokens that carry loss (all of a text
document; a completion and its EOS; a chat's assistant turns). Called by `sources`, `shards` and
`data`; the tokenizer is passed in, nothing is imported from torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData

IGNORE = -100
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


# ---- reading and preflight ---------------------------------------------------------------------
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


# ---- tokenization with loss masks ----------------------------------------------------------------
def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidData("the tokenizer has no EOS token to separate documents")
    return int(eos)


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
        full, labels = (
            [*full, eos],
            [*labels, IGNORE if not train_on_inputs and labels[-1] == IGNORE else eos],
        )
    if all(x == IGNORE for x in labels):
        raise ValueError("every token is masked (no assistant tokens)")
    return Example(full, labels)
