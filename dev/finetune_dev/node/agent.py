"""The node agent: the kubelet's part for one Node, except running the pods.

Started by ``python -m finetune_dev.node``. It registers the Node (Ready, allocatable cpu/memory/
pods, the kubelet endpoint) and keeps its status fresh, watches the pods the scheduler binds to
it and gives each a ``PodWorker`` (``finetune_dev.node.worker``), keeps every pod's /etc/hosts
current, marks pods of an earlier incarnation lost, and answers the workers' requests: it
implements their ``PodHost`` protocol and is the only part of the node that talks to the API
server. Pod rules are in ``finetune_dev.podspec`` (pure).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_dev import paths, podspec
from finetune_dev.node import pod_ports
from finetune_dev.node.worker import PodWorker, kill_group, utc_timestamp

log = logging.getLogger("process-node")
T = TypeVar("T")

KUBELET_VERSION = "v1.37.2"
HEARTBEAT_SECONDS = 20
UNREACHABLE_RETRY_SECONDS = 1.0
FIRST_POD_HOST = 10  # pod IPs are <pod network>.0.10 upwards


class NodeAgent:
    """Registers the Node, watches its pods and runs a PodWorker for each (their PodHost)."""

    def __init__(
        self,
        *,
        core: client.CoreV1Api,
        node_name: str,
        state_dir: Path,
        kubelet_port: int,
        apiserver_port: int,
        pod_network: str = "127.0",
        kubernetes_service_ip: str | None = None,
    ) -> None:
        self.core = core
        self.node_name = node_name
        self.state_dir = state_dir
        self.pods_dir = state_dir / "pods"
        self.kubelet_port = kubelet_port
        self.apiserver_port = apiserver_port
        self.host_ip = "127.0.0.1"
        self.first_pod_ip = ipaddress.ip_address(f"{pod_network}.0.{FIRST_POD_HOST}")
        self.kubernetes_service_ip = kubernetes_service_ip
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        # A wildcard bind in a pod is a bind to its IP, as in a pod's own network namespace.
        self.bind_library = pod_ports.build(paths.cache_dir())

    def _while_unreachable(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried while the API server cannot be reached (restarting: connection
        refused, or 5xx while it starts), as a kubelet keeps its pods running and syncs their
        status once the server is back. Gives up only when the agent stops."""
        warned = False
        while True:
            try:
                return call()
            except (urllib3.exceptions.HTTPError, ApiException) as exc:
                if (isinstance(exc, ApiException) and (exc.status or 0) < 500) or self.stopping.is_set():
                    raise
                if not warned:
                    log.warning("%s: the API server is unreachable (%s); retrying", what, type(exc).__name__)
                    warned = True
                time.sleep(UNREACHABLE_RETRY_SECONDS)

    # --- lookups for podspec ----------------------------------------------------------------
    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "Secret":
                obj = self._while_unreachable(
                    f"read Secret {namespace}/{name}",
                    lambda: self.core.read_namespaced_secret(name, namespace),
                )
            else:
                obj = self._while_unreachable(
                    f"read ConfigMap {namespace}/{name}",
                    lambda: self.core.read_namespaced_config_map(name, namespace),
                )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.core.api_client.sanitize_for_serialization(obj))

    def service_account_token(self, pod: dict[str, Any], expiration: int | None, audience: str | None) -> str:
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[audience] if audience else [],
                expiration_seconds=expiration or 3607,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=meta["name"], uid=meta["uid"]
                ),
            )
        )
        result = self._while_unreachable(
            f"token for pod {meta['namespace']}/{meta['name']}",
            lambda: self.core.create_namespaced_service_account_token(sa, meta["namespace"], body),
        )
        return str(result.status.token)

    def patch_pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self._while_unreachable(
                f"status of pod {meta['namespace']}/{meta['name']}",
                lambda: self.core.patch_namespaced_pod_status(
                    meta["name"], meta["namespace"], {"status": status}
                ),
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("pod %s/%s: status patch failed: %s", meta["namespace"], meta["name"], exc.reason)

    def delete_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        try:
            self._while_unreachable(
                f"final delete of pod {meta['namespace']}/{meta['name']}",
                lambda: self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=options),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("final delete of %s/%s failed: %s", meta["namespace"], meta["name"], exc.reason)

    def service_env(self) -> dict[str, str]:
        """The in-cluster API address every pod gets, as the kubelet injects it."""
        host, port = self.api_address()
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        }

    def api_address(self) -> tuple[str, int]:
        """The `kubernetes` Service as pods see it: the forwarder's IP and 443, else the API server."""
        if self.kubernetes_service_ip:
            return self.kubernetes_service_ip, 443
        return "127.0.0.1", self.apiserver_port

    def static_hosts(self) -> list[tuple[str, list[str]]]:
        if not self.kubernetes_service_ip:
            return []
        names = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        return [(self.kubernetes_service_ip, names)]

    def base_env(self) -> dict[str, str]:
        """What a process inherits from the "image": the project's Python environment on PATH."""
        venv_bin = str(Path(sys.executable).parent)
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        env = {"PATH": f"{venv_bin}:{path}", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
        for key, value in os.environ.items():
            if key.startswith(("OPENBLAS_", "FINETUNE_POD_")) or key in ("TZ", "PIP_CACHE_DIR", "HF_HOME"):
                env[key] = value
        return env

    def network_env(self, pod_ip: str, inherited: str | None) -> dict[str, str]:
        return pod_ports.env(self.bind_library, pod_ip, inherited)

    def event(self, pod: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        meta = pod["metadata"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                kind="Pod", name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], api_version="v1"
            ),
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component="kubelet", host=self.node_name),
            first_timestamp=dt.datetime.now(dt.UTC),
            last_timestamp=dt.datetime.now(dt.UTC),
            count=1,
        )
        with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError):  # an event may be lost
            self.core.create_namespaced_event(meta["namespace"], body)

    # --- node registration --------------------------------------------------------------------
    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "process",
            "finetune.dev/process-node": "true",
        }
        try:
            self.core.create_node(
                client.V1Node(metadata=client.V1ObjectMeta(name=self.node_name, labels=labels))
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.heartbeat()
        self._clear_startup_taints()

    def _clear_startup_taints(self) -> None:
        """Remove the not-ready taint the API server puts on new Nodes.

        On a real cluster the node lifecycle controller removes it once the kubelet reports
        Ready; that controller is disabled here (the process node renews no Lease), so the node
        does it itself after posting Ready.
        """
        node = self.core.read_node(self.node_name)
        taints = node.spec.taints or []
        kept = [
            t
            for t in taints
            if t.key not in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
        ]
        if len(kept) != len(taints):
            body = {
                "spec": {"taints": [self.core.api_client.sanitize_for_serialization(t) for t in kept] or None}
            }
            self.core.patch_node(self.node_name, body)

    def heartbeat(self) -> None:
        cpu = str(int(os.environ.get("FINETUNE_DEV_NODE_CPU", str((os.cpu_count() or 2) * 4))))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        capacity = {"cpu": cpu, "memory": str(memory), "pods": "110", "ephemeral-storage": "100Gi"}
        now = utc_timestamp()
        uname = platform.uname()
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process node is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
                {
                    "type": "MemoryPressure",
                    "status": "False",
                    "reason": "KubeletHasSufficientMemory",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
                {
                    "type": "DiskPressure",
                    "status": "False",
                    "reason": "KubeletHasNoDiskPressure",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
                {
                    "type": "PIDPressure",
                    "status": "False",
                    "reason": "KubeletHasSufficientPID",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": "finetune-dev",
                "systemUUID": "finetune-dev",
                "bootID": "finetune-dev",
                "kernelVersion": uname.release,
                "osImage": "process node (pods run as local processes)",
                "containerRuntimeVersion": "process://1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.core.patch_node_status(self.node_name, {"status": status})

    # --- pods -------------------------------------------------------------------------------
    def allocate_ip(self) -> str:
        used = {w.ip for w in self.workers.values()}
        candidate = self.first_pod_ip
        while str(candidate) in used:
            candidate += 1
        return str(candidate)

    def refresh_hosts(self) -> None:
        """Rewrite every live pod's /etc/hosts in place (bind mounts follow the inode)."""
        try:
            services = self.core.list_service_for_all_namespaces(field_selector="spec.clusterIP=None")
            headless = {(s.metadata.namespace, s.metadata.name) for s in services.items}
        except ApiException:
            headless = set()
        with self.lock:
            workers = list(self.workers.values())
            entries = [w.host_entry() for w in workers]
            for worker in workers:
                path = worker.directory / "hosts"
                path.parent.mkdir(parents=True, exist_ok=True)
                content = podspec.hosts_file(worker.host_entry(), entries, headless, self.static_hosts())
                with path.open("a+") as handle:
                    handle.seek(0)
                    if handle.read() != content:
                        handle.seek(0)
                        handle.truncate()
                        handle.write(content)

    def pod_finished(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
        self.refresh_hosts()

    def handle(self, event_type: str, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        uid = meta["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if event_type == "DELETED":
                if worker:
                    worker.request_stop(0)
                return
            deleting = meta.get("deletionTimestamp") is not None
            if worker is None:
                if status.get("phase") in ("Succeeded", "Failed") or (
                    status.get("phase") == "Running" and status.get("podIP")
                ):
                    # Terminal, or run by an earlier incarnation of this agent: the process is gone.
                    if status.get("phase") == "Running":
                        self._mark_lost(pod)
                    if deleting:
                        self.delete_pod(pod)
                    return
                if deleting:
                    self.delete_pod(pod)
                    return
                worker = PodWorker(host=self, pod=pod, ip=self.allocate_ip())
                self.workers[uid] = worker
                worker.start()
                return
            worker.pod = pod
            if deleting and not worker.stop_requested.is_set():
                worker.request_stop(float(meta.get("deletionGracePeriodSeconds") or 0))

    def _mark_lost(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        message = "the process node restarted; the pod's processes were lost"
        statuses = []
        for c in pod["spec"].get("containers") or []:
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "ContainerStatusUnknown",  # what a kubelet reports for a lost container
                            "message": message,
                            "finishedAt": utc_timestamp(),
                        }
                    },
                }
            )
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                {
                    "status": {
                        "phase": "Failed",
                        "message": message,
                        "reason": "NodeRestarted",
                        "containerStatuses": statuses,
                    }
                },
            )

    def _kill_leftovers(self) -> None:
        """Processes of a previous incarnation of this agent (their pods are marked lost)."""
        for pidfile in self.pods_dir.glob("*/*.pid"):
            with contextlib.suppress(ValueError):
                kill_group(int(pidfile.read_text()), signal.SIGKILL)
            pidfile.unlink(missing_ok=True)

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for pod in listing.items:
                    self.handle("ADDED", self.core.api_client.sanitize_for_serialization(pod))
                version = listing.metadata.resource_version
                stream = self._raw_watch(selector, version)
                for event_type, pod in stream:
                    self.handle(event_type, pod)
            except Exception:
                if self.stopping.is_set():
                    return
                log.exception("pod watch failed; re-listing in 1s")
                time.sleep(1)

    def _raw_watch(self, selector: str, version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch events as plain dicts (the typed models drop fields we patch back)."""
        response = self.core.list_pod_for_all_namespaces(
            field_selector=selector,
            resource_version=version,
            watch=True,
            timeout_seconds=300,
            allow_watch_bookmarks=False,
            _preload_content=False,
        )
        try:
            for line in response:
                if self.stopping.is_set():
                    return
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return
                yield event["type"], event["object"]
        finally:
            response.release_conn()

    def run(self) -> None:
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftovers()
        self.register()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        self.watch_pods()

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except Exception:
                log.exception("node heartbeat failed")

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.kill_all(grace=5)

    def container_log(self, namespace: str, name: str, container: str, previous: bool) -> Path | None:
        for directory in self.pods_dir.glob(f"{namespace}_{name}_*"):
            logs = sorted(
                (directory / "logs").glob(f"{container}.*.log"), key=lambda p: int(p.name.split(".")[-2])
            )
            if previous:
                logs = logs[:-1]
            if logs:
                return logs[-1]
        return None

    def log_is_live(self, path: Path) -> bool:
        """True while the container writing the log file at `path` (from container_log) runs."""
        pod_dir, container = path.parent.parent, path.name.rsplit(".", 2)[0]
        with self.lock:
            workers = list(self.workers.values())
        return any(w.directory == pod_dir and w.container_running(container) for w in workers)
