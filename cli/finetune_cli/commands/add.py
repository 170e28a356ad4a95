"""`add dataset`: stream every record through the trainer's preflight, count records and tokens
per split, upload to the registry.

The decisions are in `datasets` (format, counts, what an error says), the I/O in `storage`
(listing, streaming, upload) and `tokens` (which tokenizer counts). Called through `parser`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from finetune_cli import datasets, storage, tokens
from finetune_cli.app import App
from finetune_cli.commands.experiment import DEFAULT_MODEL
from finetune_cli.errors import CliError
from finetune_operator.api import rfc3339
from finetune_trainer.config import NAME_PATTERN, DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import SourceFile

NAME_MAX_LENGTH = 63  # DatasetSpec.name's


def cmd_add_dataset(app: App) -> None:
    args = app.args
    if len(args.name) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, args.name):
        raise CliError(
            f"--name {args.name!r}: a dataset name is 1 to {NAME_MAX_LENGTH} lowercase letters, digits, "
            "'.', '_' and '-', starting and ending with a letter or digit",
            hint="for example --name market-reports",
            code=2,
        )
    registry = app.registry()
    if registry.exists(args.name) and not args.replace:
        raise CliError(
            f"dataset {args.name} already exists in {registry.uri}",
            hint="pass --replace to overwrite it, or choose another --name",
        )
    if any(p.startswith("s3://") for p in [*args.paths, *(args.eval_paths or [])]):
        app.storage_keys()
    where = app.location()
    files = storage.list_sources(args.paths, "train", where=where) + storage.list_sources(
        args.eval_paths or [], "eval", where=where
    )
    own = [f.name for f, _ in files if _inside(f.name, f"{registry.uri}{args.name}/")]
    if own and args.replace:  # replacing deletes the dataset's folder before the copy
        raise CliError(
            f"--paths/--eval-paths name files of dataset {args.name} itself, which --replace would "
            "delete before copying them",
            details=own[:5],
            hint="copy them elsewhere first and register that copy, or choose another --name",
        )
    created = rfc3339(datetime.now(UTC))
    try:
        summary = check_dataset(
            args.name,
            files,
            format=args.format,
            tokenizer=args.tokenizer or DEFAULT_MODEL,
            where=where,
            created=created,
        )
    except datasets.DatasetError as exc:
        raise CliError(
            str(exc),
            details=exc.details,
            hint="fix the files or records named above (file, file:line) and run the command again",
        ) from None
    registry.save(summary, files, replace=args.replace, where=where)  # type: ignore[arg-type]
    result = {**summary.to_metadata(), "uri": f"{registry.uri}{args.name}/"}
    if not app.data(result):
        app.say(
            f"dataset {args.name} registered: {summary.format}, {_split(summary, 'train')}"
            + (
                f", {_split(summary, 'eval')}"
                if summary.eval_records
                else " (eval: evalSize records held out)"
            )
            + f", {len(summary.files)} file(s) in {registry.uri}{args.name}/"
        )
        if summary.counted_tokens:
            app.say(f"tokens counted with {summary.tokenizer}")
        else:
            app.say(str(summary.tokenizer))
        app.say(f"use it with: kubectl finetune experiment add --dataset {args.name}")


def check_dataset(
    name: str,
    files: list[tuple[SourceFile, datasets.Split]],
    *,
    format: datasets.Format | None,
    tokenizer: str,
    where: storage.Location,
    created: str | None = None,
) -> datasets.DatasetSummary:
    """Stream every file through the trainer's preflight (format detected from each file's first
    record, `sources.first_record`, unless given) and count records, and tokens with `tokenizer` where it can be used.
    DatasetError says what the trainer would reject, by file:line."""
    datasets.check_file_set([(f.name, split) for f, split in files])
    try:
        if format is None:
            format = datasets.choose_format(
                {f.name: datasets.detect_format(storage.first_record(f, where)) for f, _ in files}
            )
        counting = tokens.find(tokenizer, format=format)
        spec = DatasetSpec(name=name, format=format)
        report = storage.preflight([f for f, _ in files], spec, tokenizer=counting.tokenizer, where=where)
    except InvalidData as exc:
        raise datasets.rejection(exc) from None
    return datasets.summarize(
        name,
        format,
        [(f.name, split, f.size) for f, split in files],
        report,
        tokenizer=counting.description,
        created=created,
    )


def _inside(uri: str, folder: str) -> bool:
    """Whether `uri` is below `folder` (both file:// or s3://; local paths compared resolved)."""
    if uri.startswith("file://") and folder.startswith("file://"):
        return Path(uri[7:]).resolve().is_relative_to(Path(folder[7:]).resolve())
    return uri.startswith(folder)


def _split(summary: datasets.DatasetSummary, split: datasets.Split) -> str:
    records = summary.train_records if split == "train" else summary.eval_records
    count = summary.tokens(split)
    return f"{records} {split} records" + (f" ({count:,} tokens)" if count is not None else "")
