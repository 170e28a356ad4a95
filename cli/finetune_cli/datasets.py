"""Datasets: format detection, record and token counts, and what is reported for `add dataset`
(pure decisions; the command streams the files through `storage`).

A registered dataset `N` is a folder of the registry (the operator's `datasetsUri`):
`<datasetsUri>N/train/<files>`, optionally `N/eval/<files>`, and `N/dataset.json` describing it
(written last, so a half-uploaded dataset is not listed). That is the layout the trainer reads for
`spec.dataset.name` (`finetune_trainer.data.plan_data`). Records are checked, and tokens counted,
by the trainer's own streaming preflight (`finetune_trainer.data.preflight`), so a dataset the
CLI accepts is one the trainer accepts, and its token count is what the token shards will hold.
Called by `commands.add`; the I/O is in `storage` and `tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from finetune_trainer.config import uri_name
from finetune_trainer.data import BadRecords, PreflightReport
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import FirstRecord

Format = Literal["text", "prompt-completion", "chat"]
Split = Literal["train", "eval"]
METADATA = "dataset.json"


class DatasetError(ValueError):
    """Why the files cannot be registered; `details` lists file:line problems."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


def detect_format(first: FirstRecord) -> Format:
    """The format of one file from its first record (`sources.first_record`, which reads every
    kind the trainer reads): a .txt file is text; JSONL and Parquet by the record's fields (a
    Parquet file's columns)."""
    if first.kind == "txt":
        return "text"
    fields = set(first.fields)
    if "messages" in fields:
        return "chat"
    if "prompt" in fields and "completion" in fields:
        return "prompt-completion"
    if "text" in fields:
        return "text"
    what = "columns" if first.kind == "parquet" else "fields"
    raise DatasetError(
        f"{first.where}: cannot tell the format from the {what} {sorted(fields)}: a registered dataset "
        "has a 'text' field (text), 'prompt' and 'completion' (prompt-completion) or 'messages' (chat); "
        f"rename the {what[:-1]}, or give the files in an experiment's dataset.train with dataset.textField "
        "(promptField, completionField, messagesField)"
    )


def check_file_set(files: Sequence[tuple[str, Split]]) -> None:
    """A registrable set has files, and training files among them."""
    if not files:
        raise DatasetError("no files to register: --paths matched nothing")
    if not any(split == "train" for _, split in files):
        raise DatasetError("no training files: give at least one path in --paths")


def choose_format(detected: Mapping[str, Format]) -> Format:
    """The one format every file has; files that disagree are an error listing each."""
    formats = set(detected.values())
    if len(formats) > 1:
        raise DatasetError(
            "the files have different formats; register them as separate datasets or pass --format",
            [f"{source}: {fmt}" for source, fmt in detected.items()],
        )
    return formats.pop()


def rejection(exc: InvalidData) -> DatasetError:
    """What the preflight's failure says to the user: bad records counted (the first shown with
    file:line), or the one problem with the files."""
    if isinstance(exc, BadRecords):
        more = exc.count - len(exc.details)
        return DatasetError(
            f"{exc.count} record(s) the trainer would reject"
            + (f" ({more} more not shown)" if more > 0 else "")
            + "; fix them and retry",
            exc.details,
        )
    return DatasetError(exc.args[0], exc.details)


@dataclass(frozen=True)
class FileSummary:
    source: str
    split: Split
    records: int
    bytes: int
    tokens: int | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """What `add dataset` found. `tokenizer` names what counted the tokens, or says why they were
    not counted (then every file's tokens is None)."""

    name: str
    format: Format
    files: list[FileSummary] = field(default_factory=list)
    created: str | None = None
    tokenizer: str | None = None

    @property
    def train_records(self) -> int:
        return sum(f.records for f in self.files if f.split == "train")

    @property
    def eval_records(self) -> int:
        return sum(f.records for f in self.files if f.split == "eval")

    @property
    def counted_tokens(self) -> bool:
        return bool(self.files) and all(f.tokens is not None for f in self.files)

    def tokens(self, split: Split) -> int | None:
        return sum(f.tokens or 0 for f in self.files if f.split == split) if self.counted_tokens else None

    def to_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "trainRecords": self.train_records,
            "evalRecords": self.eval_records,
            "trainTokens": self.tokens("train"),
            "evalTokens": self.tokens("eval") if self.eval_records else None,
            "tokenizer": self.tokenizer,
            "created": self.created,
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_metadata(cls, data: dict[str, Any]) -> DatasetSummary:
        known = {f for f in FileSummary.__dataclass_fields__}
        return cls(
            name=str(data["name"]),
            format=data["format"],
            files=[FileSummary(**{k: v for k, v in f.items() if k in known}) for f in data.get("files", [])],
            created=data.get("created"),
            tokenizer=data.get("tokenizer"),
        )


def summarize(
    name: str,
    format: Format,
    files: Sequence[tuple[str, Split, int]],
    report: PreflightReport,
    *,
    tokenizer: str,
    created: str | None = None,
) -> DatasetSummary:
    """The summary of files (source name, split, size in bytes) that passed the preflight."""
    tokens = report.tokens
    return DatasetSummary(
        name=name,
        format=format,
        files=[
            FileSummary(
                source=source,
                split=split,
                records=report.records.get(source, 0),
                bytes=size,
                tokens=None if tokens is None else tokens.get(source, 0),
            )
            for source, split, size in files
        ],
        created=created,
        tokenizer=tokenizer,
    )


def upload_key(name: str, split: str, source: str, taken: set[str]) -> str:
    """`<name>/<split>/<file name>`, made unique when two sources share a file name."""
    base = uri_name(source)
    key = f"{name}/{split}/{base}"
    stem, dot, ext = base.partition(".")
    number = 1
    while key in taken:
        number += 1
        key = f"{name}/{split}/{stem}-{number}{dot}{ext}"
    taken.add(key)
    return key
