"""`status [--watch] | status view | status cancel`: how the jobs are doing.

`status` lists the jobs (or shows live progress bars with `--watch`); `status view` shows one
job's summary, evaluations, hyper-parameters or checkpoints; `status cancel` sets `spec.cancel`.
`watch` is shared with `run --watch`. Called through `parser`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column as RichColumn

from finetune_cli import reading, views
from finetune_cli.app import App
from finetune_cli.errors import CliError

ENV_DASHBOARD = (
    "FINETUNE_DASHBOARD_URL"  # e.g. https://grafana/d/finetune?var-namespace={namespace}&var-job={name}
)
ENV_TENSORBOARD = (
    "FINETUNE_TENSORBOARD_URL"  # a hosted TensorBoard, e.g. https://tb/#scalars&regexInput={name}
)
DEFAULT_TENSORBOARD_URL = "http://127.0.0.1:6006/"  # what `kubectl finetune tensorboard` serves by default
TERMINAL = reading.TERMINAL_PHASES  # Succeeded, Failed, Cancelled


def dashboard(namespace: str, name: str = "") -> str | None:
    template = os.environ.get(ENV_DASHBOARD)
    return template.format(namespace=namespace, name=name) if template else None


def tensorboard_link(namespace: str, name: str) -> str:
    """Where the job's TensorBoard is: a hosted one ($FINETUNE_TENSORBOARD_URL, a template with
    {namespace} and {name}), else the command that serves it locally."""
    template = os.environ.get(ENV_TENSORBOARD)
    if template:
        return template.format(namespace=namespace, name=name)
    return f"kubectl finetune tensorboard {name} (serves {DEFAULT_TENSORBOARD_URL})"


def cmd_status(app: App) -> None:
    if app.args.watch:
        watch(app, None)
        return
    jobs = app.jobs.list(all_namespaces=app.all_namespaces)
    app.view(
        views.jobs_view(
            jobs,
            namespace=app.namespace,
            dashboard=dashboard(app.namespace),
            all_namespaces=app.all_namespaces,
            tensorboard=True,
        )
    )


def cmd_status_view(app: App) -> None:
    job = app.jobs.get(app.args.job_id)
    if app.args.summaries:
        app.view(views.evaluations_view(job))
    elif app.args.hyperparams:
        app.view(views.hyperparameters_view(job))
    elif app.args.checkpoints:
        app.view(views.checkpoints_view([job], title=f"Checkpoints of {app.args.job_id}"))
    else:
        summary = reading.job_summary(job)
        link = dashboard(app.namespace, app.args.job_id)
        if link:
            summary["dashboard"] = link
        if summary.get("runUri"):
            summary["tensorboard"] = tensorboard_link(app.namespace, app.args.job_id)
        if not app.data(summary):
            app.view(views.summary_view(summary))


def cmd_status_cancel(app: App) -> None:
    job = app.jobs.get(app.args.job_id)
    phase = reading.phase_of(job)
    if phase in TERMINAL:
        raise CliError(f"{app.args.job_id} already finished ({phase}); nothing to cancel")
    app.jobs.patch_spec(app.args.job_id, {"cancel": True})
    app.say(
        f"cancelling {app.args.job_id}: its pods save a checkpoint and stop; the phase becomes Cancelled "
        "(checkpoints stay in the run folder)"
    )


def watch(app: App, names: Sequence[str] | None) -> None:
    """Live progress bars until every watched job is finished (or --timeout, or Ctrl-C)."""
    deadline = time.monotonic() + app.args.timeout if app.args.timeout else None
    progress = Progress(
        TextColumn("{task.description}", table_column=RichColumn(no_wrap=True)),
        BarColumn(bar_width=24),
        TextColumn("{task.percentage:>3.0f}%", table_column=RichColumn(no_wrap=True)),
        TextColumn("{task.fields[steps]}", table_column=RichColumn(no_wrap=True)),
        TextColumn("{task.fields[phase]}", table_column=RichColumn(no_wrap=True)),
        TextColumn(
            "{task.fields[detail]}", table_column=RichColumn(overflow="ellipsis", no_wrap=True, max_width=40)
        ),
        console=app.console,
    )
    tasks: dict[str, TaskID] = {}
    try:
        with progress:
            while True:
                jobs = app.jobs.list()
                if names is None:  # every unfinished job, and those already on screen
                    watched = [
                        j
                        for j in jobs
                        if reading.phase_of(j) not in TERMINAL or j["metadata"]["name"] in tasks
                    ]
                else:
                    watched = [j for j in jobs if j["metadata"]["name"] in names]
                for job in watched:
                    name = job["metadata"]["name"]
                    percent, fields = reading.progress_fields(job)
                    if name not in tasks:
                        tasks[name] = progress.add_task(name, total=100.0, **fields)
                    progress.update(tasks[name], completed=percent, **fields)
                if all(reading.phase_of(j) in TERMINAL for j in watched):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(app.args.interval)
    except KeyboardInterrupt:
        pass
    if not tasks:
        app.say("no running FineTuneJobs to watch")
