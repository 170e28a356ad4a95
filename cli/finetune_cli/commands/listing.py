"""`list models | hyperparameters | datasets | checkpoints`: what there is to work with.

Reads the catalog and the trainer's field reference (`catalog`), the dataset registry (`storage`)
and the jobs' checkpoints (`kube`); builds `views` tables. Called through `parser`.
"""

from __future__ import annotations

from dataclasses import asdict

from finetune_cli import catalog, views
from finetune_cli.app import App, camel
from finetune_cli.errors import CliError


def cmd_list_models(app: App) -> None:
    rows = catalog.model_rows(precision=app.args.precision, family=app.args.family)
    view = views.View(
        title=f"Model catalog (memory for weights, gradients and AdamW state; LoRA base weights in {app.args.precision})",
        columns=[
            views.Column("name", "Name", no_wrap=True),
            views.Column("architecture", "Architecture"),
            views.Column("parameters", "Size", "right"),
            views.Column("fullFinetuneGib", "Full fine-tune GiB", "right", views.fixed(1)),
            views.Column("loraGib", "LoRA GiB", "right", views.fixed(1)),
            views.Column("source", "Source"),
        ],
        rows=[camel(asdict(r)) for r in rows],
        empty=f"no catalog model of family {app.args.family}",
        caption="Activations come on top and grow with batch size x sequence length.",
    )
    app.view(view)


def cmd_list_hyperparameters(app: App) -> None:
    sections = list(catalog.SECTIONS) if app.args.all else (app.args.section or ["hyperparameters"])
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
    app.view(
        views.View(
            title=f"spec.{' / spec.'.join(sections)}", columns=columns, rows=[camel(asdict(r)) for r in rows]
        )
    )


def cmd_list_datasets(app: App) -> None:
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
    app.view(
        views.View(
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
    )


def cmd_list_checkpoints(app: App) -> None:
    jobs = [app.jobs.get(app.args.job_id)] if app.args.job_id else app.jobs.list()
    title = f"Checkpoints of {app.args.job_id}" if app.args.job_id else f"Checkpoints in {app.namespace}"
    app.view(views.checkpoints_view(jobs, title=title))
