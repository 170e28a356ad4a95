"""Folding the trainer's reports into the status (pure): rank 0's progress report while it runs
and its termination summary after — progress, evaluations, baselines, checkpoints, where it resumed — taking only
well-formed, finite values from the untrusted JSON.

Evaluations and baselines accumulate (merged by step and by model); checkpoints are replaced by
the trainer's own list (the complete checkpoints that still exist). Must not import kopf or the
Kubernetes client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from finetune_operator.api import rfc3339

# Metrics in the status are for people, `kubectl get` and GitOps tools: 5 significant digits
# (0.78004, not 0.7800356164157423). Full precision stays in the run folder's metrics.jsonl and
# in the trainer's Prometheus metrics.
SIGNIFICANT_DIGITS = 5


def _number(value: Any) -> float | None:
    """A finite number from untrusted JSON, rounded to SIGNIFICANT_DIGITS, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return float(f"{number:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    """A non-negative integer from untrusted JSON, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def evaluation(point: Any) -> dict[str, Any] | None:
    if not isinstance(point, Mapping):
        return None
    step = _count(point.get("step"))
    if step is None:
        return None
    out: dict[str, Any] = {"step": step}
    for key in ("loss", "accuracy", "perplexity"):
        value = _number(point.get(key))
        if value is not None:
            out[key] = value
    return out


def _replace_checkpoints(
    existing: Sequence[Mapping[str, Any]], reported: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Exactly the reported checkpoints (the ones that still exist), oldest first; a time or
    metrics a shortened report left out are kept from the known entry of the same step and URI."""
    known = {(item.get("step"), item.get("uri")): item for item in existing}
    out: dict[int, dict[str, Any]] = {}
    for item in reported:
        before = known.get((item["step"], item["uri"])) or {}
        out[item["step"]] = {
            **{k: before[k] for k in ("time", "metrics") if k in before},
            **item,
        }
    return [out[step] for step in sorted(out)]


def _merge_by(
    existing: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], key: str
) -> list[dict[str, Any]]:
    merged = {item[key]: dict(item) for item in existing if key in item}
    for item in new:
        merged[item[key]] = dict(item)
    return [merged[k] for k in sorted(merged)]


def apply_progress(
    status: dict[str, Any], report: Mapping[str, Any], now: datetime, *, evaluate: bool
) -> None:
    raw_step, raw_total = report.get("step"), report.get("totalSteps")
    step = _count(raw_step) or 0
    total = _count(raw_total) or None
    progress: dict[str, Any] = {"step": step, "steps": f"{step}/{total}" if total else str(step)}
    if isinstance(report.get("phase"), str):
        progress["trainerPhase"] = report["phase"]
    if evaluate:
        progress.update(step=0, totalSteps=0, steps="eval")
    elif total:
        progress["totalSteps"] = total
        progress["percent"] = round(min(100.0, 100.0 * step / total), 1)
    for source, target in (
        ("epoch", "epoch"),
        ("trainLoss", "trainLoss"),
        ("learningRate", "learningRate"),
        ("tokensPerSecond", "tokensPerSecond"),
        ("etaSeconds", "etaSeconds"),
    ):
        value = _number(report.get(source))
        if value is not None and (value >= 0 or target in ("trainLoss", "learningRate")):
            progress[target] = value
    trained = _count(report.get("trainedTokens"))
    if trained is not None:
        progress["trainedTokens"] = trained
    progress["updatedAt"] = rfc3339(now)
    status["progress"] = progress
    _apply_results(status, report, checkpoints=True)


def _apply_results(status: dict[str, Any], report: Mapping[str, Any], *, checkpoints: bool) -> None:
    """Evaluations and baselines merged in; with `checkpoints`, the reported checkpoint list (if
    the report has one) replaces the status's."""
    evaluations = [e for p in report.get("evaluations") or [] if (e := evaluation(p)) is not None]
    if evaluations:
        status["evaluations"] = _merge_by(status.get("evaluations") or [], evaluations, "step")
    baselines = []
    for item in report.get("baselines") or []:
        if isinstance(item, Mapping) and isinstance(item.get("model"), str):
            baseline: dict[str, Any] = {"model": item["model"]}
            for key in ("loss", "accuracy", "perplexity"):
                value = _number(item.get(key))
                if value is not None:
                    baseline[key] = value
            baselines.append(baseline)
    if baselines:
        status["baselines"] = _merge_by(status.get("baselines") or [], baselines, "model")
    reported = report.get("checkpoints")
    if checkpoints and isinstance(reported, list):  # null or absent: not known, keep the list
        valid = [c for item in reported if (c := _checkpoint(item)) is not None]
        status["checkpoints"] = _replace_checkpoints(status.get("checkpoints") or [], valid)
    resumed = _resume(report.get("resumedFrom"))
    if checkpoints and resumed is not None:  # the newest attempt's word, like the checkpoint list
        status["resumedFrom"] = resumed


def _resume(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, Mapping) or _count(item.get("step")) is None:
        return None
    skipped = [
        {"step": s["step"], "reason": s["reason"][:500]}
        for s in item.get("skipped") or []
        if isinstance(s, Mapping) and _count(s.get("step")) is not None and isinstance(s.get("reason"), str)
    ]
    return {"step": item["step"], "skipped": skipped}


def _checkpoint(item: Any) -> dict[str, Any] | None:
    if (
        not isinstance(item, Mapping)
        or _count(item.get("step")) is None
        or not isinstance(item.get("uri"), str)
    ):
        return None
    out: dict[str, Any] = {"step": item["step"], "uri": item["uri"]}
    if isinstance(item.get("time"), str):
        out["time"] = item["time"]
    metrics = {k: n for k, v in (item.get("metrics") or {}).items() if (n := _number(v)) is not None}
    if metrics:
        out["metrics"] = metrics
    return out


def apply_summary(
    status: dict[str, Any], summary: Mapping[str, Any], *, latest: bool, evaluate: bool
) -> None:
    """Fold rank 0's termination summary in: results survive the pod and the Job. Its checkpoint
    list counts only when it is the `latest` word (no rank-0 pod of a newer attempt is live)."""
    _apply_results(status, summary, checkpoints=latest)
    step = _count(summary.get("step"))
    if evaluate:
        progress = dict(status.get("progress") or {})
        progress.update(step=0, totalSteps=0, steps="eval")
        if isinstance(summary.get("phase"), str):
            progress["trainerPhase"] = summary["phase"]
        status["progress"] = progress
    elif step is not None:
        progress = dict(status.get("progress") or {})
        total = _count(summary.get("totalSteps")) or progress.get("totalSteps")
        progress["step"] = max(step, int(progress.get("step") or 0))
        if total:
            progress["totalSteps"] = total
            progress["percent"] = round(min(100.0, 100.0 * progress["step"] / total), 1)
            progress["steps"] = f"{progress['step']}/{total}"
        else:
            progress["steps"] = str(progress["step"])
        if isinstance(summary.get("phase"), str):
            progress["trainerPhase"] = summary["phase"]
        status["progress"] = progress


def trim(status: dict[str, Any], max_evaluations: int = 50, max_checkpoints: int = 20) -> None:
    evaluations = status.get("evaluations") or []
    if evaluations:
        # keep step 0 (the zero-shot baseline) and the newest ones
        kept = (
            evaluations
            if len(evaluations) <= max_evaluations
            else [evaluations[0], *evaluations[-(max_evaluations - 1) :]]
        )
        status["evaluations"] = kept
        status["latestEvaluation"] = kept[-1]
    if len(status.get("checkpoints") or []) > max_checkpoints:
        status["checkpoints"] = status["checkpoints"][-max_checkpoints:]
