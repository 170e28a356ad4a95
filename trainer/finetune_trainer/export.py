"""Export `final/` as a plain Hugging Face folder: safetensors weights (sharded with
`model.safetensors.index.json` above `max_shard_bytes`), config, tokenizer; for LoRA runs also
`final/adapter/` and, when merging, the merged model.

Under FSDP the full weights exist on no process. They are gathered one tensor at a time
(`DTensor.full_tensor()`, a collective every process joins in the same order), and rank 0
writes them out shard file by shard file: rank 0 never holds more than its own slices plus one
shard file's worth of full tensors — never two full copies. A LoRA run gathers only the
adapters (small); rank 0 then merges them into the base model read from its folder on the CPU
(one copy) with peft's `merge_and_unload`.

Called by the recipe (`train.py`) on every process at the end of a run; only rank 0 writes.
The folder loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default (5 GB)
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def full_tensors(model: nn.Module, *, only: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on the CPU) for every state-dict entry, one at a time, in order; a
    tied weight once, under its first name. Every process must iterate to the end (the gather
    is a collective); the tensors are meaningful on rank 0. `only`: names containing it."""
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(parameter), name)
    aliases = {
        name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name
    }
    for name, value in model.state_dict().items():
        if name in aliases or (only is not None and only not in name):
            continue
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        yield name, full.detach().to("cpu")


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    folder: Path,
    *,
    write: bool,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Consume `tensors` (on every process), and on the writing process store them as
    model.safetensors, or as numbered shards of at most `max_shard_bytes` plus the index.
    Returns the file names written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, list[str]]] = []  # written shard, its keys
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            path = folder / f"part-{len(files):05d}.safetensors"
            save_file(pending, str(path), metadata={"format": "pt"})
            files.append((path, list(pending)))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if not write:
            continue  # still consumed: the gather is a collective
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
    if not write:
        return []
    flush()
    if len(files) == 1:
        files[0][0].rename(folder / WEIGHTS)
        return [WEIGHTS]
    weight_map: dict[str, str] = {}
    names = []
    for number, (path, keys) in enumerate(files, start=1):
        final = path.with_name(f"model-{number:05d}-of-{len(files):05d}.safetensors")
        path.rename(final)
        names.append(final.name)
        weight_map.update(dict.fromkeys(keys, final.name))
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)
    )
    return [*names, INDEX]


def export_full(
    model: nn.Module, folder: Path, *, is_main: bool, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Full fine-tuning: every weight gathered and written (fp32 master weights)."""
    write_safetensors(full_tensors(model), folder, write=is_main, max_shard_bytes=max_shard_bytes)
    if is_main:
        _save_config(model, folder)


def export_lora(
    model: nn.Module,
    folder: Path,
    *,
    is_main: bool,
    base_folder: Path,
    lora: Any,
    merge: bool,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """LoRA: final/adapter/ (peft format); with `merge`, final/ holds the merged model."""
    adapters = dict(full_tensors(model, only="lora_"))
    if not is_main:
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    missing, unexpected = peft_model.load_state_dict(adapters, strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise RuntimeError(f"LoRA export: adapter keys do not match (unexpected {unexpected[:3]})")
    peft_model.save_pretrained(str(folder / "adapter"))
    if merge:
        merged: Any = peft_model.merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_bytes)


def _save_config(model: nn.Module, folder: Path) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        try:
            generation.save_pretrained(folder)
        except ValueError as exc:  # an inconsistent generation config is not the export's business
            log.warning("generation config not exported: %s", exc)
