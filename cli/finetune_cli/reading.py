"""What a FineTuneJob object says, read for the CLI (pure).

Labels (model, dataset), the phase, progress, a job's row and summary, its checkpoints, the
studio's comparison rows and plot series — each read from the dicts the Kubernetes API returns
(camelCase). `views` turns them into tables; the commands use them to decide (e.g. whether a job
has finished). No I/O, no rendering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_cli.experiments import checkpoint_id, is_evaluation, role
from finetune_operator.api import LABEL_COMPONENT, LABEL_JOB_NAME, Phase
from finetune_trainer.config import uri_name


def model_label(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    if status.get("model"):
        return str(status["model"])
    model = (job.get("spec") or {}).get("model") or {}
    if model.get("name"):
        return str(model["name"])
    return uri_name(str(model.get("uri") or "?"))


def dataset_label(job: Mapping[str, Any]) -> str:
    dataset = (job.get("spec") or {}).get("dataset") or {}
    if dataset.get("name"):
        return str(dataset["name"])
    train = dataset.get("train") or []
    return uri_name(str(train[0])) if train else "?"


TERMINAL_PHASES = frozenset(p.value for p in Phase if p.terminal)


def phase_of(job: Mapping[str, Any]) -> str:
    """The operator's phase; before the operator has seen the job, what its spec asks for."""
    status = job.get("status") or {}
    if status.get("phase"):
        return str(status["phase"])
    spec = job.get("spec") or {}
    if spec.get("cancel"):
        return "Cancelling"
    return "Suspended" if spec.get("suspend") else "Pending"


def progress_of(job: Mapping[str, Any]) -> tuple[int, int | None, float | None]:
    """(step, total steps, percent) from status.progress; an evaluation has 0 steps and is done
    when it succeeded."""
    if is_evaluation(job):
        return 0, 0, 100.0 if phase_of(job) == Phase.SUCCEEDED else None
    progress = (job.get("status") or {}).get("progress") or {}
    step = int(progress.get("step") or 0)
    total = progress.get("totalSteps")
    percent = progress.get("percent")
    if percent is None and total:
        percent = 100.0 * step / float(total)
    if phase_of(job) == Phase.SUCCEEDED and total:
        step, percent = int(total), 100.0
    return (
        step,
        (int(total) if total is not None else None),
        (float(percent) if percent is not None else None),
    )


def progress_text(job: Mapping[str, Any]) -> str:
    if is_evaluation(job):
        return "eval"
    step, total, percent = progress_of(job)
    if total is None:
        return f"{step}" if step else ""
    text = f"{step}/{total}"
    return f"{text} ({percent:.0f}%)" if percent is not None else text


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_fields(job: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """Percent done and the text columns of a job's live progress bar."""
    step, total, percent = progress_of(job)
    row = job_row(job)
    detail = [
        f"loss {row['evalLoss']:.3f}" if isinstance(row["evalLoss"], int | float) else "",
        f"eta {row['eta']}" if row["eta"] else "",
        str(row["message"] or "")[:60] if row["phase"] in TERMINAL_PHASES else "",
    ]
    fields = {
        "steps": "eval" if is_evaluation(job) else f"{step}/{total}" if total else str(step),
        "phase": row["phase"],
        "detail": " ".join(d for d in detail if d),
    }
    return percent or 0.0, fields


def job_row(job: Mapping[str, Any]) -> dict[str, Any]:
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    latest = status.get("latestEvaluation") or {}
    if is_evaluation(job):  # its result is its one evaluation, at step 0
        latest = next((e for e in status.get("evaluations") or [] if int(e.get("step") or 0) == 0), latest)
    progress = status.get("progress") or {}
    return {
        "id": meta.get("name"),
        "role": role(job) or "job",
        "model": model_label(job),
        "dataset": dataset_label(job),
        "created": meta.get("creationTimestamp"),
        "start": status.get("startTime"),
        "end": status.get("completionTime"),
        "phase": phase_of(job),
        "progress": progress_text(job),
        "eta": duration(progress.get("etaSeconds")) if progress.get("etaSeconds") is not None else None,
        "evalLoss": latest.get("loss"),
        "accuracy": latest.get("accuracy"),
        "message": status.get("message"),
    }


def job_summary(job: Mapping[str, Any]) -> dict[str, Any]:
    """`status view`: the job at a glance, as ordered key/values."""
    row = job_row(job)
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return {
        "id": row["id"],
        "mode": (job.get("spec") or {}).get("mode"),
        "model": row["model"],
        "dataset": row["dataset"],
        "phase": row["phase"],
        "reason": status.get("reason"),
        "message": status.get("message"),
        "created": row["created"],
        "start": row["start"],
        "end": row["end"],
        "progress": row["progress"],
        "trainerPhase": progress.get("trainerPhase"),
        "trainLoss": progress.get("trainLoss"),
        "learningRate": progress.get("learningRate"),
        "tokensPerSecond": progress.get("tokensPerSecond"),
        "eta": row["eta"],
        "latestEvaluation": status.get("latestEvaluation"),
        "runUri": status.get("runUri"),
        "restarts": status.get("restarts"),
        "conditions": conditions or None,
    }


def kind_of(job: Mapping[str, Any], step: int) -> str:
    """evaluation (a job in mode Evaluate), zero-shot (step 0 of a training job) or fine-tuned."""
    if is_evaluation(job):
        return "evaluation"
    return "zero-shot" if step == 0 else "fine-tuned"


def checkpoint_rows(jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        name = job["metadata"]["name"]
        for record in (job.get("status") or {}).get("checkpoints") or []:
            metrics = record.get("metrics") or {}
            rows.append(
                {
                    "id": checkpoint_id(name, int(record.get("step") or 0)),
                    "job": name,
                    "model": model_label(job),
                    "step": record.get("step"),
                    "time": record.get("time"),
                    "evalLoss": metrics.get("evalLoss"),
                    "evalAccuracy": metrics.get("evalAccuracy"),
                    "uri": record.get("uri"),
                }
            )
    return sorted(rows, key=lambda r: (r["job"], int(r["step"] or 0)))


def compare_rows(jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The studio's Table 1: baselines (zero-shot, step 0) then each job's evaluations by step.

    An evaluation (a job in mode Evaluate, e.g. from `kubectl finetune eval`) contributes its one
    result, kind `evaluation`. A baseline evaluated by several jobs on the same dataset is listed once."""
    rows: list[dict[str, Any]] = []
    seen_baselines: set[tuple[str, str]] = set()
    for job in jobs:
        name = job["metadata"]["name"]
        status = job.get("status") or {}
        data = dataset_label(job)
        for baseline in status.get("baselines") or []:
            key = (str(baseline.get("model")), data)
            if key in seen_baselines:
                continue
            seen_baselines.add(key)
            rows.append(
                _metric_row(str(baseline.get("model")), 0, baseline, job=name, dataset=data, kind="baseline")
            )
        evaluations = sorted(status.get("evaluations") or [], key=lambda e: int(e.get("step") or 0))
        for evaluation in evaluations:
            step = int(evaluation.get("step") or 0)
            rows.append(
                _metric_row(
                    model_label(job), step, evaluation, job=name, dataset=data, kind=kind_of(job, step)
                )
            )
    return rows


def _metric_row(
    model: str, step: int, metrics: Mapping[str, Any], *, job: str, dataset: str, kind: str
) -> dict[str, Any]:
    loss = metrics.get("loss")
    perplexity = metrics.get("perplexity")
    if perplexity is None and isinstance(loss, int | float):
        perplexity = math.exp(loss)
    return {
        "model": model,
        "step": step,
        "accuracy": metrics.get("accuracy"),
        "loss": loss,
        "perplexity": perplexity,
        "kind": kind,
        "job": job,
        "dataset": dataset,
    }


@dataclass(frozen=True)
class Series:
    label: str
    steps: list[int]
    values: dict[str, list[float | None]]  # metric -> one value per step
    baseline: bool = False


METRICS = ("loss", "accuracy", "perplexity")


def plot_series(jobs: Sequence[Mapping[str, Any]]) -> list[Series]:
    """One line per job (its evaluations by step); one flat line per baseline and per evaluation
    (a job in mode Evaluate: labelled zero-shot for a catalog model, evaluation for a checkpoint or
    another URI), across the steps of the jobs."""
    series: list[Series] = []
    flat: list[tuple[str, Mapping[str, Any]]] = []
    for job in jobs:
        status = job.get("status") or {}
        evaluations = sorted(status.get("evaluations") or [], key=lambda e: int(e.get("step") or 0))
        if is_evaluation(job):
            catalog_model = ((job.get("spec") or {}).get("model") or {}).get("name")
            label = f"{model_label(job)} ({'zero-shot' if catalog_model else 'evaluation'})"
            flat.extend((label, e) for e in evaluations if int(e.get("step") or 0) == 0)
        elif evaluations:
            rows = [
                _metric_row("", int(e.get("step") or 0), e, job="", dataset="", kind="") for e in evaluations
            ]
            series.append(
                Series(
                    label=f"{job['metadata']['name']} ({model_label(job)})",
                    steps=[r["step"] for r in rows],
                    values={m: [r[m] for r in rows] for m in METRICS},
                )
            )
        flat.extend((f"{b.get('model')} (zero-shot)", b) for b in status.get("baselines") or [])
    last_step = max((s.steps[-1] for s in series if s.steps), default=1) or 1
    seen: set[str] = set()
    for label, metrics in flat:
        if label in seen:
            continue
        seen.add(label)
        row = _metric_row("", 0, metrics, job="", dataset="", kind="")
        series.append(
            Series(
                label=label,
                steps=[0, last_step],
                values={m: [row[m], row[m]] for m in METRICS},
                baseline=True,
            )
        )
    return series


# ---- a job's pods and events ----------------------------------------------------------------------
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the node rank of an Indexed Job's pod


def trainer_selector(job: str) -> str:
    """The label selector of a FineTuneJob's trainer pods (the operator's `builders.labels`)."""
    return f"{LABEL_JOB_NAME}={job},{LABEL_COMPONENT}=trainer"


def pods_by_rank(pods: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """The newest pod of each node rank (a restarted job has older pods of the same rank)."""
    newest: dict[int, Mapping[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or ""):
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        labels = (pod.get("metadata") or {}).get("labels") or {}
        index = annotations.get(COMPLETION_INDEX, labels.get(COMPLETION_INDEX))
        if index is not None and str(index).isdigit():
            newest[int(index)] = pod
    return dict(sorted(newest.items()))


def event_rows(
    events: Sequence[Mapping[str, Any]], job: Mapping[str, Any], pod_names: Sequence[str]
) -> list[dict[str, Any]]:
    """The events of a FineTuneJob, its batch Job and its pods, oldest first."""
    name = (job.get("metadata") or {}).get("name")
    batch_job = (job.get("status") or {}).get("jobName") or name
    wanted = {("FineTuneJob", name), ("Job", batch_job), *(("Pod", p) for p in pod_names)}
    rows = []
    for event in events:
        involved = event.get("involvedObject") or {}
        if (involved.get("kind"), involved.get("name")) not in wanted:
            continue
        series = event.get("series") or {}
        rows.append(
            {
                "time": event.get("lastTimestamp")
                or series.get("lastObservedTime")
                or event.get("eventTime")
                or (event.get("metadata") or {}).get("creationTimestamp"),
                "type": event.get("type"),
                "reason": event.get("reason"),
                "object": f"{str(involved.get('kind')).lower()}/{involved.get('name')}",
                "count": event.get("count") or series.get("count") or 1,
                "message": event.get("message"),
            }
        )
    return sorted(rows, key=lambda r: str(r["time"] or ""))
