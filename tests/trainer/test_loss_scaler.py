"""fp16's loss scaler state travels with the DCP checkpoint (`checkpoints.save_sharded` /
`load_sharded`), so a resumed fp16 run continues at the scale it had reached instead of
restarting at the initial one.

fp16 training needs a GPU (the trainer refuses it on the CPU), but `torch.amp.GradScaler("cpu")`
is the same class: these tests drive it through the real training loop on fp32 losses and the
real checkpoint functions, in a one-process gloo group as the recipe makes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import checkpoints as ckpt
from finetune_trainer import wrapping
from finetune_trainer.loop import LoopHooks, LoopPlan, TrainingLoop, decay_groups

STEPS = 3


@pytest.fixture(autouse=True)
def _process_group() -> Iterator[None]:
    """The recipe's single-process group (train.Recipe.process_group)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _scaler() -> torch.amp.GradScaler:
    # grows every 2 overflow-free steps: 3 steps leave the scale doubled and the tracker at 1
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def _loop(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingLoop:
    vocab = wrapping.unwrap(model).config.vocab_size

    def collate(ids: list[int]) -> dict[str, torch.Tensor]:
        batch = torch.stack([torch.arange(i, i + 16) % vocab for i in ids])
        return {"input_ids": batch, "labels": batch.clone()}

    plan = LoopPlan(total_steps=10, batch_size=2 * world_size, micro_batch=2, accumulation=1, rank=rank,
                    world_size=world_size, seed=0,
                    peak_lr=1e-3, warmup=0, schedule="constant", max_grad_norm=1.0, log_every=10**6,
                    eval_every=10**6, save_every=10**6, dataset_size=8)  # fmt: skip
    nothing = lambda *_: None  # noqa: E731
    hooks = LoopHooks(collate=collate, empty_batch=lambda: collate([0]), on_step=nothing, on_log=nothing,
                      evaluate=nothing, save=nothing, stop_requested=lambda: False, measure=lambda: None)  # fmt: skip
    return TrainingLoop(model, optimizer, plan, hooks, device=torch.device("cpu"), autocast_dtype=None,
                        sync_context=lambda _: contextlib.nullcontext(), scaler=scaler)  # fmt: skip


def _trained(
    folder: Path, scaler: torch.amp.GradScaler | None, steps: int = STEPS
) -> tuple[Any, Any, TrainingLoop]:
    model = _model(folder)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-3, foreach=True)
    loop = _loop(model, optimizer, scaler)
    for step in range(steps):
        loop.train_step(step, 1e-3)
    return model, optimizer, loop


def _fresh(folder: Path) -> tuple[Any, torch.optim.Optimizer]:
    model = _model(folder)
    return model, torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-3, foreach=True)


def _save(model: Any, optimizer: Any, local: Path, scaler: torch.amp.GradScaler | None) -> None:
    ckpt.save_sharded(model, optimizer, local, train_state={"step": STEPS}, adapters_only=False, is_main=True,
                      scaler=scaler)  # fmt: skip


def _same_weights(a: Any, b: Any) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_the_scaler_state_round_trips_and_the_resumed_run_continues_its_scale(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = model_dir("llama")
    scaler = _scaler()
    model, optimizer, loop = _trained(folder, scaler)
    saved = scaler.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0**11, 1), "the scale moved away from its start"
    _save(model, optimizer, tmp_path / "checkpoint", scaler)
    assert ckpt.has_scaler_state(tmp_path / "checkpoint")

    restored = torch.amp.GradScaler("cpu")  # the trainer's defaults: scale 65536, growth every 2000 steps
    model2, optimizer2 = _fresh(folder)
    state = ckpt.load_sharded(
        model2, optimizer2, tmp_path / "checkpoint", adapters_only=False, scaler=restored
    )

    assert state["step"] == STEPS
    assert restored.state_dict() == saved
    assert _same_weights(model, model2)
    # one more step each: the resumed run grows the scale exactly when the uninterrupted one does
    resumed = _loop(model2, optimizer2, restored)
    loop.train_step(STEPS, 1e-3)
    resumed.train_step(STEPS, 1e-3)
    assert restored.get_scale() == scaler.get_scale() == 2.0**12
    assert _same_weights(model, model2)


def test_a_checkpoint_without_scaler_state_loads_with_and_without_a_scaler(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """bf16/fp32 runs (and earlier trainer versions) write no scaler state: an fp16 run resuming
    such a checkpoint starts its scale afresh; a run without a scaler loads it as always."""
    folder = model_dir("llama")
    model, optimizer, _ = _trained(folder, None)
    _save(model, optimizer, tmp_path / "checkpoint", None)
    assert not ckpt.has_scaler_state(tmp_path / "checkpoint")

    scaler = torch.amp.GradScaler("cpu")
    model2, optimizer2 = _fresh(folder)
    ckpt.load_sharded(model2, optimizer2, tmp_path / "checkpoint", adapters_only=False, scaler=scaler)
    assert scaler.state_dict() == torch.amp.GradScaler("cpu").state_dict()
    assert _same_weights(model, model2)

    model3, optimizer3 = _fresh(folder)
    ckpt.load_sharded(model3, optimizer3, tmp_path / "checkpoint", adapters_only=False)
    assert _same_weights(model, model3)
    assert optimizer3.state_dict()["state"][0]["step"] == STEPS


def test_a_checkpoint_with_scaler_state_loads_without_a_scaler(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """An fp16 checkpoint resumes or evaluates in a run without a scaler (its weights and AdamW state)."""
    folder = model_dir("llama")
    scaler = _scaler()
    model, optimizer, _ = _trained(folder, scaler)
    _save(model, optimizer, tmp_path / "checkpoint", scaler)

    model2, optimizer2 = _fresh(folder)
    ckpt.load_sharded(model2, optimizer2, tmp_path / "checkpoint", adapters_only=False)
    assert _same_weights(model, model2)
    model3 = _model(folder)
    ckpt.load_weights(model3, tmp_path / "checkpoint")  # mode Evaluate on a checkpoint
    assert _same_weights(model, model3)


def _two_ranks(rank: int, folder: str, store: str, out: str) -> None:
    """One of two gloo processes: DDP training with a scaler, a checkpoint saved by both, then
    loaded by both into fresh scalers; each rank writes what it held and what it loaded."""
    import json

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = wrapping.replicate(_model(Path(folder)), device=torch.device("cpu"))
        optimizer = torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-3, foreach=True)
        scaler = _scaler()
        loop = _loop(model, optimizer, scaler, rank=rank, world_size=2)
        for step in range(STEPS):
            loop.train_step(step, 1e-3)
        local = Path(out) / "checkpoint"  # one folder both ranks write into, as after the download
        ckpt.save_sharded(model, optimizer, local, train_state={"step": STEPS}, adapters_only=False, is_main=rank == 0,
                          scaler=scaler)  # fmt: skip
        torch.distributed.barrier()
        fresh = torch.amp.GradScaler("cpu")
        model2 = wrapping.replicate(_model(Path(folder)), device=torch.device("cpu"))
        optimizer2 = torch.optim.AdamW(decay_groups(model2, 0.0), lr=1e-3, foreach=True)
        ckpt.load_sharded(model2, optimizer2, local, adapters_only=False, scaler=fresh)
        report = {"held": scaler.state_dict(), "loaded": fresh.state_dict()}
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_store_one_scaler_state_and_every_rank_restores_it(
    model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Data parallel on 2 processes: every rank's scaler sees the same reduced gradients, DCP
    stores the state once, and every rank — and a 1-process run resuming it — restores the same."""
    import json

    import torch.multiprocessing as mp

    folder = model_dir("llama")
    torch.distributed.destroy_process_group()  # this process joins no group of the two
    try:
        mp.spawn(_two_ranks, args=(str(folder), str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    finally:
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    held = reports[0]["held"]
    assert (held["scale"], held["_growth_tracker"]) == (2.0**11, 1)
    assert [r["held"] for r in reports] == [r["loaded"] for r in reports] == [held, held]
    scaler = torch.amp.GradScaler("cpu")
    model, optimizer = _fresh(folder)
    ckpt.load_sharded(
        model, optimizer, tmp_path / "checkpoint", adapters_only=False, scaler=scaler
    )  # resharded 2 → 1
    assert scaler.state_dict() == held
