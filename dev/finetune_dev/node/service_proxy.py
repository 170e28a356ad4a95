"""The `kubernetes` Service as pods see it: <service ip>:443 forwarded to the API server.

On a real cluster kube-proxy does this. In-cluster clients that use the DNS name
https://kubernetes.default.svc (kopf does) or KUBERNETES_SERVICE_HOST then reach the API server
with its certificate's name intact. Started by ``python -m finetune_dev.node`` when the cluster
gives the node a Service IP; the node agent maps the names to that IP in every pod's /etc/hosts.
"""

from __future__ import annotations

import contextlib
import socket
import threading


def serve_kubernetes_service(service_ip: str, apiserver_port: int, stopping: threading.Event) -> None:
    """Forward TCP from `service_ip`:443 to 127.0.0.1:`apiserver_port`, in background threads."""
    listener = socket.create_server((service_ip, 443), reuse_port=False)

    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stopping.is_set():
            downstream, _ = listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", apiserver_port), timeout=10)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, name="kubernetes-service", daemon=True).start()
