"""Object storage for runs, models and data: `file://` and `s3://` behind one small interface.

Called by the trainer's data, model and checkpoint code. Credentials come only from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); the endpoint from the config. Keys are
'/'-separated and relative to the store's root URI. No torch here.

An S3 server that is unreachable or answers 5xx (restarted, overloaded) does not end the run:
every S3Store operation is retried with exponential backoff (`with_retries`: 1 s doubling to
30 s) for up to FINETUNE_STORAGE_RETRY_SECONDS (default 600), each retry logged as a warning;
after that `StorageUnreachable` says what failed, for how long and what to check (the pod fails
and the Job retries it). A retried upload
starts the object again from its first byte, so no object is ever half written; a checkpoint
exists only once its manifest, uploaded last, does.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

MULTIPART_CHUNK = 8 * 1024 * 1024
HASH_CHUNK = 4 * 1024 * 1024
ENV_RETRY_SECONDS = "FINETUNE_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 600.0
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """An error a later attempt may not see: the server unreachable, the connection dropped, a
    timeout, a 5xx or throttling answer. Not: 4xx (a missing key, no permission, a bad bucket)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError):  # EndpointConnectionError, timeouts, ...
        return True
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata") or {}
        code = str((exc.response.get("Error") or {}).get("Code") or "")
        return int(meta.get("HTTPStatusCode") or 0) >= 500 or code in (
            "SlowDown",
            "Throttling",
            "RequestTimeout",
        )
    if isinstance(exc, S3UploadFailedError):  # boto3 wraps the multipart failure's cause as text
        return any(
            word in str(exc) for word in ("Could not connect", "Connection", "timed out", "(5", "SlowDown")
        )
    return False


def with_retries(
    operation: Callable[[], T],
    *,
    what: str,
    budget_seconds: float,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> T:
    """`operation()`, again after transient errors with exponential backoff (full jitter on the
    upper half), until `budget_seconds` have passed; then `StorageUnreachable` from its last
    error. A permanent error is raised as it is, at once."""
    started = clock()
    delay = FIRST_BACKOFF_SECONDS
    attempt = 1
    while True:
        try:
            return operation()
        except Exception as exc:
            waited = clock() - started
            if not transient(exc):
                raise
            if waited + delay > budget_seconds:
                raise StorageUnreachable(what, attempt, waited, exc) from exc
            pause = delay * (0.5 + 0.5 * jitter())
            log.warning(
                "storage: %s failed (attempt %d, %s); retrying in %.1fs (giving up after %.0fs)",
                what,
                attempt,
                _short(exc),
                pause,
                budget_seconds,
            )
            sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
            attempt += 1


class StorageUnreachable(Exception):
    """Object storage kept failing with transient errors until the retry budget ran out; the
    message says what, for how long, the last error and what to check — no traceback needed."""

    def __init__(self, what: str, attempts: int, waited: float, last: BaseException) -> None:
        super().__init__(
            f"object storage: {what} failed {attempts} times over {waited:.0f} s (last: {_short(last)}); "
            f"gave up after {ENV_RETRY_SECONDS}: check storage.endpoint and that the S3 server is up "
            "(the Job's backoffLimit retries the attempt, which resumes from the newest complete checkpoint)"
        )
        self.what, self.attempts, self.waited = what, attempts, waited


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """An S3Store method run under `with_retries` (the store's budget)."""

    @functools.wraps(method)
    def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> T:
        what = f"{method.__name__} {self.uri}{args[0] if args and isinstance(args[0], str) else ''}"
        return with_retries(
            lambda: method(self, *args, **kwargs), what=what, budget_seconds=self.retry_seconds
        )

    return wrapper


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the listed prefix
    size: int
    version: str = ""  # what changes when the content does: mtime (file://) or ETag (s3://)


class Store(Protocol):
    """A flat key space rooted at one URI (a 'folder')."""

    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def read_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str, start: int = 0) -> IO[bytes]:
        """A sequential binary reader of the object from byte `start` on (the caller closes it)."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, local: Path, key: str) -> None: ...
    def upload_file_hashed(self, local: Path, key: str) -> str:
        """Upload and return the SHA-256, reading the file once."""
        ...

    def download_file(self, key: str, local: Path) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def exists(self, key: str) -> bool: ...


class LocalStore:
    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.root = Path(unquote(parsed.netloc + parsed.path))

    def _path(self, key: str) -> Path:
        return self.root / key

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            stat = base.stat()
            return [ObjectInfo(prefix, stat.st_size, str(stat.st_mtime_ns))]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".partial"):
                stat = p.stat()
                out.append(
                    ObjectInfo(p.relative_to(self.root).as_posix(), stat.st_size, str(stat.st_mtime_ns))
                )
        return out

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open_read(self, key: str, start: int = 0) -> IO[bytes]:
        handle = self._path(key).open("rb")
        handle.seek(start)
        return handle

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def upload_file_hashed(self, local: Path, key: str) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        digest = hashlib.sha256()
        with local.open("rb") as source, tmp.open("wb") as target:
            for chunk in iter(lambda: source.read(HASH_CHUNK), b""):
                digest.update(chunk)
                target.write(chunk)
        os.replace(tmp, path)
        return digest.hexdigest()

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class S3Store:
    def __init__(
        self,
        uri: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(uri)
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        # a session of its own: it reads the credentials in the environment now (boto3's default
        # session keeps the first it ever read, wrong for a process that opens several stores)
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=8
        )
        self.retry_seconds = (
            retry_seconds
            if retry_seconds is not None
            else float(os.environ.get(ENV_RETRY_SECONDS) or DEFAULT_RETRY_SECONDS)
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    @_retried
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix)
        out: list[ObjectInfo] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                out.append(
                    ObjectInfo(obj["Key"][len(self.prefix) :], int(obj["Size"]), str(obj.get("ETag", "")))
                )
        if prefix and not prefix.endswith("/"):  # a prefix names a folder or one exact object
            out = [o for o in out if o.key == prefix or o.key.startswith(prefix + "/")]
        return sorted(out, key=lambda o: o.key)

    @_retried
    def read_bytes(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        return body

    @_retried
    def open_read(self, key: str, start: int = 0) -> IO[bytes]:
        extra = {"Range": f"bytes={start}-"} if start else {}
        body: IO[bytes] = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]
        return body

    @_retried
    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    @_retried
    def upload_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key), Config=self.transfer)

    @_retried
    def upload_file_hashed(self, local: Path, key: str) -> str:
        """Multipart upload from a sequential reader that hashes what it hands to boto3."""
        with local.open("rb") as handle:
            reader = _HashingReader(handle)
            self.client.upload_fileobj(reader, self.bucket, self._key(key), Config=self.transfer)
        return reader.digest.hexdigest()

    @_retried
    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)

    @_retried
    def delete_prefix(self, prefix: str) -> None:
        keys = [o.key for o in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in keys[i : i + 1000]], "Quiet": True},
            )

    @_retried
    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError as exc:
            if is_transient(exc):  # a 503 must not make a manifest look absent
                raise
            return False
        return True


class _HashingReader:
    """A non-seekable reader: boto3 then reads it strictly in order, so the hash is of the file."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.handle.read(size)
        self.digest.update(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def open_store(uri: str, *, endpoint: str | None = None, region: str | None = None) -> Store:
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return LocalStore(uri)
    if scheme == "s3":
        return S3Store(uri, endpoint=endpoint, region=region)
    raise ValueError(f"unsupported storage URI {uri!r}: expected file:// or s3://")


def split_glob(uri: str) -> tuple[str, str]:
    """'s3://b/data/train-*.jsonl' -> ('s3://b/data/', 'train-*.jsonl'); no glob -> (dir, name)."""
    scheme, rest = uri.split("://", 1)
    parts = rest.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return f"{scheme}://{'/'.join(parts[:i])}/", "/".join(parts[i:])
    return f"{scheme}://{'/'.join(parts[:-1])}/", parts[-1]


def expand(
    uri: str, *, endpoint: str | None = None, region: str | None = None
) -> list[tuple[Store, ObjectInfo]]:
    """Files matching a URI with optional globs (`*` within a path segment, `**` across), or every
    file below it when it names a folder. Sorted by key."""
    root, pattern = split_glob(uri)
    store = open_store(root, endpoint=endpoint, region=region)
    if not any(c in pattern for c in "*?["):
        return [(store, o) for o in store.list(pattern)]
    fixed = pattern.split("*")[0].rsplit("/", 1)[0] if "/" in pattern.split("*")[0] else ""
    return [(store, o) for o in store.list(fixed) if _glob_match(o.key, pattern)]


def _glob_match(key: str, pattern: str) -> bool:
    if "**" in pattern:
        return fnmatch.fnmatchcase(key, pattern.replace("**/", "*").replace("**", "*"))
    return len(key.split("/")) == len(pattern.split("/")) and fnmatch.fnmatchcase(key, pattern)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_local_files(folder: Path) -> Iterator[Path]:
    yield from (p for p in sorted(folder.rglob("*")) if p.is_file())
