"""The metric definitions (docs/trainer.md, Metrics) and the evaluation loop that applies them.

- eval loss: summed cross-entropy over all non-masked target tokens ÷ their count, pooled over
  processes (all-reduce of the sums, not a mean of per-process means);
- token accuracy: argmax prediction equals the target, over the same tokens;
- perplexity: exp(eval loss).

Called by the trainer for step 0, every N steps, the final step and every baseline model.
Each process evaluates its own shard (indices rank, rank+world, …; no padding or duplication).
Every process runs the same number of forward passes (a process whose shard is shorter runs a
pass with no target tokens): under FSDP each forward pass is a collective. Every key of the
collated batch but `labels` goes to the model (e.g. `position_ids` of document-aware packing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finetune_trainer.data import IGNORE, Collator, SequenceDataset
from finetune_trainer.packing import TokenDataset


@dataclass(frozen=True)
class TokenStats:
    loss_sum: float
    correct: int
    tokens: int

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(
            self.loss_sum + other.loss_sum, self.correct + other.correct, self.tokens + other.tokens
        )


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    perplexity: float
    tokens: int


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """Sums for one batch: logits [B, T, V] predict labels shifted by one ([B, T], IGNORE = no loss)."""
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    correct = ((shifted_logits.argmax(dim=-1) == targets) & mask).sum()
    return TokenStats(float(losses), int(correct), int(mask.sum()))


def finalize(stats: TokenStats) -> EvalResult:
    if stats.tokens == 0:
        raise ValueError("no evaluated tokens")
    loss = stats.loss_sum / stats.tokens
    return EvalResult(
        loss=loss, accuracy=stats.correct / stats.tokens, perplexity=_safe_exp(loss), tokens=stats.tokens
    )


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def all_reduce_stats(stats: TokenStats) -> TokenStats:
    """Pool the sums over every process (float64 for the loss, exact integer counts)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    buf = torch.tensor([stats.loss_sum, float(stats.correct), float(stats.tokens)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        buf = buf.cuda()
    torch.distributed.all_reduce(buf)
    return TokenStats(float(buf[0]), round(float(buf[1])), round(float(buf[2])))


@torch.no_grad()
def evaluate_model(
    model: Any,
    dataset: TokenDataset | SequenceDataset,
    *,
    collator: Collator,
    micro_batch: int,
    max_batches: int | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Evaluate this process's shard and pool the sums over all processes."""
    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world_size)  # streamed: one batch read at a time
    longest_shard = -(-len(dataset) // world_size)  # rank 0's
    batches = -(-longest_shard // micro_batch)
    if max_batches is not None:
        batches = min(batches, max_batches)
    stats = TokenStats(0.0, 0, 0)
    for number in range(batches):
        items = [dataset[i] for i in indices[number * micro_batch : (number + 1) * micro_batch]]
        if not items:  # keep step with the other processes; counts no token
            first: dict[str, Any] = dict(dataset[0])
            items = [{**first, "labels": [IGNORE] * len(first["labels"])}]
        batch = {k: v.to(device) for k, v in collator(items).items()}
        logits = model(
            **{k: v for k, v in batch.items() if k != "labels"}
        ).logits  # every input the collator made
        stats = stats + token_stats(logits, batch["labels"])
    if was_training:
        model.train()
    return finalize(all_reduce_stats(stats))
