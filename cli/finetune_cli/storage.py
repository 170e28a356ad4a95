"""The dataset registry in object storage (I/O).

Reuses the trainer's storage layer (`finetune_trainer.storage`: boto3 with
request_checksum_calculation / response_checksum_validation "when_required", path-style
addressing; file:// for local registries), with the endpoint from AWS_ENDPOINT_URL and the keys
from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Layout: see `datasets`. Called by `main`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from finetune_cli.datasets import METADATA, DatasetSummary, upload_key
from finetune_cli.errors import CliError
from finetune_trainer.storage import Store, expand, open_store

ENV_DATASETS_URI = "FINETUNE_DATASETS_URI"


def datasets_uri(flag: str | None, env: Mapping[str, str] = os.environ) -> str:
    uri = flag or env.get(ENV_DATASETS_URI)
    if not uri:
        raise CliError(
            "no dataset registry configured",
            hint=f"set {ENV_DATASETS_URI}=s3://<bucket>/datasets/ (the operator's datasetsUri) or pass --datasets-uri",
        )
    if not uri.startswith(("s3://", "file://")):
        raise CliError(f"dataset registry {uri!r} must be an s3:// or file:// URI")
    return uri if uri.endswith("/") else uri + "/"


def endpoint(env: Mapping[str, str] = os.environ) -> str | None:
    return env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or None


def _guard(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except CliError:
        raise
    except Exception as exc:  # botocore errors, connection errors, OSError
        name = type(exc).__name__
        hint = (
            "check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that the bucket exists"
        )
        if isinstance(exc, FileNotFoundError):
            hint = "check the path"
        raise CliError(f"{what}: {name}: {exc}", hint=hint) from None


def as_uri(path: str) -> str:
    """A local path (relative or absolute) or an s3:// / file:// URI, as a URI."""
    if path.startswith(("s3://", "file://")):
        return path
    return "file://" + str(Path(path).expanduser().resolve())


def read_files(
    paths: list[str], split: Literal["train", "eval"]
) -> list[tuple[str, Literal["train", "eval"], bytes]]:
    """(URI, split, content) of every file the paths name (folders and globs expanded)."""
    out: list[tuple[str, Literal["train", "eval"], bytes]] = []
    for path in paths:
        uri = as_uri(path)
        if uri.startswith("file://") and not any(c in uri for c in "*?[") and not Path(uri[7:]).exists():
            raise CliError(f"{path}: no such file or folder", hint="check the path given to --paths")
        matches = _guard(f"listing {uri}", lambda u=uri: expand(u, endpoint=endpoint()))
        files = [(store, obj) for store, obj in matches if obj.key.endswith((".jsonl", ".txt", ".json"))]
        if not files:
            raise CliError(
                f"{path}: no .jsonl or .txt files found",
                hint="datasets are JSONL (one record a line) or .txt files",
            )
        for store, obj in files:
            content = _guard(f"reading {store.uri}{obj.key}", store.read_bytes, obj.key)
            out.append((store.uri + obj.key, split, content))
    return out


class Registry:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.store: Store = _guard(f"opening {uri}", lambda: open_store(uri, endpoint=endpoint()))

    def exists(self, name: str) -> bool:
        return bool(_guard(f"reading {self.uri}", self.store.exists, f"{name}/{METADATA}"))

    def save(self, summary: DatasetSummary, contents: list[tuple[str, str, bytes]], *, replace: bool) -> None:
        """Upload the files under <name>/train|eval/, then dataset.json last."""
        name = summary.name
        if replace:
            _guard(f"deleting {self.uri}{name}/", self.store.delete_prefix, f"{name}/")
        taken: set[str] = set()
        files = []
        for (source, split, content), file_summary in zip(contents, summary.files, strict=True):
            key = upload_key(name, split, source, taken)
            _guard(f"uploading {source}", self.store.write_bytes, key, content)
            files.append({**file_summary.__dict__, "key": key})
        metadata = {**summary.to_metadata(), "files": files}
        _guard(
            "writing the dataset metadata",
            self.store.write_bytes,
            f"{name}/{METADATA}",
            json.dumps(metadata, indent=2).encode(),
        )

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
