"""The training loop of our own (the recipe shape of torchtune's distributed recipe and
torchtitan's train loop): one optimizer step at a time, for data parallel and FSDP2 alike.

What it guarantees (DESIGN of docs/trainer.md, tested in tests/trainer):
- the loss of an optimizer step is token-weighted over the whole global batch — every
  micro-batch of every process: each micro-batch contributes its summed cross-entropy divided
  by the step's total number of target tokens (one all-reduce of the count per step), so neither
  gradient accumulation nor the number of processes changes the gradient;
- the global batch of step s is a pure function of (seed, s) (`step_indices`, length-grouped
  without packing), split over the processes and their micro-batches (`rank_micro_batches`);
  the learning rate is a pure function of s (`learning_rate`); dropout is seeded per (seed,
  step, rank) — so a resumed run, also one with another number of processes, continues exactly
  where the checkpoint left off;
- every key of the collated batch except `labels` goes to the model (`position_ids` of
  document-aware packing, `attention_mask`, …); `labels` (IGNORE = -100) define the loss;
- a process whose share of a (last, partial) batch is empty still runs a forward and backward
  pass with no target tokens, since FSDP's collectives need every process.

The loop does no I/O: the recipe passes in what happens at a log, evaluation or save point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finetune_trainer.data import IGNORE


# ---- pure helpers -------------------------------------------------------------------------------
def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    return max(1, math.ceil(dataset_size / batch_size))


def total_steps(*, max_steps: int | None, epochs: float | None, dataset_size: int, batch_size: int) -> int:
    if max_steps is not None:
        return max_steps
    return max(
        1, math.ceil((epochs if epochs is not None else 1.0) * steps_per_epoch(dataset_size, batch_size))
    )


GROUP_SIZE = 50  # global batches sorted together when grouping by length (transformers' megabatch)


def step_indices(
    step: int,
    *,
    dataset_size: int,
    batch_size: int,
    seed: int,
    lengths: torch.Tensor | None = None,
) -> list[int]:
    """Dataset indices of the global batch of optimizer step `step` (0-based): the epoch's
    permutation (seeded by seed + epoch), cut into batches; the epoch's last batch may be short.

    With `lengths` (sequence lengths: length-grouped batches, as transformers'
    `LengthGroupedSampler`), the permutation is cut into groups of GROUP_SIZE batches, each group
    sorted by length (longest first) and cut into batches, which are drawn in a seeded order
    within the group; the indices of a batch come longest first, so consecutive micro-batches
    hold sequences of similar length. Every sequence still comes once per epoch, and the batch
    is still a pure function of (seed, step)."""
    per_epoch = steps_per_epoch(dataset_size, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch))
    if lengths is None:
        return order[position * batch_size : (position + 1) * batch_size].tolist()
    group, within = divmod(position, GROUP_SIZE)
    span = GROUP_SIZE * batch_size
    members = order[group * span : (group + 1) * span]
    members = members[torch.sort(lengths[members], descending=True, stable=True).indices]
    batches = -(-len(members) // batch_size)
    draw = torch.Generator().manual_seed((seed + epoch) * 1_000_003 + group)
    batch = int(torch.randperm(batches, generator=draw)[within])
    return members[batch * batch_size : (batch + 1) * batch_size].tolist()


def rank_micro_batches(
    indices: Sequence[int], *, rank: int, world_size: int, micro: int, accumulation: int
) -> list[list[int]]:
    """This process's micro-batches of a global batch: every world_size-th index from `rank`,
    cut into `accumulation` micro-batches of up to `micro` (some may be empty)."""
    mine = list(indices[rank::world_size])
    return [mine[i * micro : (i + 1) * micro] for i in range(accumulation)]


def learning_rate(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based), as transformers' schedulers give it:
    linear warmup from 0 over `warmup` steps, then constant, linear to 0 or cosine to 0 at `total`."""
    if step < warmup:
        return peak * step / max(1, warmup)
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(*, steps: int, ratio: float, total: int) -> int:
    return steps if steps else math.ceil(ratio * total)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t+1; the last position predicts nothing. Shifting the labels,
    not the logits, avoids copying the (batch, seq, vocab) logits."""
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def loss_sum(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the target tokens, their count) of one micro-batch; every key
    but `labels` is passed to the model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    targets = shifted_targets(batch["labels"])
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (targets != IGNORE).sum()


def input_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding input tokens of a batch (all of them in a padding-free batch)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups as transformers' Trainer makes them: no weight decay on biases and
    normalization weights."""
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name.endswith("bias") or "norm" in type(module).__name__.lower():
                no_decay.add(full)
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (plain if name in no_decay else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# ---- the loop ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopPlan:
    """Everything the loop needs to know about the run, fixed at setup."""

    total_steps: int
    batch_size: int  # global
    micro_batch: int
    accumulation: int
    rank: int
    world_size: int
    seed: int
    peak_lr: float
    warmup: int
    schedule: str
    max_grad_norm: float  # 0: no clipping
    log_every: int
    eval_every: int
    save_every: int
    dataset_size: int
    lengths: torch.Tensor | None = None  # sequence lengths: length-grouped batches (`step_indices`)


@dataclass(frozen=True)
class TrainLog:
    """One log point: token-weighted train loss over the window and its throughput."""

    step: int
    epoch: float
    loss: float | None
    learning_rate: float
    grad_norm: float | None
    tokens_per_second: float
    input_tokens: float
    seconds_per_step: float


@dataclass
class LoopHooks:
    """What the recipe does at the loop's points (all ranks call them; rank 0 does the I/O)."""

    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    empty_batch: Callable[[], dict[str, torch.Tensor]]  # one token, no target: a process's empty share
    on_step: Callable[[int, float], None]
    on_log: Callable[[TrainLog], None]
    evaluate: Callable[[int], None]
    save: Callable[[int], None]
    stop_requested: Callable[[], bool]
    measure: Callable[[], None]  # once, after the first optimizer step (gradients still held)


def loss_scaler(device: torch.device, autocast_dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 (GPU only) scales the loss against gradient underflow; bf16 and fp32 need no scaler.
    Its state (the scale, the growth tracker) is part of a checkpoint (`checkpoints.save_sharded`)."""
    return torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None


class TrainingLoop:
    """Steps `start_step + 1 … plan.total_steps`; returns the last step done and whether a stop
    request ended it early (after saving a checkpoint). `scaler`: the fp16 loss scaler
    (`loss_scaler`), None otherwise."""

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        plan: LoopPlan,
        hooks: LoopHooks,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        sync_context: Callable[[bool], Any],
        scaler: torch.amp.GradScaler | None,
    ):
        self.model = model
        self.scaler = scaler
        self.optimizer = optimizer
        self.plan = plan
        self.hooks = hooks
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.sync_context = sync_context  # sync_context(last_micro_batch) around each backward
        self._window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, targets, inputs
        self._window_started = time.perf_counter()
        self._window_first_step = 0
        self._measured = False

    def run(self, start_step: int) -> tuple[int, bool]:
        plan = self.plan
        self.model.train()
        self._window_first_step = start_step
        step = start_step
        while step < plan.total_steps:
            lr = learning_rate(
                step, peak=plan.peak_lr, warmup=plan.warmup, total=plan.total_steps, schedule=plan.schedule
            )
            grad_norm = self.train_step(step, lr)
            step += 1
            epoch = step / steps_per_epoch(plan.dataset_size, plan.batch_size)
            self.hooks.on_step(step, epoch)
            stop = self.hooks.stop_requested()
            if step % plan.log_every == 0 or step == plan.total_steps or stop:
                self.hooks.on_log(self._close_window(step, epoch, lr, grad_norm))
            if step % plan.eval_every == 0 or step == plan.total_steps:
                self.hooks.evaluate(step)
            if step % plan.save_every == 0 or step == plan.total_steps or stop:
                self.hooks.save(step)
            if stop:
                return step, True
        return step, False

    def train_step(self, step: int, lr: float) -> float | None:
        """One optimizer step over the global batch of `step`; returns the gradient norm."""
        plan = self.plan
        indices = step_indices(
            step,
            dataset_size=plan.dataset_size,
            batch_size=plan.batch_size,
            seed=plan.seed,
            lengths=plan.lengths,
        )
        micro_indices = rank_micro_batches(
            indices,
            rank=plan.rank,
            world_size=plan.world_size,
            micro=plan.micro_batch,
            accumulation=plan.accumulation,
        )
        batches = [
            (self._to_device(self.hooks.collate(ids) if ids else None), bool(ids)) for ids in micro_indices
        ]
        targets = (
            torch.stack([(shifted_targets(b["labels"]) != IGNORE).sum() for b, _ in batches]).sum().double()
        )
        denominator = _all_reduce_sum(targets).clamp(min=1).to(torch.float32)
        # seeded per (seed, step, rank): a resumed run draws the same dropout masks
        torch.manual_seed((plan.seed * 1_000_003 + step) * 1009 + plan.rank)
        for number, (batch, real) in enumerate(batches):
            with self.sync_context(number == len(batches) - 1):
                with self._autocast():
                    total, count = loss_sum(self.model, batch)
                # DDP and FSDP average gradients over processes; the denominator counts them all
                loss = total / denominator * plan.world_size
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if real:
                self._window += torch.stack(
                    [total.detach().double(), count.double(), input_tokens(batch).double()]
                )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if not self._measured:
            self.hooks.measure()
            self._measured = True
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _clip(self) -> float | None:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.plan.max_grad_norm if self.plan.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # a DTensor under FSDP: the norm over all shards
        return float(norm)

    def _close_window(self, step: int, epoch: float, lr: float, grad_norm: float | None) -> TrainLog:
        window = _all_reduce_sum(self._window.clone()).cpu()
        elapsed = max(time.perf_counter() - self._window_started, 1e-9)
        steps = max(1, step - self._window_first_step)
        self._window.zero_()
        self._window_started, self._window_first_step = time.perf_counter(), step
        return TrainLog(
            step=step,
            epoch=epoch,
            loss=float(window[0] / window[1]) if window[1] > 0 else None,
            learning_rate=lr,
            grad_norm=grad_norm,
            tokens_per_second=float(window[2]) / elapsed,
            input_tokens=float(window[2]),
            seconds_per_step=elapsed / steps,
        )

    def _to_device(self, batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if batch is None:  # this process's share of the batch is empty
            batch = self.hooks.empty_batch()
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self) -> Any:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        )


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        torch.distributed.all_reduce(tensor)
    return tensor
