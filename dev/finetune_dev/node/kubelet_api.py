"""The kubelet's HTTPS API, as much as kubectl and the API server use: logs and health.

``GET /containerLogs/<namespace>/<pod>/<container>`` (``previous``, ``tailLines``, ``follow``)
serves a container's log file so ``kubectl logs`` works, and ``GET /healthz`` answers "ok".
Served by ``python -m finetune_dev.node`` with the kubelet serving certificate from the
cluster's PKI; the logs come from the node agent through the ``ContainerLogs`` protocol.
"""

from __future__ import annotations

import http.server
import logging
import socketserver
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("process-node")


class ContainerLogs(Protocol):
    """Where the API finds logs (the node agent implements it)."""

    def container_log(self, namespace: str, name: str, container: str, previous: bool) -> Path | None:
        """The container's current (or `previous`) log file, None if it has none."""
        ...

    def log_is_live(self, path: Path) -> bool:
        """True while the container writing `path` runs (a follower keeps reading)."""
        ...


class _KubeletHandler(http.server.BaseHTTPRequestHandler):
    logs: ContainerLogs

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            return self._reply(200, b"ok")
        if len(parts) == 4 and parts[0] == "containerLogs":
            path = self.logs.container_log(
                parts[1], parts[2], parts[3], query.get("previous", ["false"])[0] == "true"
            )
            if path is None:
                return self._reply(
                    404, f"no logs for container {parts[3]} of pod {parts[1]}/{parts[2]}".encode()
                )
            data = path.read_bytes()
            tail = query.get("tailLines")
            if tail:
                data = b"".join(data.splitlines(keepends=True)[-int(tail[0]) :])
            if query.get("follow", ["false"])[0] != "true":
                return self._reply(200, data)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(data)
            offset = path.stat().st_size
            while True:
                time.sleep(0.5)
                size = path.stat().st_size
                if size > offset:
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        self.wfile.write(handle.read(size - offset))
                        self.wfile.flush()
                    offset = size
                if not self.logs.log_is_live(path):
                    return
        return self._reply(404, b"not found")

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def serve_kubelet_api(logs: ContainerLogs, port: int, pki_dir: Path) -> None:
    """Serve the kubelet API over TLS on 127.0.0.1:`port` in a background thread."""
    handler = type("Handler", (_KubeletHandler,), {"logs": logs})
    server = _Server(("127.0.0.1", port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / "kubelet-serving.crt", pki_dir / "kubelet-serving.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
