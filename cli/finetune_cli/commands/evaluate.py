"""`eval`: evaluate a checkpoint, a catalog model or a URI on a dataset, without training.

Creates a FineTuneJob in mode Evaluate (`experiments.eval_manifest`) and, with `--wait`, prints
its result as `compare` would. Called through `parser`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from finetune_cli import experiments, reading, storage, views
from finetune_cli.app import App
from finetune_cli.errors import CliError
from finetune_trainer.catalog import CATALOG
from finetune_trainer.config import uri_name

TERMINAL = reading.TERMINAL_PHASES


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
        model, model_text = {"uri": args.uri}, uri_name(args.uri)
    else:
        if args.model not in CATALOG:
            raise CliError(
                f"unknown catalog model {args.model!r}",
                hint="see `kubectl finetune list models`, or pass --uri",
            )
        model, model_text = {"name": args.model}, args.model
    if args.dataset:
        dataset: dict[str, Any] = {"name": args.dataset, "format": args.format or "text"}
        registered = app.registered(args.dataset)
        if registered:
            if registered[0]:
                storage_spec["datasetsUri"] = registered[0]
            dataset["format"] = args.format or registered[1].get("format") or "text"
        data_text = args.dataset
    elif args.data:
        uris = [storage.as_uri(p) for p in args.data]
        dataset = {"eval": uris, "format": args.format or "text"}
        data_text = uri_name(uris[0]).split(".")[0]
    elif source_job is not None:
        dataset = dict((source_job.get("spec") or {}).get("dataset") or {})
        data_text = reading.dataset_label(source_job)
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
        rows = [r for r in reading.compare_rows([job]) if r["kind"] == "evaluation"]
        phase = reading.phase_of(job)
        if rows or phase in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise CliError(
                f"no result after {args.timeout:.0f}s; job {name} is {phase}",
                hint=f"check later: kubectl finetune compare {name}",
            )
        time.sleep(args.interval)
    if not rows:
        message = (job.get("status") or {}).get("message") or ""
        raise CliError(f"evaluation job {name} ended {phase} without a result: {message}")
    app.view(views.compare_view([job]))
