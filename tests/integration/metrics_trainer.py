"""A stand-in trainer that serves the real trainer's exporter (finetune_trainer.telemetry).

Run by the process node as a FineTuneJob's container command in tests/integration/test_prometheus.py.
Rank 0 serves `/progress` and `/metrics` with `telemetry.serve` — the same registry, series names
and HTTP handler as the real trainer — and feeds them what the training loop feeds them: step,
train loss, learning rate and throughput every step (through `Progress.update`), an evaluation
every evaluation.everySteps (`Progress.add_evaluation`), a checkpoint's upload time every
checkpoints.everySteps (the gauge train.py sets). One step every 0.5 s, no torch; SIGTERM ends it
with the Terminated summary of the trainer contract.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from finetune_trainer import contract
from finetune_trainer.config import TrainerConfig
from finetune_trainer.telemetry import Progress, serve

SECONDS_PER_STEP = 0.5


def main() -> None:
    config = TrainerConfig.from_file(contract.config_path())
    rank = int(os.environ.get("PET_NODE_RANK", "0"))
    total = config.hyperparameters.max_steps or 1000
    progress = Progress()
    if rank == 0:
        serve(progress, host=contract.bind_address(), port=contract.progress_port())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    progress.update(phase="Training", step=0, totalSteps=total)
    step = 0
    while step < total and not stop.wait(SECONDS_PER_STEP):
        step += 1
        progress.update(
            step=step,
            trainLoss=round(3.0 - 1.4 * step / total, 4),
            learningRate=1e-4,
            tokensPerSecond=1000.0,
            etaSeconds=(total - step) * SECONDS_PER_STEP,
        )
        if step % config.evaluation.every_steps == 0:
            loss = 3.0 - 1.5 * step / total
            progress.add_evaluation(
                {
                    "step": step,
                    "loss": loss,
                    "accuracy": 0.4 + 0.2 * step / total,
                    "perplexity": 2.718281828**loss,
                }
            )
        if step % config.checkpoints.every_steps == 0:
            progress.metrics.checkpoint_seconds.set(0.25)
    summary = {
        "phase": "Terminated" if stop.is_set() else "Succeeded",
        "exitCode": contract.EXIT_TERMINATED if stop.is_set() else contract.EXIT_OK,
        "reason": "Terminated" if stop.is_set() else "Completed",
        "message": f"metrics stand-in stopped at step {step}",
        "step": step,
        "totalSteps": total,
        "runUri": config.run_uri,
    }
    Path(contract.termination_message_path()).write_text(
        contract.encode_termination_message(summary),  # type: ignore[arg-type]
        encoding="utf-8",
    )
    os._exit(summary["exitCode"])  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
