"""What the CLI shows, as rows and tables, from FineTuneJob objects (pure).

Every command builds a `View` — a title, columns and rows of plain values — that `render`
turns into a rich Table and `structured` into data for `-o json|yaml`. Jobs are the dicts the
Kubernetes API returns (camelCase). Called by `main`; no I/O: printing happens in `main`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from finetune_cli.experiments import checkpoint_id, is_evaluation, role
from finetune_operator.api import Phase, SpecError, parse_spec
from finetune_trainer.config import Hyperparameters


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    justify: str = "left"
    format: Callable[[Any], str] | None = None
    no_wrap: bool = False
    optional: bool = False  # left out of the table when no row has a value
    min_width: int | None = None


@dataclass(frozen=True)
class View:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    empty: str = "nothing to show"
    highlight: set[int] = field(default_factory=set)  # row indexes shown in bold
    caption: str | None = None

    def structured(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]


def cell(value: Any, fmt: Callable[[Any], str] | None = None) -> str:
    if value is None or value == "":
        return "-"
    if fmt is not None:
        return fmt(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(view: View) -> Table:
    table = Table(title=view.title, caption=view.caption, title_justify="left")
    columns = [
        c for c in view.columns if not c.optional or any(row.get(c.key) not in (None, "") for row in view.rows)
    ]
    for column in columns:
        table.add_column(
            column.header,
            justify=column.justify,  # type: ignore[arg-type]
            no_wrap=column.no_wrap,
            min_width=column.min_width,
        )
    for index, row in enumerate(view.rows):
        style = "bold" if index in view.highlight else None
        table.add_row(*(cell(row.get(c.key), c.format) for c in columns), style=style)
    return table


# ---- formatting helpers -----------------------------------------------------------------------------
def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def short_time(value: Any) -> str:
    parsed = parse_time(str(value))
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else str(value)


def minute_time(value: Any) -> str:
    """Month, day and minute in UTC: what fits a status table (-o json has the full time)."""
    parsed = parse_time(str(value))
    return parsed.astimezone(UTC).strftime("%m-%d %H:%M") if parsed else str(value)


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


def fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{float(value):.{digits}f}"


# ---- jobs -----------------------------------------------------------------------------------------
def model_label(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    if status.get("model"):
        return str(status["model"])
    model = (job.get("spec") or {}).get("model") or {}
    if model.get("name"):
        return str(model["name"])
    uri = str(model.get("uri") or "?")
    return uri.rstrip("/").rsplit("/", 1)[-1]


def dataset_label(job: Mapping[str, Any]) -> str:
    dataset = (job.get("spec") or {}).get("dataset") or {}
    if dataset.get("name"):
        return str(dataset["name"])
    train = dataset.get("train") or []
    return str(train[0]).rstrip("/").rsplit("/", 1)[-1] if train else "?"


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
    return step, (int(total) if total is not None else None), (float(percent) if percent is not None else None)


def progress_text(job: Mapping[str, Any]) -> str:
    if is_evaluation(job):
        return "eval"
    step, total, percent = progress_of(job)
    if total is None:
        return f"{step}" if step else ""
    text = f"{step}/{total}"
    return f"{text} ({percent:.0f}%)" if percent is not None else text


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


def jobs_view(jobs: Sequence[Mapping[str, Any]], *, namespace: str, dashboard: str | None = None) -> View:
    rows = [job_row(j) for j in sorted(jobs, key=lambda j: (j["metadata"].get("creationTimestamp") or ""))]
    caption = f"dashboard: {dashboard}" if dashboard else None
    return View(
        title=f"FineTuneJobs in {namespace}",
        columns=[
            Column("id", "ID", no_wrap=True),
            Column("model", "Model"),
            Column("start", "Start (UTC)", format=minute_time, min_width=6),
            Column("end", "End (UTC)", format=minute_time, min_width=6),
            Column("phase", "Phase", min_width=9),
            Column("progress", "Progress", "right", min_width=8),
            Column("eta", "ETA", "right", optional=True, min_width=5),
            Column("evalLoss", "Loss", "right", fixed(3), optional=True, min_width=5),
            Column("accuracy", "Accuracy", "right", fixed(3), optional=True, min_width=5),
        ],
        rows=rows,
        empty=f"no FineTuneJobs in namespace {namespace}; create one with: kubectl finetune experiment add",
        caption=caption,
    )


def experiments_view(jobs: Sequence[Mapping[str, Any]], *, namespace: str) -> View:
    rows = [job_row(j) for j in jobs]
    return View(
        title=f"Experiments in {namespace}",
        columns=[
            Column("id", "ID", no_wrap=True),
            Column("model", "Model", no_wrap=True),
            Column("dataset", "Dataset"),
            Column("created", "Created", format=short_time),
            Column("phase", "Phase"),
            Column("progress", "Progress", "right"),
        ],
        rows=rows,
        empty="no experiments; add one with: kubectl finetune experiment add",
    )


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


def summary_view(summary: Mapping[str, Any]) -> View:
    """A `job_summary` (plus anything the caller added) as a two-column table."""
    rows = [{"field": k, "value": _flat(v)} for k, v in summary.items() if v not in (None, "", {})]
    return View(
        title=f"FineTuneJob {summary['id']}",
        columns=[Column("field", "Field"), Column("value", "Value")],
        rows=rows,
    )


def _flat(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, str) and parse_time(value) and "T" in value:
        return short_time(value)
    return value


def evaluations_view(job: Mapping[str, Any]) -> View:
    """`status view --summaries`: every evaluation and baseline of one job."""
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    checkpoints = {c.get("step") for c in status.get("checkpoints") or []}
    rows = [
        {
            "model": str(b.get("model")),
            "step": 0,
            "kind": "baseline",
            "loss": b.get("loss"),
            "accuracy": b.get("accuracy"),
            "perplexity": b.get("perplexity"),
            "checkpoint": None,
        }
        for b in status.get("baselines") or []
    ]
    for evaluation in sorted(status.get("evaluations") or [], key=lambda e: int(e.get("step") or 0)):
        step = int(evaluation.get("step") or 0)
        rows.append(
            {
                "model": model_label(job),
                "step": step,
                "kind": _kind(job, step),
                "loss": evaluation.get("loss"),
                "accuracy": evaluation.get("accuracy"),
                "perplexity": evaluation.get("perplexity"),
                "checkpoint": checkpoint_id(name, step) if step in checkpoints else None,
            }
        )
    return View(
        title=f"Evaluations of {name} (eval loss, token accuracy, perplexity = exp(loss))",
        columns=[
            Column("model", "Model", no_wrap=True),
            Column("step", "Step", "right"),
            Column("kind", "Kind"),
            Column("accuracy", "Accuracy", "right", fixed(3)),
            Column("loss", "Loss", "right", fixed(3)),
            Column("perplexity", "Perplexity", "right", fixed(2)),
            Column("checkpoint", "Checkpoint"),
        ],
        rows=rows,
        empty=f"{name} has no evaluations yet (step 0 is evaluated when training starts)",
        highlight=_best(rows),
    )


def _kind(job: Mapping[str, Any], step: int) -> str:
    """evaluation (a job in mode Evaluate), zero-shot (step 0 of a training job) or fine-tuned."""
    if is_evaluation(job):
        return "evaluation"
    return "zero-shot" if step == 0 else "fine-tuned"


def _best(rows: Sequence[Mapping[str, Any]]) -> set[int]:
    losses = [(r["loss"], i) for i, r in enumerate(rows) if isinstance(r.get("loss"), int | float)]
    return {min(losses)[1]} if losses else set()


def hyperparameters_view(job: Mapping[str, Any]) -> View:
    """`status view --hyperparams`: every hyper-parameter's value next to its default (the API
    server fills defaults in, so a value equal to its default may or may not have been written)."""
    spec = job.get("spec") or {}
    defaults = Hyperparameters().model_dump(mode="json", by_alias=True)
    try:
        resolved = parse_spec(spec).hyperparameters.model_dump(mode="json", by_alias=True)
    except SpecError:
        resolved = {**defaults, **(spec.get("hyperparameters") or {})}
    rows = [
        {"name": k, "value": v, "default": defaults.get(k), "changed": v != defaults.get(k)} for k, v in resolved.items()
    ]
    lora = spec.get("lora")
    if lora:
        rows.extend({"name": f"lora.{k}", "value": v, "default": None, "changed": True} for k, v in lora.items())
    return View(
        title=f"Hyper-parameters of {job['metadata']['name']}",
        columns=[
            Column("name", "Name"),
            Column("value", "Value"),
            Column("default", "Default"),
            Column("changed", "Changed", format=lambda v: "*" if v else ""),
        ],
        rows=rows,
        highlight={i for i, r in enumerate(rows) if r["changed"]},
    )


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


def checkpoints_view(jobs: Sequence[Mapping[str, Any]], *, title: str) -> View:
    return View(
        title=title,
        columns=[
            Column("id", "ID", no_wrap=True),
            Column("model", "Model", no_wrap=True),
            Column("step", "Step", "right"),
            Column("time", "Time", format=short_time, no_wrap=True),
            Column("evalLoss", "Eval loss", "right", fixed(3), optional=True),
            Column("evalAccuracy", "Accuracy", "right", fixed(3), optional=True),
            Column("uri", "URI"),
        ],
        rows=checkpoint_rows(jobs),
        empty="no complete checkpoints yet (jobs save one every checkpoints.everySteps and at the end)",
    )


# ---- compare and plot -------------------------------------------------------------------------------
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
            rows.append(_metric_row(str(baseline.get("model")), 0, baseline, job=name, dataset=data, kind="baseline"))
        evaluations = sorted(status.get("evaluations") or [], key=lambda e: int(e.get("step") or 0))
        for evaluation in evaluations:
            step = int(evaluation.get("step") or 0)
            rows.append(_metric_row(model_label(job), step, evaluation, job=name, dataset=data, kind=_kind(job, step)))
    return rows


def _metric_row(model: str, step: int, metrics: Mapping[str, Any], *, job: str, dataset: str, kind: str) -> dict[str, Any]:
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


def compare_view(jobs: Sequence[Mapping[str, Any]]) -> View:
    rows = compare_rows(jobs)
    multiple_datasets = len({r["dataset"] for r in rows}) > 1
    columns = [
        Column("model", "Model", no_wrap=True),
        Column("step", "Step", "right"),
        Column("accuracy", "Accuracy", "right", fixed(3)),
        Column("loss", "Loss", "right", fixed(2)),
        Column("perplexity", "Perplexity", "right", fixed(2)),
        Column("kind", "Kind"),
        Column("job", "Job"),
    ]
    if multiple_datasets:
        columns.append(Column("dataset", "Dataset"))
    return View(
        title="Baselines and checkpoints on the eval set (best loss in bold)",
        columns=columns,
        rows=rows,
        empty="nothing to compare yet: jobs report evaluations once training starts",
        highlight=_best(rows),
        caption="Different datasets are not comparable." if multiple_datasets else None,
    )


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
            rows = [_metric_row("", int(e.get("step") or 0), e, job="", dataset="", kind="") for e in evaluations]
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
            Series(label=label, steps=[0, last_step], values={m: [row[m], row[m]] for m in METRICS}, baseline=True)
        )
    return series
