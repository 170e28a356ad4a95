"""Data sources as streams of records: which files a dataset names, cut into work units, each read
record by record without holding a file in memory. The one home of the file-kind rules.

Called by the tokenizer (`shards`) in its worker processes and, through `data.preflight`, by
`finetune-trainer check` and `kubectl finetune add dataset` (which also reads `first_record` to
detect a file's format, and `is_data_file` / `check_name` to list folders). No torch, no
tokenizer here.

File kinds, by name (a compression suffix may follow the kind's suffix):
- `.parquet`: one record per row (pyarrow, read one row group at a time; only the dataset's
  fields are read); compression is Parquet's own (a `.parquet.gz` is an error).
- `.txt`: one document per file (the whole file is one text record).
- anything else: JSONL, one JSON object per line; blank lines are skipped. In folders the CLI
  lists only `.jsonl`, `.json`, `.txt` and `.parquet` names (`DATA_SUFFIXES`).
- compressed: `.gz` (gzip) and `.zst`/`.zstd` (Zstandard), streamed. Any other compression suffix
  (`.bz2`, `.xz`, `.lz4`, `.br`, `.zip`, `.7z`, `.tar`) is an error naming the file.

Where a record comes from is `file:line` (JSONL; the line in the uncompressed text), `file:row N`
(Parquet, 1-based) or `file` (.txt): the form every preflight message uses.

Work units: an uncompressed JSONL file larger than UNIT_BYTES is cut at byte offsets into several
units (a unit owns every line that starts inside its range), so one large file is tokenized by
all cores; every other file is one unit. Units are ordered by (file, offset), which fixes the
order of documents in the token shards.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.records import check_record
from finetune_trainer.storage import ObjectInfo, Store, expand

UNIT_BYTES = 32 * 1024 * 1024
READ_CHUNK = 1024 * 1024
PARQUET_BATCH = 1024
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
UNSUPPORTED_COMPRESSIONS = (".bz2", ".xz", ".lz4", ".br", ".zip", ".7z", ".tar", ".lzma", ".z", ".snappy")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
ALLOWED = (
    "JSONL (.jsonl, .json), Parquet (.parquet) or plain-text (.txt) files, JSONL and .txt optionally "
    "compressed with gzip (.gz) or zstd (.zst, .zstd)"
)
NO_RECORDS = {
    "jsonl": "no records: the file is empty or holds only blank lines (JSONL is one JSON object per line)",
    "parquet": "no records: the Parquet file has no rows",
    "txt": "empty file (a .txt file is one text document)",
}


class ReadableStore(Protocol):
    """What reading a unit needs of a store (`storage.Store` has it)."""

    def open_read(self, key: str, start: int = 0) -> IO[bytes]: ...


@dataclass(frozen=True)
class SourceFile:
    store_uri: str
    key: str
    size: int
    version: str

    @property
    def name(self) -> str:
        return self.store_uri + self.key

    @property
    def compression(self) -> str | None:
        return compression_of(self.name)

    @property
    def kind(self) -> str:
        """ "parquet", "txt" or "jsonl"."""
        stem = _stem(self.name)
        if stem.endswith(".parquet"):
            return "parquet"
        if stem.endswith(".txt"):
            return "txt"
        return "jsonl"


@dataclass(frozen=True)
class Unit:
    """A piece of one file: bytes [start, end) of an uncompressed JSONL file, else the whole file
    (start 0, end None)."""

    file: SourceFile
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Problem:
    line: int  # line (JSONL), row (Parquet) or 0 (the whole file), within the unit
    message: str


@dataclass(frozen=True)
class Item:
    """One position of a unit: a record (`data`), what is wrong with it (`problem`), or neither
    (a blank line, which still counts for the line numbers of later units)."""

    line: int
    data: dict[str, Any] | None
    problem: str | None = None


class BadRecords(InvalidData):
    """Records that the preflight or the tokenizer rejected: `count` of them, the first few
    (`details`) as `file:line: why`."""

    def __init__(self, count: int, shown: list[str]) -> None:
        more = count - len(shown)
        super().__init__(
            f"dataset preflight failed: {count} bad record(s)" + (f" ({more} not shown)" if more > 0 else ""),
            details=shown,
        )
        self.count = count


def compression_of(name: str) -> str | None:
    """The compression a file name says, or None; InvalidData for a compression we cannot read."""
    lower = name.lower()
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            return kind
    for suffix in UNSUPPORTED_COMPRESSIONS:
        if lower.endswith(suffix):
            raise InvalidData(f"{name}: compression {suffix[1:]!r} is not supported; use {ALLOWED}")
    return None


def _compression_suffix(name: str) -> str:
    lower = name.lower()
    return next(s for s in COMPRESSIONS if lower.endswith(s))


def check_name(name: str) -> None:
    """InvalidData naming the file when its name says something we cannot read: an unknown
    compression, or a Parquet file compressed from outside (Parquet compresses itself)."""
    if compression_of(name) is not None and _stem(name).endswith(".parquet"):
        raise InvalidData(
            f"{name}: a Parquet file is not read through {_compression_suffix(name)}; Parquet compresses "
            "its own pages: upload the .parquet file as it is"
        )


def is_data_file(name: str) -> bool:
    """Whether a file in a folder or glob is a dataset file by its name (DATA_SUFFIXES, after a
    compression suffix, read or not: an unreadable one is then reported by `check_name`)."""
    lower = name.lower()
    for suffix in (*COMPRESSIONS, *UNSUPPORTED_COMPRESSIONS):
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    return lower.endswith(DATA_SUFFIXES)


def _stem(name: str) -> str:
    """The name without its (readable) compression suffix, lower case."""
    lower = name.lower()
    return lower[: -len(_compression_suffix(name))] if compression_of(name) else lower


# ---- listing ------------------------------------------------------------------------------------
def list_files(
    uris: Sequence[str], *, endpoint: str | None = None, region: str | None = None
) -> list[SourceFile]:
    """Every file the URIs name, in order (sorted within each URI). InvalidData names each URI that
    matches nothing and each file with a compression we cannot read."""
    files: list[SourceFile] = []
    errors: list[str] = []
    for uri in uris:
        matches = expand(uri, endpoint=endpoint, region=region)
        if not matches:
            errors.append(f"{uri}: no files match")
        for store, obj in matches:
            source = _source(store, obj)
            try:
                check_name(source.name)
            except InvalidData as exc:
                errors.append(str(exc))
            files.append(source)
    if errors:
        raise InvalidData(
            f"dataset preflight failed: {len(errors)} problem(s) with the files", details=errors
        )
    return files


def _source(store: Store, obj: ObjectInfo) -> SourceFile:
    return SourceFile(store.uri, obj.key, obj.size, obj.version)


def fingerprint(files: Sequence[SourceFile]) -> str:
    """What identifies the data without reading it: every file's name, size and version (mtime or
    ETag), as `datasets` fingerprints data files. A changed file changes it."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(json.dumps([f.name, f.size, f.version]).encode() + b"\n")
    return digest.hexdigest()


def units_of(files: Sequence[SourceFile], *, unit_bytes: int | None = None) -> list[Unit]:
    """The work units of the files, in order (default size UNIT_BYTES)."""
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[Unit] = []
    for f in files:
        if f.kind == "jsonl" and f.compression is None and f.size > unit_bytes:
            starts = range(0, f.size, unit_bytes)
            units.extend(Unit(f, s, min(s + unit_bytes, f.size)) for s in starts)
        else:
            units.append(Unit(f))
    return units


# ---- reading --------------------------------------------------------------------------------------
class _RawReader(io.RawIOBase):
    """Adapts any object with read(n) (a botocore StreamingBody) to io's buffered readers."""

    def __init__(self, body: IO[bytes]) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def open_unit(unit: Unit, store: ReadableStore) -> tuple[IO[bytes], int]:
    """The unit's bytes, decompressed, buffered, positioned at the first line the unit owns; and
    that line's byte offset in the file."""
    start = max(0, unit.start - 1)
    raw: IO[bytes] = io.BufferedReader(_RawReader(store.open_read(unit.file.key, start)), READ_CHUNK)
    if unit.start > 0:
        start += len(raw.readline())  # the line that started before this unit belongs to the previous one
    compression = unit.file.compression
    head = raw.peek(4)[:4] if isinstance(raw, io.BufferedReader) else b""
    if compression == "gzip":
        if not head.startswith(GZIP_MAGIC):
            raw.close()
            raise InvalidData(
                f"{unit.file.name}: named .gz but is not gzip data; gzip-compress it, or drop the .gz from "
                "the name of an uncompressed file"
            )
        import gzip

        return io.BufferedReader(gzip.GzipFile(fileobj=raw), READ_CHUNK), 0
    if compression == "zstd":
        if not head.startswith(ZSTD_MAGIC):
            raw.close()
            raise InvalidData(
                f"{unit.file.name}: named {_compression_suffix(unit.file.name)} but is not Zstandard data; "
                "compress it with zstd, or drop the suffix from the name of an uncompressed file"
            )
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), READ_CHUNK), 0
    if (
        unit.file.kind == "jsonl"
        and unit.start == 0
        and (head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC))
    ):
        raw.close()
        kind = "gzip" if head.startswith(GZIP_MAGIC) else "Zstandard"
        raise InvalidData(f"{unit.file.name}: is {kind}-compressed data; name it .gz or .zst")
    return raw, start


def read_unit(unit: Unit, store: ReadableStore, spec: DatasetSpec) -> Iterator[Item]:
    """Every position of the unit, in order: records that pass `check`, and problems, each with its
    line (or row) within the unit. Nothing beyond one line (one Parquet batch) is held."""

    kind = unit.file.kind
    if kind == "parquet":
        yield from _read_parquet(unit, store, spec)
        return
    stream, position = open_unit(unit, store)
    with stream:
        if kind == "txt":
            if spec.format != "text":
                yield Item(0, None, f".txt files hold plain text, but dataset.format is {spec.format}")
                return
            yield from _read_txt(stream, spec)
            return
        any_record = False
        for item in _json_lines(stream, position, unit.end):
            any_record = any_record or item.data is not None or item.problem is not None
            if item.data is not None:
                problem = check_record(item.data, spec)
                yield Item(item.line, None if problem else item.data, problem)
            else:
                yield item
        if not any_record and unit.start == 0 and unit.end is None:
            yield Item(0, None, NO_RECORDS["jsonl"])


def _json_lines(stream: IO[bytes], position: int, end: int | None) -> Iterator[Item]:
    """The lines of a JSONL stream from byte `position` up to `end` (None: its end), numbered from
    1: each a JSON object as parsed (not checked against a dataset), a problem, or blank."""
    number = 0
    while end is None or position < end:
        line = stream.readline()
        if not line:
            break
        position += len(line)
        number += 1
        if not line.strip():
            yield Item(number, None)  # neither record nor problem: counts the line
            continue
        try:
            data = json.loads(line)
        except UnicodeDecodeError as exc:
            yield Item(number, None, f"not UTF-8 ({exc.reason} at byte {exc.start} of the line)")
            continue
        except json.JSONDecodeError as exc:
            yield Item(number, None, f"invalid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict):
            yield Item(number, None, f"a record must be a JSON object, got {_json_type(data)}")
            continue
        yield Item(number, data)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@dataclass(frozen=True)
class FirstRecord:
    """What a file's first record says about its format: the file's kind, where the record is
    (`file:line`, `file:row 1`, `file`) and its field names (a Parquet file's columns; none for a
    .txt file, which is text)."""

    kind: str
    where: str
    fields: tuple[str, ...]


def first_record(file: SourceFile, store: ReadableStore) -> FirstRecord:
    """The first record of a file, read without reading the rest (a Parquet file: its schema and
    row count). InvalidData names the file (and line) when it cannot be read as its name says,
    holds no record, or its first non-blank line is not a JSON object."""
    check_name(file.name)
    if file.kind == "txt":
        return FirstRecord("txt", file.name, ())
    if file.kind == "parquet":
        with store.open_read(file.key) as handle:
            parquet = _parquet_file(handle)
            if isinstance(parquet, str):
                raise InvalidData(f"{file.name}: {parquet}")
            if parquet.metadata.num_rows == 0:
                raise InvalidData(f"{file.name}: {NO_RECORDS['parquet']}")
            return FirstRecord("parquet", f"{file.name}:row 1", tuple(parquet.schema_arrow.names))
    stream, position = open_unit(Unit(file), store)
    with stream:
        for item in _json_lines(stream, position, None):
            if item.problem is not None:
                raise InvalidData(f"{file.name}:{item.line}: {item.problem}")
            if item.data is not None:
                return FirstRecord("jsonl", f"{file.name}:{item.line}", tuple(item.data))
    raise InvalidData(f"{file.name}: {NO_RECORDS['jsonl']}")


def _read_txt(stream: IO[bytes], spec: DatasetSpec) -> Iterator[Item]:
    content = stream.read()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield Item(0, None, f"not UTF-8 ({exc.reason} at byte {exc.start})")
        return
    if not text.strip():
        yield Item(0, None, NO_RECORDS["txt"])
        return
    yield Item(1, {spec.text_field: text})


def spec_fields(spec: DatasetSpec) -> list[str]:
    if spec.format == "text":
        return [spec.text_field]
    if spec.format == "prompt-completion":
        return [spec.prompt_field, spec.completion_field]
    return [spec.messages_field]


def _parquet_file(handle: IO[bytes]) -> Any:
    """A pyarrow ParquetFile over an open object, or why it is not one (a str). Parquet keeps its
    footer at the end, so it needs a seekable file: local files are; an S3 object is read whole
    into memory (one file at a time: the caller cuts corpora into files)."""
    import pyarrow.parquet as pq

    source: Any = handle if handle.seekable() else io.BytesIO(handle.read())
    try:
        return pq.ParquetFile(source)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
        return f"not a Parquet file ({exc})"


def _read_parquet(unit: Unit, store: ReadableStore, spec: DatasetSpec) -> Iterator[Item]:
    """Rows of the dataset's fields, one row group's batch at a time. A file without a field the
    format needs is one problem naming the field and the columns it has."""

    with store.open_read(unit.file.key) as handle:
        parquet = _parquet_file(handle)
        if isinstance(parquet, str):
            yield Item(0, None, parquet)
            return
        columns = parquet.schema_arrow.names
        fields = spec_fields(spec)
        missing = [f for f in fields if f not in columns]
        if missing:
            setting = {"text": "dataset.textField", "chat": "dataset.messagesField"}.get(
                spec.format, "dataset.promptField / dataset.completionField"
            )
            yield Item(
                0,
                None,
                f"no column {', '.join(map(repr, missing))} ({setting}); the file has columns {columns}",
            )
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=fields):
            for data in batch.to_pylist():
                row += 1
                problem = check_record(data, spec)
                yield Item(row, None if problem else data, problem)
        if row == 0:
            yield Item(0, None, NO_RECORDS["parquet"])


def where(unit: Unit, line: int, line_offset: int) -> str:
    """`file:line` for a problem at `line` of a unit whose file has `line_offset` lines before it."""
    name = unit.file.name
    if line == 0:
        return name
    if unit.file.kind == "parquet":
        return f"{name}:row {line}"
    return f"{name}:{line + line_offset}"
