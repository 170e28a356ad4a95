"""What the training processes tell the outside world: rank 0's progress JSON and Prometheus
metrics, and the termination message (a failure's written by the first process that fails).

`Progress` is updated by the training loop; `serve()` exposes it read-only on
`$POD_IP:$FINETUNE_PROGRESS_PORT` (`/progress`, `/metrics`, `/healthz`) for the operator to poll.
No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from finetune_trainer.checkpoints import utc_now
from finetune_trainer.contract import (
    HEALTH_PATH,
    METRICS_PATH,
    PROGRESS_PATH,
    BaselineResult,
    CheckpointRecord,
    EvaluationPoint,
    ProgressReport,
    SkippedCheckpoint,
    TerminationSummary,
    TrainerPhase,
    encode_termination_message,
)

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus series of one run (own registry: nothing global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("finetune_step", "Optimizer steps completed", registry=r)
        self.total_steps = Gauge("finetune_total_steps", "Optimizer steps planned", registry=r)
        self.train_loss = Gauge(
            "finetune_train_loss", "Token-weighted train loss of the last window", registry=r
        )
        self.learning_rate = Gauge("finetune_learning_rate", "Current learning rate", registry=r)
        self.tokens_per_second = Gauge(
            "finetune_tokens_per_second", "Training throughput, all processes", registry=r
        )
        self.tokens = Counter("finetune_trained_tokens", "Tokens processed in training", registry=r)
        self.eval_loss = Gauge("finetune_eval_loss", "Eval loss at the last evaluation", registry=r)
        self.eval_accuracy = Gauge(
            "finetune_eval_accuracy", "Token accuracy at the last evaluation", registry=r
        )
        self.eval_perplexity = Gauge(
            "finetune_eval_perplexity", "Perplexity at the last evaluation", registry=r
        )
        self.checkpoint_bytes = Counter(
            "finetune_checkpoint_bytes", "Bytes of checkpoints uploaded", registry=r
        )
        self.checkpoint_seconds = Gauge(
            "finetune_checkpoint_upload_seconds", "Upload time of the last checkpoint", registry=r
        )
        self.checkpoint_upload_failures = Counter(
            "finetune_checkpoint_upload_failures",
            "Checkpoints whose upload failed (after retries)",
            registry=r,
        )
        self.checkpoint_save_seconds = Gauge(
            "finetune_checkpoint_save_seconds",
            "Local save time of the last checkpoint (training stall)",
            registry=r,
        )
        self.baseline_loss = Gauge(
            "finetune_baseline_eval_loss", "Zero-shot eval loss of a baseline", ["model"], registry=r
        )


class Progress:
    """Thread-safe progress state; `report()` is the `/progress` body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.metrics = Metrics()
        self._data: dict[str, Any] = {
            "phase": TrainerPhase.STARTING.value,
            "step": 0,
            "totalSteps": None,
            "epoch": None,
            "trainLoss": None,
            "learningRate": None,
            "tokensPerSecond": None,
            "etaSeconds": None,
            "evaluations": [],
            "baselines": [],
            "checkpoints": None,  # not listed yet; then exactly the complete ones that exist
            "resumedFrom": None,
            "updatedAt": utc_now(),
        }

    def update(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                if key not in self._data:
                    raise KeyError(key)
                self._data[key] = value.value if isinstance(value, TrainerPhase) else value
            self._data["updatedAt"] = utc_now()
        m = self.metrics
        if values.get("step") is not None:
            m.step.set(values["step"])
        if values.get("totalSteps") is not None:
            m.total_steps.set(values["totalSteps"])
        if values.get("trainLoss") is not None:
            m.train_loss.set(values["trainLoss"])
        if values.get("learningRate") is not None:
            m.learning_rate.set(values["learningRate"])
        if values.get("tokensPerSecond") is not None:
            m.tokens_per_second.set(values["tokensPerSecond"])

    def add_evaluation(self, point: EvaluationPoint) -> None:
        with self._lock:
            evaluations = [e for e in self._data["evaluations"] if e["step"] != point["step"]]
            self._data["evaluations"] = [*evaluations, point]
            self._data["updatedAt"] = utc_now()
        self.metrics.eval_loss.set(point["loss"])
        self.metrics.eval_accuracy.set(point["accuracy"])
        self.metrics.eval_perplexity.set(point["perplexity"])

    def add_baseline(self, result: BaselineResult) -> None:
        with self._lock:
            self._data["baselines"] = [
                *[b for b in self._data["baselines"] if b["model"] != result["model"]],
                result,
            ]
        self.metrics.baseline_loss.labels(model=result["model"]).set(result["loss"])

    def set_checkpoints(self, records: list[CheckpointRecord]) -> None:
        """The complete checkpoints that exist in the run folder now (after keepLast), oldest first."""
        with self._lock:
            self._data["checkpoints"] = records
            self._data["updatedAt"] = utc_now()

    def set_resumed(self, *, step: int, skipped: list[SkippedCheckpoint]) -> None:
        """This attempt resumes from `step`, having skipped `skipped` (corrupt, newer)."""
        with self._lock:
            self._data["resumedFrom"] = {"step": step, "skipped": list(skipped)}
            self._data["updatedAt"] = utc_now()

    def report(self) -> ProgressReport:
        with self._lock:
            return json.loads(json.dumps(self._data))  # type: ignore[no-any-return]


def serve(progress: Progress, *, host: str, port: int) -> ThreadingHTTPServer:
    """Start the read-only HTTP endpoint in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == PROGRESS_PATH:
                body, content_type = json.dumps(progress.report()).encode(), "application/json"
            elif path == METRICS_PATH:
                body, content_type = generate_latest(progress.metrics.registry), CONTENT_TYPE_LATEST
            elif path == HEALTH_PATH:
                body, content_type = b"ok", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="progress-http", daemon=True).start()
    log.info("progress endpoint on http://%s:%d%s", host, server.server_address[1], PROGRESS_PATH)
    return server


def write_termination_message(path: str, summary: TerminationSummary) -> None:
    try:
        Path(path).write_text(encode_termination_message(summary), encoding="utf-8")
    except OSError as exc:  # not in a container (no /dev/termination-log): log only
        log.warning("cannot write termination message to %s: %s", path, exc)


def write_failure(path: str, summary: TerminationSummary) -> None:
    """A failure's summary, from whichever rank failed, unless a process of this pod wrote one
    already: the first failure in a pod names its cause (a peer's "connection closed" comes
    later). Of a job's failed pods, the operator reports the one whose `failedAt` is earliest."""
    try:
        if os.path.getsize(path) > 0:
            return
    except OSError:
        pass
    write_termination_message(path, summary)
