"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that `huggingface_hub` uses.

Started by the tests (tests/trainer/test_hf_models.py) so that `hf://org/name` runs through the
real client (`HfApi.model_info`, `snapshot_download`, `hf_hub_download`) with nothing leaving
the machine; the client is pointed at it with `HF_ENDPOINT`, exactly as a user points it at a
mirror. It serves folders of files as model repositories, each at one commit with named
revisions (branches or tags) pointing at it, optionally gated behind a bearer token.

Endpoints, as huggingface_hub (the version pinned in constraints.txt) calls them:

- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{revision}`: model info — `sha`
  (the commit the revision resolves to) and `siblings` (the file list).
- `GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=...`: the file listing with sizes,
  git blob ids and, for weights, LFS sha256 (one page; no `Link` header).
- `HEAD` and `GET /{repo}/resolve/{revision}/{path}`: a file, with `X-Repo-Commit`, `ETag`
  (git blob id), and for LFS files `X-Linked-Etag` (sha256) and `X-Linked-Size`; `Range`
  requests are answered with 206.

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which the client turns into its typed exceptions. Every request is recorded (method, path,
whether it carried the right token — never the token itself) for tests to assert on.

Dev and test tooling only: not part of the product images. Loopback only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files the Hub stores with git LFS (weights), as its default .gitattributes does.
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".model")
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob (what the Hub calls a file's `oid` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class HubRepo:
    """One model repository at one commit."""

    repo_id: str
    files: Mapping[str, bytes]
    revisions: tuple[str, ...] = ("main",)
    token: str | None = None  # set: gated, requests need `Authorization: Bearer <token>`

    @classmethod
    def from_folder(
        cls, repo_id: str, folder: Path, *, revisions: tuple[str, ...] = ("main",), token: str | None = None
    ) -> HubRepo:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return cls(repo_id=repo_id, files=files, revisions=revisions, token=token)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + git_blob_id(self.files[path]).encode())
        return digest.hexdigest()

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names (a branch/tag name or the commit itself), else None."""
        return self.commit if revision in (*self.revisions, self.commit) else None

    def tree_entry(self, path: str) -> dict[str, object]:
        content = self.files[path]
        entry: dict[str, object] = {
            "type": "file",
            "oid": git_blob_id(content),
            "size": len(content),
            "path": path,
        }
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {
                "oid": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "pointerSize": 134,
            }
        return entry


@dataclass(frozen=True)
class Request:
    """A request the server answered (for assertions; the token value is never kept)."""

    method: str
    path: str
    authorized: bool
    status: int


@dataclass
class HubServer:
    """A running local Hub; `endpoint` is what `HF_ENDPOINT` should be set to."""

    endpoint: str
    repos: dict[str, HubRepo]
    requests: list[Request] = field(default_factory=list)

    def downloads(self, repo_id: str) -> list[str]:
        """Paths of the files of `repo_id` fetched with GET, in order."""
        prefix = f"/{repo_id}/resolve/"
        return [
            r.path[len(prefix) :].split("/", 1)[1]
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix) and r.status in (200, 206)
        ]


@contextmanager
def serve_hub(repos: list[HubRepo], host: str = "127.0.0.1") -> Iterator[HubServer]:
    """Serve `repos` on a free loopback port until the block exits."""
    by_id = {r.repo_id: r for r in repos}
    state = HubServer(endpoint="", repos=by_id)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read `requests`
            pass

        def do_GET(self) -> None:
            self._handle(head=False)

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def _handle(self, *, head: bool) -> None:
            path = urlsplit(self.path).path
            status, headers, body = self._route(path)
            with lock:
                state.requests.append(Request(self.command, path, self._authorized_for(path), status))
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _authorized_for(self, path: str) -> bool:
            repo = self._repo_of(path)
            return repo is not None and repo.token is not None and self._has_token(repo)

        def _has_token(self, repo: HubRepo) -> bool:
            return self.headers.get("Authorization") == f"Bearer {repo.token}"

        @staticmethod
        def _repo_of(path: str) -> HubRepo | None:
            match = re.match(rf"^(?:/api/models)?/{_REPO}(?:/|$)", path)
            return by_id.get(unquote(match.group("repo"))) if match else None

        def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
            api = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?/?", path)
            tree = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
            resolve = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            match = api or tree or resolve
            if match is None:
                return _error(404, "RepoNotFound", f"no route for {path}")
            repo = by_id.get(unquote(match.group("repo")))
            if repo is None:
                return _error(404, "RepoNotFound", "Repository not found")
            if repo.token is not None and not self._has_token(repo):
                return _error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
            revision = unquote(match.group("rev") or "main")
            commit = repo.resolve(revision)
            if commit is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if api:
                return _json(_model_info(repo))
            if tree:
                sub = unquote(tree.group("sub") or "").strip("/")
                entries = [
                    repo.tree_entry(p) for p in sorted(repo.files) if not sub or p.startswith(sub + "/")
                ]
                return _json(entries)
            return self._file(repo, unquote(resolve.group("file")) if resolve else "")

        def _file(self, repo: HubRepo, name: str) -> tuple[int, dict[str, str], bytes]:
            content = repo.files.get(name)
            if content is None:
                return _error(404, "EntryNotFound", f"{name} does not exist")
            entry = repo.tree_entry(name)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
            lfs = entry.get("lfs")
            if isinstance(lfs, dict):
                headers["X-Linked-Etag"] = f'"{lfs["oid"]}"'
                headers["X-Linked-Size"] = str(len(content))
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                end = int(ranged.group(2)) if ranged.group(2) else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                return 206, headers, content[start : end + 1]
            return 200, headers, content

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    state.endpoint = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _model_info(repo: HubRepo) -> dict[str, object]:
    return {
        "_id": repo.commit[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": repo.commit,
        "private": False,
        "gated": "manual" if repo.token else False,
        "disabled": False,
        "tags": [],
        "siblings": [{"rfilename": p} for p in sorted(repo.files)],
    }


def _json(payload: object) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
    return status, headers, json.dumps({"error": message}).encode()
