"""`list [models | hyperparameters | datasets | checkpoints]`: what there is to work with.

Reads the catalog and the trainer's field reference (`catalog`), the dataset registry (`storage`)
and the jobs' checkpoints (`kube`); builds `views` tables. A bare `list` prints all four at a
glance — the model catalog, the datasets, the checkpoints and the hyper-parameters — as the
studio's `list` did; a part that cannot be read (no registry, no cluster) says why and the
others are still shown. Called through `parser`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from finetune_cli import catalog, views
from finetune_cli.app import App, camel
from finetune_cli.errors import CliError


def models_view(
    *, precision: str, family: str | None, strategy: str = "data-parallel", processes: int = 1
) -> views.View:
    rows = catalog.model_rows(precision=precision, family=family, strategy=strategy, processes=processes)
    over = (
        "every process holds all of it"
        if strategy == "data-parallel"
        else f"split over {processes} processes"
    )
    return views.View(
        title=(
            f"Model catalog (memory per training process for weights, gradients and AdamW state: "
            f"{strategy}, {over}; {precision})"
        ),
        columns=[
            views.Column("name", "Name", no_wrap=True),
            views.Column("architecture", "Architecture"),
            views.Column("parameters", "Size", "right"),
            views.Column("fullFinetuneGib", "Full fine-tune GiB/process", "right", views.fixed(1)),
            views.Column("loraGib", "LoRA GiB/process", "right", views.fixed(1)),
            views.Column("source", "Source"),
        ],
        rows=[camel(asdict(r)) for r in rows],
        empty=f"no catalog model of family {family}",
        caption="Activations come on top and grow with batch size x sequence length.",
    )


def hyperparameters_view(sections: list[str]) -> views.View:
    try:
        rows = catalog.field_rows(sections)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    columns = [
        views.Column("name", "Name", no_wrap=True),
        views.Column("type", "Type"),
        views.Column("range", "Range"),
        views.Column("default", "Default"),
        views.Column("required", "Required"),
        views.Column("description", "Description"),
    ]
    if len(sections) > 1:
        columns.insert(0, views.Column("section", "Section"))
    return views.View(
        title=f"spec.{' / spec.'.join(sections)}", columns=columns, rows=[camel(asdict(r)) for r in rows]
    )


def datasets_view(app: App) -> views.View:
    registry = app.registry()
    rows = [
        {
            "name": d.get("name"),
            "format": d.get("format"),
            "trainRecords": d.get("trainRecords"),
            "evalRecords": d.get("evalRecords") or None,
            "files": len(d.get("files") or []),
            "created": d.get("created"),
            "uri": d.get("uri"),
        }
        for d in registry.list()
    ]
    return views.View(
        title=f"Datasets in {registry.uri}",
        columns=[
            views.Column("name", "Name"),
            views.Column("format", "Format"),
            views.Column("trainRecords", "Train records", "right"),
            views.Column("evalRecords", "Eval records", "right"),
            views.Column("files", "Files", "right"),
            views.Column("created", "Created", format=views.short_time),
            views.Column("uri", "URI"),
        ],
        rows=rows,
        empty=f"no datasets in {registry.uri}; add one with: kubectl finetune add dataset --name N --paths FILE…",
    )


def checkpoints_view(app: App, job_id: str | None) -> views.View:
    if job_id:
        return views.checkpoints_view([app.jobs.get(job_id)], title=f"Checkpoints of {job_id}")
    jobs = app.jobs.list(all_namespaces=app.all_namespaces)
    where = "all namespaces" if app.all_namespaces else app.namespace
    return views.checkpoints_view(jobs, title=f"Checkpoints in {where}")


def cmd_list_models(app: App) -> None:
    args = app.args
    app.view(
        models_view(
            precision=args.precision, family=args.family, strategy=args.sharding, processes=args.processes
        )
    )


def cmd_list_hyperparameters(app: App) -> None:
    sections = list(catalog.SECTIONS) if app.args.all else (app.args.section or ["hyperparameters"])
    app.view(hyperparameters_view(sections))


def cmd_list_datasets(app: App) -> None:
    app.view(datasets_view(app))


def cmd_list_checkpoints(app: App) -> None:
    app.view(checkpoints_view(app, app.args.job_id))


OVERVIEW_PARTS = ("models", "datasets", "checkpoints", "hyperparameters")


def cmd_list_overview(app: App) -> None:
    """Bare `list`: the catalog, the datasets, the checkpoints and the hyper-parameters."""
    if app.output == "name":
        raise CliError("-o name lists one kind of thing", hint="e.g. kubectl finetune list models -o name")
    parts: dict[str, views.View | CliError] = {}
    builders = {
        "models": lambda: models_view(precision="bf16", family=None),
        "datasets": lambda: datasets_view(app),
        "checkpoints": lambda: checkpoints_view(app, None),
        "hyperparameters": lambda: hyperparameters_view(["hyperparameters"]),
    }
    for part in OVERVIEW_PARTS:
        try:
            parts[part] = builders[part]()
        except CliError as exc:
            parts[part] = exc
    structured: dict[str, Any] = {
        part: ({"error": str(v), "hint": v.hint} if isinstance(v, CliError) else v.structured())
        for part, v in parts.items()
    }
    if app.data(structured):
        return
    for part in OVERVIEW_PARTS:
        value = parts[part]
        if isinstance(value, CliError):
            app.say(f"{part}: {value}" + (f" (hint: {value.hint})" if value.hint else ""))
        else:
            app.view(value)
        app.say("")
    app.say(
        "details: kubectl finetune list models | datasets | checkpoints | hyperparameters --help; "
        "define an experiment with: kubectl finetune experiment add"
    )
