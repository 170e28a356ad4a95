"""A stand-in trainer honouring the trainer contract (finetune_trainer.contract), without torch.

Run by the process node as a FineTuneJob's container command (the operator's
FINETUNE_TRAINER_COMMAND in the integration tests). It reads the rendered TrainerConfig, serves
`GET /progress` on $POD_IP:$FINETUNE_PROGRESS_PORT (rank 0), "trains" maxSteps steps, evaluates
every evaluation.everySteps, "checkpoints" (a step file in a file:// run folder) every
checkpoints.everySteps and on SIGTERM, keeps the newest checkpoints.keepLast of them (listing
exactly those, a resumed run's earlier ones included), resumes from that file, and writes the
termination summary. In mode Evaluate it evaluates step 0 only. The scenario is the parent folder
name of the first training file (of the first eval file without training files):

- `file:///standin/ok/…`      — 0.1 s per step, exit 0
- `file:///standin/slow/…`    — 1 s per step (for suspend, resume, cancel)
- `file:///standin/invalid/…` — exit 3 (EXIT_INVALID_INPUT) at once, with a summary
- `file:///standin/crash/…`   — exit 1 (retryable) at once

A file `standin-hold-sigterm` in the run folder makes a SIGTERM'd trainer wait until the file is
removed before it checkpoints and exits (a trainer whose checkpoint takes a while): a test holds a
deleted pod terminating until it has seen what the operator made of it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune_trainer import contract
from finetune_trainer.config import TrainerConfig


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class State:
    def __init__(self, total: int) -> None:
        self.lock = threading.Lock()
        self.report: dict[str, Any] = {
            "phase": "Starting",
            "step": 0,
            "totalSteps": total,
            "epoch": None,
            "trainLoss": None,
            "learningRate": None,
            "tokensPerSecond": None,
            "etaSeconds": None,
            "evaluations": [],
            "baselines": [],
            "checkpoints": None,
            "updatedAt": now(),
        }

    def update(self, **changes: Any) -> None:
        with self.lock:
            self.report.update(changes, updatedAt=now())

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.report))


def serve(state: State) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != contract.PROGRESS_PATH:
                self.send_error(404)
                return
            body = json.dumps(state.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((contract.bind_address(), contract.progress_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def finish(summary: dict[str, Any]) -> None:
    Path(contract.termination_message_path()).write_text(
        contract.encode_termination_message(summary),
        encoding="utf-8",  # type: ignore[arg-type]
    )
    sys.stdout.flush()
    os._exit(summary["exitCode"])


def main() -> None:
    config = TrainerConfig.from_file(contract.config_path())
    rank = int(os.environ.get("PET_NODE_RANK", "0"))
    sources = config.dataset.train or config.dataset.eval or ["file:///standin/ok/x"]
    scenario = Path(sources[0].removeprefix("file://")).parent.name
    evaluate_only = config.mode == "Evaluate"
    total = 0 if evaluate_only else config.hyperparameters.max_steps or 10
    base = {"totalSteps": total, "runUri": config.run_uri}
    print(
        f"stand-in trainer rank {rank}: scenario {scenario}, {total} steps, run {config.run_uri}", flush=True
    )
    if scenario == "invalid":
        finish(
            {
                **base,
                "phase": "Failed",
                "exitCode": contract.EXIT_INVALID_INPUT,
                "reason": "InvalidData",
                "message": "train.jsonl line 1: no field 'text'",
                "step": 0,
            }
        )
    if scenario == "oom":  # allocate until the node kills the container for its memory limit
        print("stand-in trainer: allocating past the memory limit", flush=True)
        held = []
        for _ in range(64):  # at most 4 GiB, touched page by page, then give up
            held.append(b"\x01" * (64 * 2**20))  # written, so resident
            time.sleep(0.1)
        print("stand-in trainer: 4 GiB allocated and still alive: no memory limit enforced", flush=True)
        sys.exit(1)
    if scenario == "crash":
        print("Traceback (most recent call last): RuntimeError: simulated crash", flush=True)
        finish(
            {
                **base,
                "phase": "Failed",
                "exitCode": contract.EXIT_FAILURE,
                "reason": "Error",
                "message": "RuntimeError: simulated crash",
                "step": 0,
            }
        )

    run_dir = Path(config.run_uri.removeprefix("file://"))
    run_dir.mkdir(parents=True, exist_ok=True)
    step_file = run_dir / "standin-checkpoint"
    records_file = run_dir / "standin-checkpoints.json"
    start = int(step_file.read_text()) if step_file.exists() else 0
    (run_dir / f"standin-starts-rank{rank}").open("a").write(f"{start}\n")
    state = State(total)
    if rank == 0:
        serve(state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    evaluations: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = json.loads(records_file.read_text()) if records_file.exists() else []
    state.update(checkpoints=checkpoints)

    def evaluate(step: int) -> None:
        loss = 3.0 - 1.5 * step / max(total, 1)
        evaluations.append(
            {
                "step": step,
                "loss": round(loss, 4),
                "accuracy": round(0.4 + 0.2 * step / max(total, 1), 4),
                "perplexity": round(2.718281828**loss, 4),
            }
        )

    def checkpoint(step: int) -> None:
        checkpoints[:] = [c for c in checkpoints if c["step"] != step] + [
            {
                "step": step,
                "uri": f"{config.run_uri}checkpoints/step-{step:06d}/",
                "time": now(),
                "metrics": {"trainLoss": round(3.0 - 1.4 * step / total, 4)},
            }
        ]
        del checkpoints[: -config.checkpoints.keep_last]  # keepLast: older ones are deleted
        if rank == 0:
            step_file.write_text(str(step))
            records_file.write_text(json.dumps(checkpoints))

    if start == 0 and config.evaluation.at_start:
        evaluate(0)
    if evaluate_only:
        state.update(phase="Evaluating", step=0, evaluations=evaluations, checkpoints=[])
        time.sleep(0.5 if rank == 0 else 0)  # let a poll see it
        point = evaluations[0]
        finish(
            {
                **base,
                "phase": "Succeeded",
                "exitCode": 0,
                "reason": "Completed",
                "message": f"evaluated: eval loss {point['loss']:.4f}, token accuracy {point['accuracy']:.4f}, "
                f"perplexity {point['perplexity']:.3f}",
                "step": 0,
                "evaluations": evaluations,
                "checkpoints": [],
            }
        )
    seconds = 1.0 if scenario == "slow" else 0.1
    step = start
    state.update(phase="Training", step=step, evaluations=evaluations)
    while step < total:
        if stop.wait(seconds):
            hold = run_dir / "standin-hold-sigterm"
            while hold.exists():  # bounded by the pod's grace period (SIGKILL)
                time.sleep(0.1)
            checkpoint(step)
            finish(
                {
                    **base,
                    "phase": "Terminated",
                    "exitCode": contract.EXIT_TERMINATED,
                    "reason": "Terminated",
                    "message": f"SIGTERM: checkpoint saved at step {step}",
                    "step": step,
                    "checkpoints": checkpoints,
                }
            )
        step += 1
        if step % config.evaluation.every_steps == 0 or step == total:
            evaluate(step)
        if step % config.checkpoints.every_steps == 0 or step == total:
            checkpoint(step)
        state.update(
            step=step,
            trainLoss=round(3.0 - 1.4 * step / total, 4),
            tokensPerSecond=1000.0,
            etaSeconds=(total - step) * seconds,
            evaluations=evaluations,
            checkpoints=checkpoints,
        )
    time.sleep(0.5 if rank == 0 else 0)  # let a last poll see the final step
    finish(
        {
            **base,
            "phase": "Succeeded",
            "exitCode": 0,
            "reason": "Completed",
            "message": "done",
            "step": total,
            "finalUri": f"{config.run_uri}final/",
            "evaluations": evaluations[:1] + evaluations[-1:],
            "checkpoints": checkpoints,
        }
    )


if __name__ == "__main__":
    main()
