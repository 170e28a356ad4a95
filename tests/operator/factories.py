"""Factories for FineTuneJob objects and the children the cluster reports back (plain dicts).

Shared by the unit tier (tests/unit/test_operator_*.py) and the operator-logic tier
(tests/operator). Every factory returns a fresh dict; keyword arguments override fields.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api import API_VERSION, KIND, FineTuneJob
from finetune_operator.builders import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME
from finetune_operator.settings import Settings

NOW = datetime(2026, 11, 29, 6, 0, 0, tzinfo=UTC)
UID = "0b6c1c1e-7a1f-4a52-9d61-3f1f0c9b7d11"
SETTINGS = Settings(trainer_image="trainer:test", runs_uri="s3://runs/")


def spec(**overrides: Any) -> dict[str, Any]:
    """A minimal valid spec (camelCase, as a user writes it)."""
    base: dict[str, Any] = {
        "model": {"name": "pythia-70m"},
        "dataset": {"train": ["s3://data/reuters/train.jsonl"]},
        "hyperparameters": {"maxSteps": 100, "batchSize": 8},
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def ftj(
    name: str = "demo",
    namespace: str = "team-a",
    *,
    generation: int = 1,
    status: dict[str, Any] | None = None,
    **spec_overrides: Any,
) -> dict[str, Any]:
    """A FineTuneJob object as the API server returns it."""
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": UID,
            "generation": generation,
            "resourceVersion": "1",
            "creationTimestamp": "2026-11-29T05:59:00Z",
        },
        "spec": spec(**spec_overrides),
    }
    if status is not None:
        obj["status"] = copy.deepcopy(status)
    return obj


def parsed(**kwargs: Any) -> FineTuneJob:
    return FineTuneJob.from_object(ftj(**kwargs))


def batch_job(
    name: str = "demo",
    *,
    suspend: bool = False,
    conditions: list[dict[str, Any]] | None = None,
    active: int = 0,
    failed: int = 0,
    succeeded: int = 0,
    start_time: str | None = "2026-11-29T06:00:01Z",
    completion_time: str | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job as observed, with the status fields the Job controller sets."""
    status: dict[str, Any] = {}
    if start_time and not suspend:
        status["startTime"] = start_time
    if active:
        status["active"] = active
    if failed:
        status["failed"] = failed
    if succeeded:
        status["succeeded"] = succeeded
    if conditions:
        status["conditions"] = conditions
    if completion_time:
        status["completionTime"] = completion_time
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "ownerReferences": [{"uid": UID, "controller": True}],
        },
        "spec": {"suspend": suspend},
        "status": status,
    }


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def pod(
    index: int = 0,
    phase: str = "Running",
    *,
    job: str = "demo",
    ip: str = "127.0.0.5",
    exit_code: int | None = None,
    reason: str | None = None,
    message: str | None = None,
    finished_at: str = "2026-11-29T06:10:00Z",
    waiting: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A trainer pod; exit_code makes its container terminated, waiting makes it wait."""
    state: dict[str, Any]
    if exit_code is not None:
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "finishedAt": finished_at,
        }
        if message is not None:
            terminated["message"] = message
        state = {"terminated": terminated}
    elif waiting is not None:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    else:
        state = {"running": {"startedAt": "2026-11-29T06:00:02Z"}}
    return {
        "metadata": {
            "name": f"{job}-{index}-abcde",
            "namespace": "team-a",
            "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)},
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "containerStatuses": [{"name": CONTAINER_NAME, "state": state}],
        },
    }


def progress_report(step: int = 40, total: int = 100, **overrides: Any) -> dict[str, Any]:
    """A ProgressReport (finetune_trainer.contract) from rank 0."""
    report: dict[str, Any] = {
        "phase": "Training",
        "step": step,
        "totalSteps": total,
        "epoch": 0.4,
        "trainLoss": 2.5,
        "learningRate": 4e-5,
        "tokensPerSecond": 1200.0,
        "etaSeconds": 60.0,
        "evaluations": [
            {"step": 0, "loss": 3.1, "accuracy": 0.41, "perplexity": 22.2},
            {"step": 20, "loss": 2.7, "accuracy": 0.47, "perplexity": 14.9},
        ],
        "baselines": [{"model": "pythia-160m", "loss": 2.9, "accuracy": 0.44, "perplexity": 18.2}],
        "checkpoints": [
            {
                "step": 20,
                "uri": "s3://runs/team-a/demo/checkpoints/step-000020/",
                "time": "2026-11-29T06:05:00Z",
                "metrics": {"trainLoss": 2.6, "evalLoss": 2.7},
            }
        ],
        "updatedAt": "2026-11-29T06:06:00Z",
    }
    report.update(overrides)
    return report
