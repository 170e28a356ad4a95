"""What the CLI shows: tables of jobs, evaluations, checkpoints and comparisons (pure).

Every command builds a `View` — a title, columns and rows of plain values — that `render`
turns into a rich Table and `structured` into data for `-o json|yaml`. The rows come from
`reading` (what a FineTuneJob says); this module decides only how they look. Called by the
commands; no I/O: printing happens in `app`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from finetune_cli.experiments import checkpoint_id
from finetune_cli.reading import checkpoint_rows, compare_rows, job_row, kind_of, model_label
from finetune_operator.api import SpecError, parse_spec
from finetune_trainer.config import Hyperparameters

JOB_KIND = "finetunejob.finetune.dev"  # what `-o name` prints before a job's name, as kubectl does


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    justify: str = "left"
    format: Callable[[Any], str] | None = None
    no_wrap: bool = False
    optional: bool = False  # left out of the table when no row has a value
    min_width: int | None = None
    wide: bool = False  # shown with -o wide only


@dataclass(frozen=True)
class View:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    empty: str = "nothing to show"
    highlight: set[int] = field(default_factory=set)  # row indexes shown in bold
    caption: str | None = None
    name_key: str = "name"  # what -o name prints of each row
    kind: str | None = None  # -o name prints <kind>/<name>, as kubectl does, when rows are objects

    def structured(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]

    def names(self) -> list[str]:
        """One line per row for `-o name`; ValueError if these rows have no name."""
        if any(self.name_key not in row for row in self.rows):
            raise ValueError(f"-o name: the rows of {self.title!r} have no {self.name_key}")
        prefix = f"{self.kind}/" if self.kind else ""
        return [f"{prefix}{row[self.name_key]}" for row in self.rows]


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


def render(view: View, *, wide: bool = False) -> Table:
    table = Table(title=view.title, caption=view.caption, title_justify="left")
    columns = [
        c
        for c in view.columns
        if (wide or not c.wide)
        and (not c.optional or any(row.get(c.key) not in (None, "") for row in view.rows))
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


def fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{float(value):.{digits}f}"


# ---- jobs -----------------------------------------------------------------------------------------
def jobs_view(
    jobs: Sequence[Mapping[str, Any]],
    *,
    namespace: str,
    dashboard: str | None = None,
    all_namespaces: bool = False,
    tensorboard: bool = False,
) -> View:
    """`status`: one row per job; with `all_namespaces` (-A) a Namespace column first."""
    ordered = sorted(jobs, key=lambda j: j["metadata"].get("creationTimestamp") or "")
    rows = [_with_namespace(j, job_row(j)) if all_namespaces else job_row(j) for j in ordered]
    notes = [f"dashboard: {dashboard}" if dashboard else None]
    if tensorboard and rows:
        notes.append("TensorBoard of a job: kubectl finetune tensorboard ID")
    shown = [n for n in notes if n]
    where = "all namespaces" if all_namespaces else namespace
    return View(
        title=f"FineTuneJobs in {where}",
        columns=[
            *([Column("namespace", "Namespace", no_wrap=True)] if all_namespaces else []),
            Column("id", "ID", no_wrap=True),
            Column("model", "Model"),
            Column("start", "Start (UTC)", format=minute_time, min_width=6),
            Column("end", "End (UTC)", format=minute_time, min_width=6),
            Column("phase", "Phase", min_width=9),
            Column("progress", "Progress", "right", min_width=8),
            Column("eta", "ETA", "right", optional=True, min_width=5),
            Column("evalLoss", "Loss", "right", fixed(3), optional=True, min_width=5),
            Column("accuracy", "Accuracy", "right", fixed(3), optional=True, min_width=5),
            Column("dataset", "Dataset", wide=True),
            Column("created", "Created (UTC)", format=minute_time, wide=True),
            Column("message", "Message", wide=True, optional=True),
        ],
        rows=rows,
        empty=f"no FineTuneJobs in {'any namespace' if all_namespaces else f'namespace {namespace}'}; "
        "create one with: kubectl finetune experiment add",
        caption="\n".join(shown) or None,
        name_key="id",
        kind=JOB_KIND,
    )


def _with_namespace(job: Mapping[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": (job.get("metadata") or {}).get("namespace"), **row}


def experiments_view(
    jobs: Sequence[Mapping[str, Any]], *, namespace: str, all_namespaces: bool = False
) -> View:
    rows = [_with_namespace(j, job_row(j)) if all_namespaces else job_row(j) for j in jobs]
    return View(
        title=f"Experiments in {'all namespaces' if all_namespaces else namespace}",
        columns=[
            *([Column("namespace", "Namespace", no_wrap=True)] if all_namespaces else []),
            Column("id", "ID", no_wrap=True),
            Column("model", "Model", no_wrap=True),
            Column("dataset", "Dataset"),
            Column("created", "Created", format=short_time),
            Column("phase", "Phase"),
            Column("progress", "Progress", "right"),
            Column("message", "Message", wide=True, optional=True),
        ],
        rows=rows,
        empty="no experiments; add one with: kubectl finetune experiment add",
        name_key="id",
        kind=JOB_KIND,
    )


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
                "kind": kind_of(job, step),
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
        {"name": k, "value": v, "default": defaults.get(k), "changed": v != defaults.get(k)}
        for k, v in resolved.items()
    ]
    lora = spec.get("lora")
    if lora:
        rows.extend(
            {"name": f"lora.{k}", "value": v, "default": None, "changed": True} for k, v in lora.items()
        )
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
        name_key="id",
    )


# ---- compare -----------------------------------------------------------------------------------------
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
    columns.append(Column("dataset", "Dataset", wide=not multiple_datasets))
    return View(
        title="Baselines and checkpoints on the eval set (best loss in bold)",
        columns=columns,
        rows=rows,
        empty="nothing to compare yet: jobs report evaluations once training starts",
        highlight=_best(rows),
        caption="Different datasets are not comparable." if multiple_datasets else None,
    )


# ---- events -----------------------------------------------------------------------------------------
def events_view(rows: list[dict[str, Any]], *, job: str) -> View:
    return View(
        title=f"Events of {job}, its batch Job and its pods",
        columns=[
            Column("time", "Time (UTC)", format=short_time, no_wrap=True),
            Column("type", "Type"),
            Column("reason", "Reason"),
            Column("object", "Object", no_wrap=True),
            Column("count", "Count", "right", wide=True),
            Column("message", "Message"),
        ],
        rows=rows,
        empty=f"no events of {job} (the API server keeps events for about an hour)",
        name_key="object",
    )
