"""`add dataset`: validate every record with the trainer's preflight, count, upload to the registry.

The decisions are in `datasets` (format, counts, file:line errors), the I/O in `storage`.
Called through `parser`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from finetune_cli import datasets, storage
from finetune_cli.app import App
from finetune_cli.errors import CliError


def cmd_add_dataset(app: App) -> None:
    args = app.args
    registry = app.registry()
    if registry.exists(args.name) and not args.replace:
        raise CliError(
            f"dataset {args.name} already exists in {registry.uri}",
            hint="pass --replace to overwrite it, or choose another --name",
        )
    if any(p.startswith("s3://") for p in [*args.paths, *(args.eval_paths or [])]):
        app.storage_keys()
    where = app.location()
    files = storage.read_files(args.paths, "train", where=where) + storage.read_files(
        args.eval_paths or [], "eval", where=where
    )
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        summary = datasets.summarize(args.name, files, format=args.format, created=created)  # type: ignore[arg-type]
    except datasets.DatasetError as exc:
        raise CliError(
            str(exc), details=exc.details, hint="fix the records (file:line above) and run the command again"
        ) from None
    registry.save(summary, [(s, split, c) for s, split, c in files], replace=args.replace)
    result = {**summary.to_metadata(), "uri": f"{registry.uri}{args.name}/"}
    if not app.data(result):
        app.say(
            f"dataset {args.name} registered: {summary.format}, {summary.train_records} train records"
            + (
                f", {summary.eval_records} eval records"
                if summary.eval_records
                else " (eval: evalSize records held out)"
            )
            + f", {len(summary.files)} file(s) in {registry.uri}{args.name}/"
        )
        app.say(f"use it with: kubectl finetune experiment add --dataset {args.name}")
