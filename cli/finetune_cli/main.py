"""`kubectl finetune`: command-line parsing, dispatch and printing.

The entry point of the console script `kubectl-finetune` (so `kubectl finetune …` works as a
kubectl plugin). Each command reads through `kube` / `storage`, decides with the pure modules
(`catalog`, `datasets`, `experiments`, `views`) and prints a rich table or, with `-o json|yaml`,
data for scripts. Every failure is a `CliError` that says what to do. `shell` runs the same
commands interactively.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from pydantic.alias_generators import to_camel
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column as RichColumn

from finetune_cli import catalog, datasets, experiments, storage, views
from finetune_cli.errors import CliError
from finetune_trainer.catalog import CATALOG

if TYPE_CHECKING:
    from finetune_cli.kube import Jobs

OUTPUTS = ("table", "json", "yaml")
ENV_DASHBOARD = "FINETUNE_DASHBOARD_URL"  # e.g. https://grafana/d/finetune?var-namespace={namespace}&var-job={name}
DEFAULT_MODEL = "smollm2-135m-instruct"
TERMINAL = views.TERMINAL_PHASES  # Succeeded, Failed, Cancelled


class Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so the shell survives a typo."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`", code=2)


class App:
    """What a command needs: output settings, and the cluster and registry opened on first use."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.output: str = args.output
        self._jobs: Jobs | None = None

    @property
    def jobs(self) -> Jobs:
        if self._jobs is None:
            from finetune_cli import kube  # the Kubernetes client is slow to import: only when needed

            api, namespace = kube.load(self.args.context)
            self._jobs = kube.Jobs(api, self.args.namespace or namespace)
        return self._jobs

    @property
    def namespace(self) -> str:
        return self.jobs.namespace

    def registry(self) -> storage.Registry:
        return storage.Registry(storage.datasets_uri(getattr(self.args, "datasets_uri", None)))

    def registered(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """(registry URI, the dataset's metadata) when a registry is configured, else None (the
        operator's datasetsUri applies); CliError if the dataset is not in the registry."""
        if not (getattr(self.args, "datasets_uri", None) or os.environ.get(storage.ENV_DATASETS_URI)):
            return None
        registry = self.registry()
        found = registry.get(name)
        if found is None:
            raise CliError(f"dataset {name} is not registered in {registry.uri}", hint="see `kubectl finetune list datasets`")
        return registry.uri, found

    # ---- printing ----
    def data(self, value: Any) -> bool:
        """Print `value` as JSON or YAML if asked to; True if printed."""
        if self.output == "json":
            self.console.print_json(json.dumps(value, default=str))
            return True
        if self.output == "yaml":
            self.console.print(yaml.safe_dump(value, sort_keys=False, allow_unicode=True), end="", markup=False, highlight=False)
            return True
        return False

    def view(self, view: views.View) -> None:
        if self.data(view.structured()):
            return
        if not view.rows:
            self.console.print(view.empty, markup=False, highlight=False)
            return
        self.console.print(views.render(view))

    def say(self, text: str) -> None:
        """A human message: on stdout for tables, on stderr when stdout carries data."""
        target = self.console if self.output == "table" else Console(stderr=True, soft_wrap=True)
        target.print(text, markup=False, highlight=False)


def camel(row: Mapping[str, Any]) -> dict[str, Any]:
    return {to_camel(k): v for k, v in row.items()}


# ---- list --------------------------------------------------------------------------------------------
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
    app.view(views.View(title=f"spec.{' / spec.'.join(sections)}", columns=columns, rows=[camel(asdict(r)) for r in rows]))


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


# ---- add dataset -------------------------------------------------------------------------------------
def cmd_add_dataset(app: App) -> None:
    args = app.args
    registry = app.registry()
    if registry.exists(args.name) and not args.replace:
        raise CliError(
            f"dataset {args.name} already exists in {registry.uri}",
            hint="pass --replace to overwrite it, or choose another --name",
        )
    files = storage.read_files(args.paths, "train") + storage.read_files(args.eval_paths or [], "eval")
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        summary = datasets.summarize(args.name, files, format=args.format, created=created)  # type: ignore[arg-type]
    except datasets.DatasetError as exc:
        raise CliError(str(exc), details=exc.details, hint="fix the records (file:line above) and run the command again") from None
    registry.save(summary, [(s, split, c) for s, split, c in files], replace=args.replace)
    result = {**summary.to_metadata(), "uri": f"{registry.uri}{args.name}/"}
    if not app.data(result):
        app.say(
            f"dataset {args.name} registered: {summary.format}, {summary.train_records} train records"
            + (f", {summary.eval_records} eval records" if summary.eval_records else " (eval: evalSize records held out)")
            + f", {len(summary.files)} file(s) in {registry.uri}{args.name}/"
        )
        app.say(f"use it with: kubectl finetune experiment add --dataset {args.name}")


# ---- experiments -------------------------------------------------------------------------------------
def editor_command(env: Mapping[str, str] = os.environ) -> list[str]:
    return shlex.split(env.get("KUBE_EDITOR") or env.get("EDITOR") or "vi")


def run_editor(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="finetune-experiment-", delete=False) as handle:
        handle.write(text)
        path = Path(handle.name)
    try:
        command = [*editor_command(), str(path)]
        try:
            result = subprocess.run(command, check=False)
        except FileNotFoundError:
            raise CliError(f"editor {command[0]!r} not found", hint="set EDITOR (e.g. EDITOR=nano), or pass -f FILE") from None
        if result.returncode != 0:
            raise CliError(f"the editor exited with code {result.returncode}; nothing saved")
        return path.read_text(encoding="utf-8")
    finally:
        path.unlink(missing_ok=True)


def validate_experiment(app: App, text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, []) if the API server accepts it in a dry run, else (None, errors)."""
    try:
        manifest = experiments.parse_manifest(text, namespace=app.namespace)
    except experiments.ManifestError as exc:
        return None, [str(exc)]
    problems = []
    try:
        app.jobs.create(manifest, dry_run=True)
    except CliError as exc:
        problems = exc.details or [str(exc)]
    problems += catalog_problems(manifest)
    return (None, problems) if problems else (manifest, [])


def catalog_problems(manifest: Mapping[str, Any]) -> list[str]:
    """Catalog names the operator would reject (it can only say so after the job is created)."""
    spec = manifest.get("spec") or {}
    problems = []
    models = [("spec.model.name", (spec.get("model") or {}).get("name"))]
    for i, baseline in enumerate((spec.get("evaluation") or {}).get("baselines") or []):
        models.append((f"spec.evaluation.baselines[{i}].name", (baseline or {}).get("name")))
    for field, name in models:
        if name and name not in CATALOG:
            problems.append(f"{field}: unknown catalog model {name!r} (see `kubectl finetune list models`, or use uri:)")
    return problems


def cmd_experiment_add(app: App) -> None:
    args = app.args
    if args.filename:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text(encoding="utf-8")
        manifest, errors = validate_experiment(app, text)
        if manifest is None:
            raise CliError("the experiment is invalid; nothing saved", details=errors)
    else:
        model = args.model or DEFAULT_MODEL
        data_format, datasets_uri = "text", None
        registered = app.registered(args.dataset) if args.dataset else None
        if registered:
            datasets_uri, data_format = registered[0], str(registered[1].get("format") or "text")
        name = args.name or default_name(model)
        text = experiments.template(name=name, model=model, dataset=args.dataset, data_format=data_format, datasets_uri=datasets_uri)
        manifest = None
        shown_errors = False
        while manifest is None:
            edited = run_editor(text)
            if not experiments.strip_errors(edited).strip():
                raise CliError("the file is empty; experiment not saved")
            if shown_errors and experiments.strip_errors(edited) == experiments.strip_errors(text):
                raise CliError("edit cancelled (no changes after the error); experiment not saved")
            manifest, errors = validate_experiment(app, edited)
            if manifest is None:
                text = experiments.with_errors(edited, errors)
                shown_errors = True
    created = app.jobs.create(manifest)
    if not app.data(created):
        name = created["metadata"]["name"]
        app.say(f"experiment {name} saved (suspended); start it with: kubectl finetune run")


def default_name(model: str) -> str:
    stamp = datetime.now(UTC).strftime("%m%d-%H%M%S")
    core = experiments.slug(model)[: 52 - len(stamp) - 5]
    return f"exp-{core}-{stamp}"


def cmd_experiment_view(app: App) -> None:
    if app.args.name:
        job = app.jobs.get(app.args.name)
        shown = {k: job[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in job}
        meta = shown["metadata"]
        shown["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "creationTimestamp") if k in meta}
        if not app.data(shown):
            app.console.print(yaml.safe_dump(shown, sort_keys=False), end="", markup=False, highlight=False)
        return
    found = [j for j in experiments.newest_first(app.jobs.list()) if experiments.role(j) == experiments.ROLE_EXPERIMENT]
    app.view(views.experiments_view(found, namespace=app.namespace))


def cmd_experiment_delete(app: App) -> None:
    for name in app.args.names:
        app.jobs.delete(name)
        app.say(f"FineTuneJob {name} deleted (its run folder in object storage is kept)")


def cmd_run(app: App) -> None:
    names = app.args.names or experiments.to_run(app.jobs.list(), app.args.count)
    if not names:
        raise CliError("no experiment waiting to run", hint="add one with: kubectl finetune experiment add")
    for name in names:
        app.jobs.patch_spec(name, {"suspend": False})
    if not app.data({"started": names}):
        app.say(f"started: {', '.join(names)}")
        if not app.args.watch:
            app.say("follow them with: kubectl finetune status --watch")
    if app.args.watch:
        watch(app, names)


# ---- status ------------------------------------------------------------------------------------------
def dashboard(namespace: str, name: str = "") -> str | None:
    template = os.environ.get(ENV_DASHBOARD)
    return template.format(namespace=namespace, name=name) if template else None


def cmd_status(app: App) -> None:
    if app.args.watch:
        watch(app, None)
        return
    app.view(views.jobs_view(app.jobs.list(), namespace=app.namespace, dashboard=dashboard(app.namespace)))


def cmd_status_view(app: App) -> None:
    job = app.jobs.get(app.args.job_id)
    if app.args.summaries:
        app.view(views.evaluations_view(job))
    elif app.args.hyperparams:
        app.view(views.hyperparameters_view(job))
    elif app.args.checkpoints:
        app.view(views.checkpoints_view([job], title=f"Checkpoints of {app.args.job_id}"))
    else:
        summary = views.job_summary(job)
        link = dashboard(app.namespace, app.args.job_id)
        if link:
            summary["dashboard"] = link
        if not app.data(summary):
            app.view(views.summary_view(summary))


def cmd_status_cancel(app: App) -> None:
    job = app.jobs.get(app.args.job_id)
    phase = views.phase_of(job)
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
        TextColumn("{task.fields[detail]}", table_column=RichColumn(overflow="ellipsis", no_wrap=True, max_width=40)),
        console=app.console,
    )
    tasks: dict[str, TaskID] = {}
    try:
        with progress:
            while True:
                jobs = app.jobs.list()
                if names is None:  # every unfinished job, and those already on screen
                    watched = [j for j in jobs if views.phase_of(j) not in TERMINAL or j["metadata"]["name"] in tasks]
                else:
                    watched = [j for j in jobs if j["metadata"]["name"] in names]
                for job in watched:
                    name = job["metadata"]["name"]
                    percent, fields = views.progress_fields(job)
                    if name not in tasks:
                        tasks[name] = progress.add_task(name, total=100.0, **fields)
                    progress.update(tasks[name], completed=percent, **fields)
                if all(views.phase_of(j) in TERMINAL for j in watched):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(app.args.interval)
    except KeyboardInterrupt:
        pass
    if not tasks:
        app.say("no running FineTuneJobs to watch")


# ---- eval, compare, plot -----------------------------------------------------------------------------
def cmd_eval(app: App) -> None:
    args = app.args
    storage_spec: dict[str, Any] = {}
    source_job: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = {}
    max_batches = args.max_batches
    if args.checkpoint:
        try:
            job_name, step = experiments.parse_checkpoint_id(args.checkpoint)
            source_job = app.jobs.get(job_name)
            uri = experiments.find_checkpoint(source_job, step)
        except experiments.ManifestError as exc:
            raise CliError(str(exc)) from None
        model: dict[str, Any] = {"uri": uri}
        model_text = f"{job_name}-step{step}"
        storage_spec = dict((source_job.get("spec") or {}).get("storage") or {})
        hyperparameters, source_max_batches = experiments.evaluation_settings(source_job)
        max_batches = max_batches or source_max_batches
    elif args.uri:
        model, model_text = {"uri": args.uri}, args.uri.rstrip("/").rsplit("/", 1)[-1]
    else:
        if args.model not in CATALOG:
            raise CliError(f"unknown catalog model {args.model!r}", hint="see `kubectl finetune list models`, or pass --uri")
        model, model_text = {"name": args.model}, args.model
    if args.dataset:
        dataset: dict[str, Any] = {"name": args.dataset, "format": args.format or "text"}
        registered = app.registered(args.dataset)
        if registered:
            storage_spec["datasetsUri"] = registered[0]
            dataset["format"] = args.format or registered[1].get("format") or "text"
        data_text = args.dataset
    elif args.data:
        uris = [storage.as_uri(p) for p in args.data]
        dataset = {"eval": uris, "format": args.format or "text"}
        data_text = uris[0].rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    elif source_job is not None:
        dataset = dict((source_job.get("spec") or {}).get("dataset") or {})
        data_text = views.dataset_label(source_job)
    else:
        raise CliError("what to evaluate on? pass --dataset NAME (registered) or --data URI…")
    name = args.name or experiments.eval_name(model_text, data_text, datetime.now(UTC).strftime("%H%M%S"))
    manifest = experiments.eval_manifest(
        name=name,
        namespace=app.namespace,
        model=model,
        dataset=dataset,
        storage=storage_spec,
        hyperparameters=hyperparameters,
        max_batches=max_batches,
    )
    app.jobs.create(manifest)
    if not args.wait:
        if not app.data({"job": name}):
            app.say(f"evaluation job {name} created; its result appears in: kubectl finetune compare {name}")
        return
    deadline = time.monotonic() + args.timeout
    while True:
        job = app.jobs.get(name)
        rows = [r for r in views.compare_rows([job]) if r["kind"] == "evaluation"]
        phase = views.phase_of(job)
        if rows or phase in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise CliError(f"no result after {args.timeout:.0f}s; job {name} is {phase}", hint=f"check later: kubectl finetune compare {name}")
        time.sleep(args.interval)
    if not rows:
        message = (job.get("status") or {}).get("message") or ""
        raise CliError(f"evaluation job {name} ended {phase} without a result: {message}")
    app.view(views.compare_view([job]))


def selected_jobs(app: App, names: Sequence[str]) -> list[dict[str, Any]]:
    if names:
        return [app.jobs.get(n) for n in names]
    return sorted(app.jobs.list(), key=lambda j: j["metadata"].get("creationTimestamp") or "")


def cmd_compare(app: App) -> None:
    app.view(views.compare_view(selected_jobs(app, app.args.jobs)))


def cmd_plot(app: App) -> None:
    from finetune_cli.plot import write_png

    jobs = selected_jobs(app, app.args.jobs)
    series = views.plot_series(jobs)
    if not series:
        raise CliError("nothing to plot: no job has evaluations yet", hint="jobs report evaluations once training starts")
    names = ", ".join(j["metadata"]["name"] for j in jobs)
    path = write_png(series, Path(app.args.out), title=f"Evaluation on the eval set: {names}")
    if not app.data({"png": str(path), "series": [s.label for s in series]}):
        app.say(f"wrote {path} ({len(series)} series: {', '.join(s.label for s in series)})")


def cmd_shell(app: App) -> None:
    from finetune_cli.shell import StudioShell

    def run_line(argv: list[str]) -> int:
        if argv and argv[0] == "shell":
            app.console.print("already in the shell", markup=False)
            return 1
        passthrough = [f"--output={app.output}"]
        if app.args.namespace:
            passthrough.append(f"--namespace={app.args.namespace}")
        if app.args.context:
            passthrough.append(f"--context={app.args.context}")
        return run([*passthrough, *argv], console=app.console, shared=app)

    StudioShell(run_line, lambda topic: usage(topic)).cmdloop()


# ---- parser ------------------------------------------------------------------------------------------
def _common(*, top: bool, short_namespace: bool = True) -> argparse.ArgumentParser:
    """Options accepted before or after the command (defaults only on the top parser). `-n` is
    kubectl's namespace flag everywhere except after `run`, where it is the studio's count."""
    parser = argparse.ArgumentParser(add_help=False)
    default = None if top else argparse.SUPPRESS
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table" if top else argparse.SUPPRESS, help="table (default), json or yaml")
    flags = ("-n", "--namespace") if short_namespace else ("--namespace",)
    parser.add_argument(*flags, default=default, help="namespace (default: the kubeconfig context's)")
    parser.add_argument("--context", default=default, help="kubeconfig context (default: the current one)")
    return parser


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop watching after this many seconds (0: until done)")


def build_parser() -> Parser:
    common = _common(top=False)
    common_without_n = _common(top=False, short_namespace=False)
    parser = Parser(
        prog="kubectl finetune",
        description="The fine-tuning studio: models, datasets, experiments, runs, evaluations.",
        parents=[_common(top=True)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(group: Any, name: str, handler: Callable[[App], None] | None, help: str, **kwargs: Any) -> Parser:
        parents = [common_without_n if name == "run" else common]
        sub: Parser = group.add_parser(name, help=help, description=help, parents=parents, **kwargs)
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    # list
    listing = add(commands, "list", None, "list models, datasets, checkpoints or hyperparameters")
    what = listing.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser, required=True)
    models = add(what, "models", cmd_list_models, "the model catalog with memory estimates")
    models.add_argument("--family", help="only this family, e.g. pythia, codegen, llama")
    models.add_argument("--precision", choices=list(catalog.WEIGHT_BYTES), default="bf16", help="LoRA base-weight precision")
    data = add(what, "datasets", cmd_list_datasets, "registered datasets")
    data.add_argument("--datasets-uri", help=f"the registry (default ${storage.ENV_DATASETS_URI})")
    checkpoints = add(what, "checkpoints", cmd_list_checkpoints, "complete checkpoints with ID, time and step")
    checkpoints.add_argument("--job_id", "--job-id", dest="job_id", help="only this job's")
    hyper = add(what, "hyperparameters", cmd_list_hyperparameters, "every field with type, range, default, description")
    hyper.add_argument("--section", action="append", choices=list(catalog.SECTIONS), help="spec section (repeatable; default hyperparameters)")
    hyper.add_argument("--all", action="store_true", help="every section")

    # add dataset
    adding = add(commands, "add", None, "register a dataset")
    add_what = adding.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser, required=True)
    dataset = add(add_what, "dataset", cmd_add_dataset, "validate, count and upload a dataset to the registry")
    dataset.add_argument("--name", required=True, help="dataset name (lower case, digits, . _ -)")
    dataset.add_argument("--paths", nargs="+", required=True, help="training files or folders: local paths, file:// or s3:// (globs allowed)")
    dataset.add_argument("--eval-paths", nargs="+", help="evaluation files (default: evalSize records held out of train)")
    dataset.add_argument("--format", choices=["text", "prompt-completion", "chat"], help="default: detected")
    dataset.add_argument("--replace", action="store_true", help="overwrite a dataset of the same name")
    dataset.add_argument("--datasets-uri", help=f"the registry (default ${storage.ENV_DATASETS_URI})")

    # experiment
    experiment = add(commands, "experiment", None, "add, view or delete experiments (suspended FineTuneJobs)")
    exp = experiment.add_subparsers(dest="what", metavar="ACTION", parser_class=Parser, required=True)
    exp_add = add(exp, "add", cmd_experiment_add, "write an experiment in $EDITOR (validated by a server-side dry run)")
    exp_add.add_argument("--name", help="metadata.name (default: exp-<model>-<time>)")
    exp_add.add_argument("--model", help=f"catalog model for the template (default {DEFAULT_MODEL})")
    exp_add.add_argument("--dataset", help="registered dataset for the template")
    exp_add.add_argument("--datasets-uri", help=f"the registry (default ${storage.ENV_DATASETS_URI})")
    exp_add.add_argument("-f", "--filename", help="take the manifest from this file (- for stdin) instead of an editor")
    exp_view = add(exp, "view", cmd_experiment_view, "list experiments, or show one")
    exp_view.add_argument("name", nargs="?", help="experiment to show")
    exp_delete = add(exp, "delete", cmd_experiment_delete, "delete experiments (FineTuneJobs)")
    exp_delete.add_argument("names", nargs="+", metavar="NAME")

    # run
    running = add(commands, "run", cmd_run, "start the newest N experiments (or the named ones)")
    running.add_argument("-n", "--count", type=int, default=1, help="how many of the newest waiting experiments (default 1)")
    running.add_argument("names", nargs="*", metavar="NAME", help="start these instead")
    running.add_argument("-w", "--watch", action="store_true", help="show live progress bars until they finish")
    _watch_options(running)

    # status
    status = add(commands, "status", cmd_status, "jobs with ID, model, start, end, phase and progress")
    status.add_argument("-w", "--watch", action="store_true", help="live progress bars until every job finishes")
    _watch_options(status)
    status_sub = status.add_subparsers(dest="status_command", metavar="view|cancel", parser_class=Parser)
    view = add(status_sub, "view", cmd_status_view, "one job: summary, evaluations, hyper-parameters or checkpoints")
    view.add_argument("--job_id", "--job-id", dest="job_id", required=True)
    shown = view.add_mutually_exclusive_group()
    shown.add_argument("--summaries", action="store_true", help="evaluations and baselines by step")
    shown.add_argument("--hyperparams", action="store_true", help="hyper-parameters with defaults filled in")
    shown.add_argument("--checkpoints", action="store_true", help="complete checkpoints")
    cancel = add(status_sub, "cancel", cmd_status_cancel, "stop a job for good (it checkpoints first)")
    cancel.add_argument("--job_id", "--job-id", dest="job_id", required=True)

    # eval
    evaluate = add(commands, "eval", cmd_eval, "evaluate a checkpoint or a catalog model on a dataset (no training)")
    target = evaluate.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="catalog model name")
    target.add_argument(
        "--checkpoint",
        help="checkpoint ID <job>:<step> (see list checkpoints); without --dataset/--data, on its job's eval set",
    )
    target.add_argument("--uri", help="model URI: s3://…, file://… or hf://org/name")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="registered dataset (its eval/ files, else held-out records)")
    source.add_argument("--data", nargs="+", help="eval files: paths or URIs the trainer can read")
    evaluate.add_argument("--format", choices=["text", "prompt-completion", "chat"])
    evaluate.add_argument("--max-batches", type=int, help="evaluate at most this many micro-batches")
    evaluate.add_argument("--name", help="the evaluation job's name")
    evaluate.add_argument("--datasets-uri", help=f"the registry (default ${storage.ENV_DATASETS_URI})")
    evaluate.add_argument("--wait", action="store_true", help="wait for the result and print it")
    evaluate.add_argument("--interval", type=float, default=2.0)
    evaluate.add_argument("--timeout", type=float, default=1800.0)

    # compare, plot, shell
    compare = add(commands, "compare", cmd_compare, "Model | Step | Accuracy | Loss | Perplexity of baselines and checkpoints")
    compare.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to compare (default: all)")
    plot = add(commands, "plot", cmd_plot, "PNG of eval metrics against steps for jobs and baselines")
    plot.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to plot (default: all)")
    plot.add_argument("--out", default="finetune-plot.png", help="PNG file to write (default finetune-plot.png)")
    add(commands, "shell", cmd_shell, "an interactive shell with the same commands")
    return parser


def usage(topic: str | None) -> str:
    parser = build_parser()
    if topic is None:
        lines = ["commands (type `help COMMAND` for options):"]
        actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for choice in actions._choices_actions:
            lines.append(f"  {choice.dest:<11} {choice.help}")
        lines += ["  history     the commands typed in this shell", "  exit        leave the shell (also quit, Ctrl-D)"]
        return "\n".join(lines)
    with contextlib.suppress(SystemExit):
        parser.parse_args([*topic.split(), "--help"])
    return ""


def run(argv: Sequence[str], *, console: Console | None = None, shared: App | None = None) -> int:
    """Run one command; the exit status (0 ok, 1 failed, 2 usage)."""
    console = console or Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        args = build_parser().parse_args(list(argv))
        if not hasattr(args, "handler"):
            if args.command is None:
                build_parser().print_help()
                return 0
            raise CliError(f"`{args.command}` needs a subcommand", hint=f"see `kubectl finetune {args.command} --help`", code=2)
        app = App(args, console)
        if shared is not None and shared._jobs is not None and args.namespace in (None, shared.namespace):
            app._jobs = shared._jobs
        args.handler(app)
        if shared is not None and shared._jobs is None:
            shared._jobs = app._jobs
        return 0
    except CliError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        for detail in exc.details:
            errors.print(f"  {detail}", markup=False, highlight=False)
        if exc.hint:
            errors.print(f"hint: {exc.hint}", markup=False, highlight=False)
        return exc.code
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def make_console() -> Console:
    """Tables keep their width when piped (rich would assume 80 columns)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=160)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv, console=make_console()))


if __name__ == "__main__":
    main()
