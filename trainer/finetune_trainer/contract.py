"""Constants and wire shapes shared by the trainer and the operator.

The operator builds pods from these (env names, port, exit codes) and parses what the trainer
publishes (the progress JSON, the termination message). Documented for users in
docs/trainer-contract.md. Pure: no torch, no kopf, no I/O beyond reading the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

# ---- exit codes -------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error: retryable (counts against the Job's backoffLimit)
EXIT_INVALID_INPUT = 3  # invalid config or data: permanent, podFailurePolicy action FailJob
EXIT_TERMINATED = 143  # SIGTERM handled: checkpoint saved, resume on restart (128 + SIGTERM)

# ---- environment --------------------------------------------------------------------------------
ENV_CONFIG = "FINETUNE_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/finetune/config.yaml"
ENV_PROGRESS_PORT = "FINETUNE_PROGRESS_PORT"
DEFAULT_PROGRESS_PORT = 9090
ENV_POD_IP = "POD_IP"
DEFAULT_BIND_ADDRESS = "0.0.0.0"
ENV_CACHE_DIR = "FINETUNE_CACHE_DIR"  # local model/data/tokenization cache (an emptyDir)
DEFAULT_CACHE_DIR = "/tmp/finetune-cache"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
ENV_TERMINATION_MESSAGE_PATH = "FINETUNE_TERMINATION_LOG"  # override for tests / local runs
TERMINATION_MESSAGE_MAX_BYTES = 4096
# Credentials: only ever from the environment (a Secret), never from the config.
# Seconds one collective (all-reduce, barrier) may wait for its peers before it fails; set by
# the operator (its collective timeout setting).
ENV_COLLECTIVE_TIMEOUT = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600

ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_HF_TOKEN = "HF_TOKEN"
ENV_HF_ENDPOINT = "HF_ENDPOINT"  # a Hub mirror for hf:// models (not a credential)

PROGRESS_PATH = "/progress"  # GET: ProgressReport as JSON
METRICS_PATH = "/metrics"  # GET: Prometheus text format, same port
HEALTH_PATH = "/healthz"


def progress_port(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get(ENV_PROGRESS_PORT, DEFAULT_PROGRESS_PORT))


def bind_address(env: Mapping[str, str] = os.environ) -> str:
    """POD_IP if set (process nodes share one network namespace, one 127.0.0.x per pod)."""
    return env.get(ENV_POD_IP) or DEFAULT_BIND_ADDRESS


def config_path(env: Mapping[str, str] = os.environ) -> str:
    return env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH


def termination_message_path(env: Mapping[str, str] = os.environ) -> str:
    return env.get(ENV_TERMINATION_MESSAGE_PATH) or TERMINATION_MESSAGE_PATH


# ---- progress endpoint ---------------------------------------------------------------------------
class TrainerPhase(StrEnum):
    STARTING = "Starting"  # reading config, downloading model and data
    PREFLIGHT = "Preflight"  # validating and tokenizing data
    EVALUATING = "Evaluating"
    TRAINING = "Training"
    CHECKPOINTING = "Checkpointing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TERMINATED = "Terminated"  # SIGTERM: checkpoint saved, will resume


class EvaluationPoint(TypedDict):
    step: int
    loss: float
    accuracy: float
    perplexity: float


class BaselineResult(TypedDict):
    model: str  # ModelSpec.display_name
    loss: float
    accuracy: float
    perplexity: float


class CheckpointRecord(TypedDict):
    step: int
    uri: str  # complete checkpoint folder (its manifest.json exists)
    time: str  # RFC 3339 UTC
    metrics: dict[str, float]  # e.g. {"trainLoss": 1.9, "evalLoss": 2.0, ...}


class SkippedCheckpoint(TypedDict):
    step: int
    reason: str  # e.g. "corrupt: checkpoints/step-000020/state/__0_0.distcp: SHA-256 mismatch"


class ResumeRecord(TypedDict):
    """Where this attempt resumed: `step`, and the newer checkpoints it skipped as corrupt
    (their manifests moved aside to manifest.corrupt.json, so they are no longer listed)."""

    step: int
    skipped: list[SkippedCheckpoint]


class ProgressReport(TypedDict):
    """`GET /progress` on rank 0. Numbers are null until known.

    `checkpoints` is the set of complete checkpoints that exist in the run folder now (older ones
    deleted by checkpoints.keepLast are gone from it; a resumed run's earlier ones are in it),
    oldest first; null until the trainer has listed the run folder. Readers replace their list
    with it rather than adding to it."""

    phase: str  # TrainerPhase
    step: int
    totalSteps: int | None
    epoch: float | None
    trainLoss: float | None
    learningRate: float | None
    tokensPerSecond: float | None
    etaSeconds: float | None
    evaluations: list[EvaluationPoint]
    baselines: list[BaselineResult]
    checkpoints: list[CheckpointRecord] | None
    resumedFrom: ResumeRecord | None  # null for an attempt that started from step 0
    updatedAt: str  # RFC 3339 UTC


# ---- termination message ---------------------------------------------------------------------
class TerminationSummary(TypedDict):
    """Written to the termination message (compact JSON, at most 4096 bytes) at exit.

    `checkpoints` is the progress report's list at exit (the complete checkpoints that exist,
    oldest first); left out when not known or when it does not fit."""

    phase: str  # Succeeded | Failed | Terminated
    exitCode: int
    reason: str  # e.g. Completed, InvalidConfig, InvalidData, Terminated, Error
    message: str  # human-readable; truncated to fit
    step: int
    totalSteps: int | None
    runUri: str | None
    finalUri: NotRequired[str]
    checkpoints: NotRequired[list[CheckpointRecord]]
    evaluations: NotRequired[list[EvaluationPoint]]  # step 0 first, then the newest
    baselines: NotRequired[list[BaselineResult]]
    resumedFrom: NotRequired[ResumeRecord]
    # A failure: the global rank that failed and when (RFC 3339 with milliseconds), so that of a
    # multi-node job's failed pods the one that failed first names the cause.
    rank: NotRequired[int]
    failedAt: NotRequired[str]


def collective_timeout_seconds(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get(ENV_COLLECTIVE_TIMEOUT) or DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)


def encode_termination_message(summary: TerminationSummary) -> str:
    """Compact JSON ≤ TERMINATION_MESSAGE_MAX_BYTES: drops middle evaluations, then the
    checkpoints' metrics and times, then baselines, then the checkpoint list as a whole (never
    single entries: a missing entry would read as deleted), then shortens the message until it
    fits."""
    data: dict[str, Any] = dict(summary)
    while True:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode("utf-8")) <= TERMINATION_MESSAGE_MAX_BYTES:
            return text
        evaluations = data.get("evaluations") or []
        checkpoints = data.get("checkpoints") or []
        if len(evaluations) > 2:
            data["evaluations"] = [evaluations[0], *evaluations[2:]]
        elif any(set(c) - {"step", "uri"} for c in checkpoints):
            data["checkpoints"] = [{"step": c["step"], "uri": c["uri"]} for c in checkpoints]
        elif data.get("baselines"):
            data["baselines"] = data["baselines"][:-1]
        elif "checkpoints" in data:
            del data["checkpoints"]
        elif len(data.get("message", "")) > 16:
            data["message"] = data["message"][: len(data["message"]) // 2] + "…"
        else:
            data = {
                k: data[k] for k in ("phase", "exitCode", "reason", "step", "rank", "failedAt") if k in data
            }
            return json.dumps(data, separators=(",", ":"))
