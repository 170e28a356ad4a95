"""`experiment add | view | delete`: experiments are suspended FineTuneJobs.

`add` opens a template in $EDITOR (or reads `-f FILE`), validates it by a server-side dry run and
the catalog, and reopens the editor with the errors on top until it is valid or left unchanged.
Manifests come from `experiments` (pure). Called through `parser`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from finetune_cli import experiments, views
from finetune_cli.app import App
from finetune_cli.errors import CliError
from finetune_trainer.catalog import CATALOG

DEFAULT_MODEL = "smollm2-135m-instruct"


def editor_command(env: Mapping[str, str] = os.environ) -> list[str]:
    return shlex.split(env.get("KUBE_EDITOR") or env.get("EDITOR") or "vi")


def run_editor(text: str) -> str:
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="finetune-experiment-", delete=False
    ) as handle:
        handle.write(text)
        path = Path(handle.name)
    try:
        command = [*editor_command(), str(path)]
        try:
            result = subprocess.run(command, check=False)
        except FileNotFoundError:
            raise CliError(
                f"editor {command[0]!r} not found", hint="set EDITOR (e.g. EDITOR=nano), or pass -f FILE"
            ) from None
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
    """Catalog names the operator would reject (it can only say so after the job is created).
    Shapes it cannot read (a model that is not a mapping, a name that is not a string) are left
    to the API server's dry run, which names them."""

    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    spec = mapping(manifest.get("spec"))
    problems = []
    models = [("spec.model.name", mapping(spec.get("model")).get("name"))]
    baselines = mapping(spec.get("evaluation")).get("baselines")
    for i, baseline in enumerate(baselines if isinstance(baselines, list) else []):
        models.append((f"spec.evaluation.baselines[{i}].name", mapping(baseline).get("name")))
    for field, name in models:
        if isinstance(name, str) and name and name not in CATALOG:
            problems.append(
                f"{field}: unknown catalog model {name!r} (see `kubectl finetune list models`, or use uri:)"
            )
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
        text = experiments.template(
            name=name, model=model, dataset=args.dataset, data_format=data_format, datasets_uri=datasets_uri
        )
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
        shown["metadata"] = {
            k: meta[k] for k in ("name", "namespace", "labels", "creationTimestamp") if k in meta
        }
        if not app.data(shown):
            app.console.print(yaml.safe_dump(shown, sort_keys=False), end="", markup=False, highlight=False)
        return
    jobs = app.jobs.list(all_namespaces=app.all_namespaces)
    found = [j for j in experiments.newest_first(jobs) if experiments.role(j) == experiments.ROLE_EXPERIMENT]
    app.view(views.experiments_view(found, namespace=app.namespace, all_namespaces=app.all_namespaces))


def cmd_experiment_delete(app: App) -> None:
    for name in app.args.names:
        app.jobs.delete(name)
        app.say(f"FineTuneJob {name} deleted (its run folder in object storage is kept)")
