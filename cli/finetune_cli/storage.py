"""The dataset registry and run folders in object storage (I/O).

Reuses the trainer's storage layer (`finetune_trainer.storage`: boto3 with
request_checksum_calculation / response_checksum_validation "when_required", path-style
addressing; file:// for local registries). The endpoint and region are resolved by `app.App`
(AWS_ENDPOINT_URL / AWS_REGION, else the cluster's defaults); the keys are the user's own
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, ~/.aws) or, when there are none, those of
the namespace's credentials Secret (`use_keys`). Layout: see `datasets`. Called by the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from finetune_cli.datasets import METADATA, DatasetSummary, upload_key
from finetune_cli.errors import CliError
from finetune_trainer import data, sources
from finetune_trainer.config import DatasetSpec
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import SourceFile
from finetune_trainer.storage import LocalStore, Store, expand, open_store

ENV_DATASETS_URI = "FINETUNE_DATASETS_URI"
COPY_CHUNK = 8 * 1024 * 1024
STORAGE_HINT = (
    "check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that the bucket exists"
)


def datasets_uri(
    flag: str | None, env: Mapping[str, str] = os.environ, *, default: str | None = None, source: str = ""
) -> str:
    """The registry: --datasets-uri, else $FINETUNE_DATASETS_URI, else the cluster's default."""
    uri = flag or env.get(ENV_DATASETS_URI) or default
    if not uri:
        raise CliError(
            "no dataset registry configured" + (f" ({source})" if source else ""),
            hint=f"set {ENV_DATASETS_URI}=s3://<bucket>/datasets/ (the operator's datasetsUri), pass --datasets-uri, "
            "or install the chart with storage.datasetsUri",
        )
    if not uri.startswith(("s3://", "file://")):
        raise CliError(
            f"dataset registry {uri!r} must be an s3:// or file:// URI (--datasets-uri / {ENV_DATASETS_URI})"
        )
    return uri if uri.endswith("/") else uri + "/"


def env_endpoint(env: Mapping[str, str] = os.environ) -> str | None:
    return env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or None


KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def has_own_keys(env: Mapping[str, str] = os.environ) -> bool:
    """The user has S3 keys of their own: in the environment, a profile, or ~/.aws/credentials.
    (boto3's instance-metadata lookup is not asked: it would reach out to the network.)"""
    if all(env.get(v) for v in KEY_VARIABLES) or env.get("AWS_PROFILE"):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path("~/.aws/credentials").expanduser())
    return Path(shared).is_file()


def use_keys(keys: Mapping[str, str], env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Take the keys of a credentials Secret for this process's S3 requests (boto3 reads them
    from the environment); nothing is written anywhere."""
    for variable in KEY_VARIABLES:
        if not keys.get(variable):
            raise CliError(
                f"the credentials Secret has no {variable}", hint="recreate it: kubectl finetune init"
            )
        env[variable] = keys[variable]


@dataclass(frozen=True)
class Location:
    """Where S3 is: endpoint URL (None: AWS) and region."""

    endpoint: str | None = None
    region: str | None = None


def _guard(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except CliError:
        raise
    except Exception as exc:  # botocore errors, connection errors, OSError
        name = type(exc).__name__
        hint = STORAGE_HINT
        if isinstance(exc, FileNotFoundError):
            hint = "check the path"
        raise CliError(f"{what}: {name}: {exc}", hint=hint) from None


def as_uri(path: str) -> str:
    """A local path (relative or absolute) or an s3:// / file:// URI, as a URI."""
    if path.startswith(("s3://", "file://")):
        return path
    return "file://" + str(Path(path).expanduser().resolve())


def list_sources(
    paths: list[str], split: Literal["train", "eval"], *, where: Location
) -> list[tuple[SourceFile, Literal["train", "eval"]]]:
    """Every data file the paths name (folders and globs expanded; the kinds the trainer reads,
    `sources.is_data_file`), listed, not read. A name the trainer cannot read (an unknown
    compression) is an error naming each such file and what is allowed."""
    out: list[tuple[SourceFile, Literal["train", "eval"]]] = []
    unreadable: list[str] = []
    for path in paths:
        uri = as_uri(path)
        if uri.startswith("file://") and not any(c in uri for c in "*?[") and not Path(uri[7:]).exists():
            raise CliError(f"{path}: no such file or folder", hint="check the path given to --paths")
        matches = _guard(
            f"listing {uri}", lambda u=uri: expand(u, endpoint=where.endpoint, region=where.region)
        )
        files = [(store, obj) for store, obj in matches if sources.is_data_file(obj.key)]
        if not files:
            raise CliError(f"{path}: no dataset files found", hint=f"datasets are {sources.ALLOWED}")
        for store, obj in files:
            source = SourceFile(store.uri, obj.key, obj.size, obj.version)
            try:
                sources.check_name(source.name)
            except InvalidData as exc:
                unreadable.append(str(exc))
            out.append((source, split))
    if unreadable:
        raise CliError(
            f"{len(unreadable)} file(s) the trainer cannot read",
            details=unreadable,
            hint="recompress them with gzip or zstd, or upload them uncompressed",
        )
    return out


def first_record(source: SourceFile, where: Location) -> sources.FirstRecord:
    """The first record of a file (for its format), streamed. InvalidData (not readable as its
    name says, no records) passes through for the caller to report."""
    store = open_folder(source.store_uri, where)
    try:
        return sources.first_record(source, store)
    except InvalidData:
        raise
    except Exception as exc:  # botocore errors, connection errors, OSError
        raise CliError(f"reading {source.name}: {type(exc).__name__}: {exc}", hint=STORAGE_HINT) from None


def preflight(
    files: list[SourceFile], spec: DatasetSpec, *, tokenizer: Any, where: Location
) -> data.PreflightReport:
    """The trainer's streaming preflight of `files` (records checked, tokens counted with
    `tokenizer` unless None). InvalidData (a bad record, a file that cannot be read as its name
    says) passes through for the caller to report; a storage failure is a CliError."""
    try:
        return data.preflight(files, spec, tokenizer=tokenizer, endpoint=where.endpoint, region=where.region)
    except InvalidData:
        raise
    except Exception as exc:  # botocore errors, connection errors, OSError
        raise CliError(f"reading the dataset files: {type(exc).__name__}: {exc}", hint=STORAGE_HINT) from None


def open_folder(uri: str, where: Location) -> Store:
    """A run folder (or any folder) for reading, e.g. a job's tensorboard/."""
    return _guard(f"opening {uri}", lambda: open_store(uri, endpoint=where.endpoint, region=where.region))  # type: ignore[no-any-return]


class Registry:
    def __init__(self, uri: str, where: Location) -> None:
        self.uri = uri
        self.store: Store = open_folder(uri, where)

    def exists(self, name: str) -> bool:
        return bool(_guard(f"reading {self.uri}", self.store.exists, f"{name}/{METADATA}"))

    def save(
        self, summary: DatasetSummary, files: list[tuple[SourceFile, str]], *, replace: bool, where: Location
    ) -> None:
        """Copy the files under <name>/train|eval/ (streamed: a local file as it is, an S3 object
        through a temporary file), then dataset.json last."""
        name = summary.name
        if replace:
            _guard(f"deleting {self.uri}{name}/", self.store.delete_prefix, f"{name}/")
        taken: set[str] = set()
        uploaded = []
        for (source, split), file_summary in zip(files, summary.files, strict=True):
            key = upload_key(name, split, source.name, taken)
            _guard(f"uploading {source.name}", self._copy, source, key, where)
            uploaded.append({**asdict(file_summary), "key": key})
        metadata = {**summary.to_metadata(), "files": uploaded}
        _guard(
            "writing the dataset metadata",
            self.store.write_bytes,
            f"{name}/{METADATA}",
            json.dumps(metadata, indent=2).encode(),
        )

    def _copy(self, source: SourceFile, key: str, where: Location) -> None:
        if source.store_uri.startswith("file://"):
            self.store.upload_file(LocalStore(source.store_uri).root / source.key, key)
            return
        store = open_store(source.store_uri, endpoint=where.endpoint, region=where.region)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "file"
            with store.open_read(source.key) as reader, local.open("wb") as writer:
                shutil.copyfileobj(reader, writer, COPY_CHUNK)
            self.store.upload_file(local, key)

    def list(self) -> list[dict[str, Any]]:
        objects = _guard(f"listing {self.uri}", self.store.list, "")
        out = []
        for obj in objects:
            parts = obj.key.split("/")
            if len(parts) == 2 and parts[1] == METADATA:
                data = json.loads(_guard(f"reading {self.uri}{obj.key}", self.store.read_bytes, obj.key))
                out.append({**data, "uri": f"{self.uri}{parts[0]}/"})
        return sorted(out, key=lambda d: str(d.get("name")))

    def get(self, name: str) -> dict[str, Any] | None:
        if not self.exists(name):
            return None
        data: dict[str, Any] = json.loads(
            _guard("reading the dataset", self.store.read_bytes, f"{name}/{METADATA}")
        )
        return data


def own_keys(*, profile: str | None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The user's S3 keys, as a credentials Secret holds them: AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY from the environment, else from `profile` / ~/.aws (boto3's files)."""
    if profile is None and all(env.get(v) for v in KEY_VARIABLES):
        return {v: env[v] for v in KEY_VARIABLES}
    if profile is None and not has_own_keys(env):
        raise CliError(
            "no S3 keys of your own found: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and there is "
            "no ~/.aws/credentials",
            hint="export AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… (or pass --profile NAME) and run it again",
        )
    import boto3
    import botocore.exceptions

    try:
        credentials = boto3.Session(profile_name=profile).get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise CliError(f"--profile {profile}: no such AWS profile", hint="see ~/.aws/credentials") from None
    if credentials is None:
        where = f"AWS profile {profile}" if profile else "~/.aws"
        raise CliError(f"no S3 keys in {where}", hint="export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    frozen = credentials.get_frozen_credentials()
    return {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}


def sync_folder(store: Store, local: Path) -> int:
    """Bring `local` up to date with the folder `store`: new files downloaded, grown files
    extended by their new bytes (event files only grow, and a reader with the file open sees the
    appended records); the number of files that changed."""
    changed = 0
    for obj in _guard(f"listing {store.uri}", store.list, ""):
        path = local / obj.key
        have = path.stat().st_size if path.exists() else 0
        if have == obj.size:
            continue
        data: bytes = _guard(f"reading {store.uri}{obj.key}", store.read_bytes, obj.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if 0 < have < len(data):
            with path.open("ab") as handle:
                handle.write(data[have:])
        else:
            path.write_bytes(data)
        changed += 1
    return changed
