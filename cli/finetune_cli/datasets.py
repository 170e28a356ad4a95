"""Datasets: format detection, validation and record counts for `add dataset` (pure).

A registered dataset `N` is a folder of the registry (the operator's `datasetsUri`):
`<datasetsUri>N/train/<files>`, optionally `N/eval/<files>`, and `N/dataset.json` describing it
(written last, so a half-uploaded dataset is not listed). That is the layout the trainer reads for
`spec.dataset.name` (`finetune_trainer.data.load_raw`). Records are checked with the trainer's own
preflight (`finetune_trainer.data.parse_file`), so a dataset the CLI accepts is one the trainer
accepts. Called by `main`; the I/O is in `storage`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import parse_file

Format = Literal["text", "prompt-completion", "chat"]
METADATA = "dataset.json"
MAX_ERRORS = 10


class DatasetError(ValueError):
    """Why the files cannot be registered; `details` lists file:line problems."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


def detect_format(name: str, content: bytes) -> Format:
    """The format of one file: .txt is text; JSONL by the keys of its first record."""
    if name.endswith(".txt"):
        return "text"
    for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{name}:{number}: a record must be a JSON object")
        if "messages" in record:
            return "chat"
        if "prompt" in record and "completion" in record:
            return "prompt-completion"
        if "text" in record:
            return "text"
        raise DatasetError(
            f"{name}:{number}: cannot tell the format from the fields {sorted(record)}: expected "
            "'text' (text), 'prompt' and 'completion' (prompt-completion) or 'messages' (chat); "
            "pass --format and the field names in the experiment"
        )
    raise DatasetError(f"{name}: no records")


@dataclass(frozen=True)
class FileSummary:
    source: str
    split: Literal["train", "eval"]
    records: int
    bytes: int


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    format: Format
    files: list[FileSummary] = field(default_factory=list)
    created: str | None = None

    @property
    def train_records(self) -> int:
        return sum(f.records for f in self.files if f.split == "train")

    @property
    def eval_records(self) -> int:
        return sum(f.records for f in self.files if f.split == "eval")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "trainRecords": self.train_records,
            "evalRecords": self.eval_records,
            "created": self.created,
            "files": [asdict(f) for f in self.files],
        }

    @classmethod
    def from_metadata(cls, data: dict[str, Any]) -> DatasetSummary:
        return cls(
            name=str(data["name"]),
            format=data["format"],
            files=[FileSummary(**f) for f in data.get("files", [])],
            created=data.get("created"),
        )


def summarize(
    name: str,
    files: list[tuple[str, Literal["train", "eval"], bytes]],
    *,
    format: Format | None = None,
    created: str | None = None,
) -> DatasetSummary:
    """Validate every record of every file (the trainer's preflight) and count them.

    `files` holds (source name, split, content). The format is `format` or the one detected in
    every file; files that disagree are an error. Raises DatasetError naming each bad record."""
    if not files:
        raise DatasetError("no files to register: --paths matched nothing")
    if not any(split == "train" for _, split, _ in files):
        raise DatasetError("no training files: give at least one path in --paths")
    if format is None:
        detected = {source: detect_format(source, content) for source, _, content in files}
        formats = set(detected.values())
        if len(formats) > 1:
            raise DatasetError(
                "the files have different formats; register them as separate datasets or pass --format",
                [f"{source}: {fmt}" for source, fmt in detected.items()],
            )
        format = formats.pop()
    spec = DatasetSpec(name=name, format=format)
    errors: list[str] = []
    summaries = []
    for source, split, content in files:
        records = parse_file(source, content, spec, errors)
        summaries.append(FileSummary(source=source, split=split, records=len(records), bytes=len(content)))
    if errors:
        shown = errors[:MAX_ERRORS]
        more = f" ({len(errors) - len(shown)} more not shown)" if len(errors) > len(shown) else ""
        raise DatasetError(
            f"{len(errors)} record(s) the trainer would reject{more}; fix them and retry", shown
        )
    return DatasetSummary(name=name, format=format, files=summaries, created=created)


def upload_key(name: str, split: str, source: str, taken: set[str]) -> str:
    """`<name>/<split>/<file name>`, made unique when two sources share a file name."""
    base = source.rstrip("/").rsplit("/", 1)[-1]
    key = f"{name}/{split}/{base}"
    stem, dot, ext = base.partition(".")
    number = 1
    while key in taken:
        number += 1
        key = f"{name}/{split}/{stem}-{number}{dot}{ext}"
    taken.add(key)
    return key
