"""Memory per training process for a sharding strategy, world size and precision (pure, no torch).

What it counts: the bytes a process holds for the model's state — parameters, gradients and
the AdamW state (two fp32 moments per trained parameter) — after the first optimizer step.
What it leaves out, and says so: activations (they depend on micro-batch size x sequence length
and on gradient checkpointing), the CUDA context and allocator slack, and under FSDP the one
block gathered at a time (`gathered_block_bytes`, reported apart).

The rules, per parameter (N trained parameters, F frozen ones, W processes):

- full fine-tuning, data-parallel: fp32 weights 4 + fp32 gradients 4 + AdamW 8 = 16 bytes on
  every process, whatever the precision (bf16 runs keep fp32 master weights; autocast casts per
  operation);
- full fine-tuning, fsdp: the same 16 bytes, divided over the W processes (each process holds
  one 1/W slice of every tensor); bf16 then only changes the gathered block (2 bytes a weight);
- LoRA: the frozen base costs 4 bytes a weight in fp32, 2 in bf16 (no gradient, no AdamW state),
  the adapters 16 bytes a weight; under fsdp both are divided by W.

Called by the trainer (`auto` sharding, the log line at start) and by `kubectl finetune list
models`; tests/trainer/test_distributed.py checks it against the tensors a run really holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process: `state` = parameters + gradients + optimizer state."""

    parameters: int
    gradients: int
    optimizer: int
    gathered_block_bytes: int  # fsdp only: one block's full weights during its forward/backward

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def estimate(
    *,
    trained_parameters: int,
    frozen_parameters: int = 0,
    strategy: str,
    world_size: int,
    precision: str,
    largest_block_parameters: int = 0,
) -> MemoryEstimate:
    """Per-process bytes of model state for `strategy` ("data-parallel" or "fsdp"; resolve
    "auto" first with `resolve_strategy`). `frozen_parameters` is the LoRA base."""
    if strategy not in ("data-parallel", "fsdp"):
        raise ValueError(f"strategy must be data-parallel or fsdp, got {strategy!r}")
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    shards = world_size if strategy == "fsdp" else 1
    frozen_bytes = BF16 if precision == "bf16" else FP32
    parameters = _ceil_div(trained_parameters * FP32 + frozen_parameters * frozen_bytes, shards)
    gradients = _ceil_div(trained_parameters * FP32, shards)
    optimizer = _ceil_div(trained_parameters * ADAMW_STATE_BYTES, shards)
    gathered = 0
    if strategy == "fsdp":
        gathered = largest_block_parameters * (BF16 if precision == "bf16" else FP32)
    return MemoryEstimate(parameters, gradients, optimizer, gathered)


def resolve_strategy(
    requested: str, *, world_size: int, data_parallel_bytes: int, device_bytes: int | None
) -> str:
    """`auto` → fsdp when several processes share the job and data parallel would not fit in
    90 % of one device's memory (`device_bytes`; None on CPU, where memory is the node's and data
    parallel keeps its faster steps); otherwise data-parallel. An explicit choice is kept."""
    if requested != "auto":
        return requested
    if world_size > 1 and device_bytes is not None and data_parallel_bytes > 0.9 * device_bytes:
        return "fsdp"
    return "data-parallel"


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT])\s*$", re.IGNORECASE)
_SCALE = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_parameters(text: str) -> int:
    """'1.4B' → 1_400_000_000 (the catalog's human-readable sizes)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a parameter count: {text!r} (expected e.g. 135M, 1.4B)")
    return round(float(match.group(1)) * _SCALE[match.group(2).upper()])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def catalog_estimate(
    parameters: str, *, strategy: str, world_size: int, precision: str, lora: bool
) -> MemoryEstimate:
    """The estimate for a catalog entry (`CatalogModel.parameters`, e.g. "6B"), as
    `kubectl finetune list models` prints it. LoRA counts the whole model as frozen (the
    adapters are a fraction of a percent)."""
    count = parse_parameters(parameters)
    if lora:
        return estimate(
            trained_parameters=0,
            frozen_parameters=count,
            strategy=strategy,
            world_size=world_size,
            precision=precision,
        )
    return estimate(trained_parameters=count, strategy=strategy, world_size=world_size, precision=precision)
