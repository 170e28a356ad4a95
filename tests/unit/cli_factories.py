"""FineTuneJob objects (as the Kubernetes API returns them) for the CLI's unit tests."""

from __future__ import annotations

from typing import Any

from finetune_cli.experiments import LABEL_ROLE


def ftj(
    name: str = "neox-reuters",
    *,
    model: str = "pythia-1.4b",
    created: str = "2026-11-29T06:00:00Z",
    role: str | None = "experiment",
    mode: str = "Train",
    suspend: bool = False,
    cancel: bool = False,
    dataset: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    **status: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": mode,
        "model": {"name": model},
        "dataset": dataset or {"name": "reuters"},
        "suspend": suspend,
    }
    if cancel:
        spec["cancel"] = True
    if hyperparameters is not None:
        spec["hyperparameters"] = hyperparameters
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": "team",
            "creationTimestamp": created,
            "labels": {LABEL_ROLE: role} if role else {},
        },
        "spec": spec,
        "status": status,
    }


# The original studio's Table 1: GPT-NeoX 1.4B fine-tuned on Reuters vs GPT-J 6B zero-shot.
REUTERS_STATUS: dict[str, Any] = {
    "phase": "Succeeded",
    "model": "pythia-1.4b",
    "startTime": "2026-11-29T06:01:00Z",
    "completionTime": "2026-11-29T09:01:00Z",
    "progress": {"step": 2000, "totalSteps": 2000, "percent": 100.0, "steps": "2000/2000"},
    "latestEvaluation": {"step": 2000, "loss": 1.88, "accuracy": 0.602, "perplexity": 6.56},
    "evaluations": [
        {"step": 0, "loss": 2.41, "accuracy": 0.52, "perplexity": 11.13},
        {"step": 1000, "loss": 1.95, "accuracy": 0.59, "perplexity": 7.03},
        {"step": 2000, "loss": 1.88, "accuracy": 0.602, "perplexity": 6.56},
    ],
    "baselines": [{"model": "gpt-j-6b", "loss": 1.92, "accuracy": 0.625, "perplexity": 6.84}],
    "checkpoints": [
        {
            "step": 1000,
            "uri": "s3://runs/team/neox-reuters/checkpoints/step-001000/",
            "time": "2026-11-29T07:31:00Z",
            "metrics": {"evalLoss": 1.95, "evalAccuracy": 0.59},
        },
        {
            "step": 2000,
            "uri": "s3://runs/team/neox-reuters/checkpoints/step-002000/",
            "time": "2026-11-29T09:01:00Z",
            "metrics": {"evalLoss": 1.88, "evalAccuracy": 0.602},
        },
    ],
}


def reuters_job() -> dict[str, Any]:
    return ftj(**REUTERS_STATUS)


# `kubectl finetune eval --model gpt-j-6b`: GPT-J 6B evaluated on the Reuters eval set (Table 1).
GPTJ_EVALUATED: dict[str, Any] = {
    "phase": "Succeeded",
    "progress": {"step": 0, "totalSteps": 0, "steps": "eval", "percent": 100.0, "trainerPhase": "Succeeded"},
    "latestEvaluation": {"step": 0, "loss": 1.92, "accuracy": 0.625, "perplexity": 6.84},
    "evaluations": [{"step": 0, "loss": 1.92, "accuracy": 0.625, "perplexity": 6.84}],
    "checkpoints": [],
}


def gptj_evaluation() -> dict[str, Any]:
    return ftj("eval-gpt-j", model="gpt-j-6b", role="evaluation", mode="Evaluate", **GPTJ_EVALUATED)
