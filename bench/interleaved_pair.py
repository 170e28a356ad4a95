"""One round of the interleaved trainer benchmark: two trainers in one process, taking turns.

finetune-trainer (in the main thread, through its console entry point) and the plain Hugging Face
Trainer script (bench/plain_hf_trainer.py, in a second thread) train the same model on the same
data in the same process, one optimizer step each in turn: while one steps, the other waits on a
condition variable and uses no CPU. So both see the same process, the same allocator, the same
neighbours on the host and the same minute, step for step; only what each trainer does per step
differs. Each step is timed from the moment a trainer gets its turn to its `on_step_end`, which
includes its logging and callbacks of the step before.

With `--sides plain-1,plain-2` (or `plain-2,plain-1`) both sides are the plain script: the
instrument measured against itself, plain-1 standing where ours stands (in the main thread, and
with `--shared-model` the side that loads the model). With `--shared-model` both sides train one
model instance, each with its own optimizer, data and callbacks, so that where the weights happen
to lie in memory cannot favour one side; their optimizer steps then alternate on the same weights.

Prints one JSON line: {"sides": [first, second], "seconds": {side: [seconds of step 1, 2, …]}}.
Run by bench/trainer_bench.py --interleaved; by hand:

    python bench/interleaved_pair.py --sides ours,plain --config ours.json \\
        --model DIR --train FILE --eval FILE --steps 12 --seq 128 --batch 4 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_hf_trainer  # a sibling script, not a package


class Turns:
    """Two named trainers take turns, one optimizer step each, starting together."""

    def __init__(self, first: str, second: str) -> None:
        self.names = (first, second)
        self.turn = first
        self.ready: set[str] = set()
        self.done: set[str] = set()
        self.seconds: dict[str, list[float]] = {first: [], second: []}
        self._changed = threading.Condition()

    def _other(self, name: str) -> str:
        return self.names[1] if name == self.names[0] else self.names[0]

    def wait_for_turn(self, name: str) -> None:
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._other(name) in self.done or (self.turn == name and self.ready == set(self.names))
                )
            )

    def arrive(self, name: str) -> None:
        with self._changed:
            self.ready.add(name)
            self._changed.notify_all()

    def hand_over(self, name: str) -> None:
        with self._changed:
            self.turn = self._other(name)
            self._changed.notify_all()

    def leave(self, name: str) -> None:
        """Also called when a side fails, so that the other never waits for it."""
        with self._changed:
            self.done.add(name)
            self.ready.add(name)
            self.turn = self._other(name)
            self._changed.notify_all()

    def callback(self, name: str) -> TrainerCallback:
        return _TurnTaker(self, name)


class _TurnTaker(TrainerCallback):
    def __init__(self, turns: Turns, name: str) -> None:
        self.turns, self.name, self.started = turns, name, 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.turns.arrive(self.name)
        self.turns.wait_for_turn(self.name)
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.turns.seconds[self.name].append(time.perf_counter() - self.started)
        self.turns.hand_over(self.name)
        self.turns.wait_for_turn(self.name)
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.turns.leave(self.name)


class SharedModel:
    """With --shared-model: the side set up first offers the model it loaded, the other takes it."""

    def __init__(self, shared: bool) -> None:
        self.shared, self.model = shared, None

    def offer(self, model: Any) -> None:
        if self.shared and self.model is None:
            self.model = model


def run_plain(
    args: argparse.Namespace, name: str, turns: Turns, built: Callable[[], None], shared: SharedModel
) -> None:
    trainer = plain_hf_trainer.make_trainer(
        argparse.Namespace(**{**vars(args), "out": f"{args.out}/{name}"}),
        [turns.callback(name)],
        shared.model,
    )
    if shared.model is not None and trainer.model is not shared.model:
        raise RuntimeError("--shared-model: the plain Trainer replaced the model it was given")
    shared.offer(trainer.model)
    built()
    trainer.evaluate()  # as the plain script does: step-0 evaluation, then training
    trainer.train()


def run_ours(config: str, turns: Turns, built: Callable[[], None], shared: SharedModel) -> None:
    from finetune_trainer import loop as ours
    from finetune_trainer.cli import main

    # The one change to finetune-trainer: its training loop also takes turns, timing each step
    # from its turn to its `on_step` hook (where the Trainer's `on_step_end` stands).
    construct = ours.TrainingLoop.__init__

    def with_turns(self: Any, *a: Any, **kw: Any) -> None:
        construct(self, *a, **kw)
        started = [0.0]
        on_step, run = self.hooks.on_step, self.run

        def timed_step(step: int, epoch: float) -> None:
            on_step(step, epoch)
            turns.seconds["ours"].append(time.perf_counter() - started[0])
            turns.hand_over("ours")
            turns.wait_for_turn("ours")
            started[0] = time.perf_counter()

        def run_in_turns(start: int) -> tuple[int, bool]:
            shared.offer(self.model)
            built()  # its model is loaded and evaluated at step 0 by now
            turns.arrive("ours")
            turns.wait_for_turn("ours")
            started[0] = time.perf_counter()
            try:
                return run(start)  # type: ignore[no-any-return]
            finally:
                turns.leave("ours")

        self.hooks.on_step, self.run = timed_step, run_in_turns

    ours.TrainingLoop.__init__ = with_turns  # type: ignore[method-assign]
    code = main(["--config", config])
    if code != 0:
        raise SystemExit(f"finetune-trainer exited with {code}")


def main() -> None:
    p = plain_hf_trainer.parser()
    p.add_argument(
        "--sides",
        default="ours,plain",
        help="who steps first, who second: ours,plain / plain,ours / plain-1,plain-2 / plain-2,plain-1",
    )
    p.add_argument("--config", help="finetune-trainer config (JSON) for the side 'ours'")
    p.add_argument("--shared-model", action="store_true", help="both sides train one model instance")
    args = p.parse_args()
    names = tuple(args.sides.split(","))
    if sorted(names) not in (["ours", "plain"], ["plain-1", "plain-2"]):
        raise SystemExit(
            f"--sides: {args.sides!r}; one of ours,plain / plain,ours / plain-1,plain-2 / plain-2,plain-1"
        )
    if "ours" in names and not args.config:
        raise SystemExit("--config: required when --sides includes ours (a finetune-trainer config file)")
    # ours, or plain-1 in its place, runs in the main thread: ours installs a SIGTERM handler,
    # which only the main thread can. With --shared-model it also loads the model.
    in_main = "ours" if "ours" in names else "plain-1"
    in_thread = next(name for name in names if name != in_main)
    turns = Turns(*names)
    # The sides are set up one after the other, the first side's first (so the order swaps with
    # the step order; with --shared-model the side that loads the model goes first), and neither
    # goes on until both Trainers exist: transformers loads models under process-wide patches of
    # torch (meta-device initialisation), and every TrainingArguments resets the process-wide
    # accelerate state that the other Trainer uses.
    shared = SharedModel(args.shared_model)
    set_up_first = in_main if args.shared_model else names[0]
    built = {name: threading.Event() for name in names}

    def when_built(name: str) -> Callable[[], None]:
        def wait_for_both() -> None:
            built[name].set()
            for event in built.values():
                event.wait()

        return wait_for_both

    failures: list[BaseException] = []

    def side(name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                if name != set_up_first:
                    built[set_up_first].wait()
                if name == "ours":
                    run_ours(args.config, turns, when_built(name), shared)
                else:
                    run_plain(args, name, turns, when_built(name), shared)
            except BaseException as exc:  # reported below; the other side must not wait for it
                failures.append(exc)
            finally:
                built[name].set()
                turns.leave(name)

        return run

    worker = threading.Thread(target=side(in_thread), name=in_thread)
    worker.start()
    side(in_main)()
    worker.join()
    if failures:
        raise SystemExit(f"a side failed: {failures[0]!r}")
    print("PAIR " + json.dumps({"sides": list(names), "seconds": turns.seconds}), flush=True)


if __name__ == "__main__":
    main()
