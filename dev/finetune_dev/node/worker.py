"""The process node: a Kubernetes Node whose pods run as local processes.

Started by ``finetune-dev up`` as ``python -m finetune_dev.node``. It plays the kubelet's part for
one Node: registers it (Ready, allocatable cpu/memory/pods, a kubelet endpoint), watches the pods
the scheduler binds to it, and runs each container's command as a process in the project's
environment (the image is ignored) inside private mount and UTS namespaces, so that

- env is resolved like the kubelet does (values, fieldRef, secretKeyRef, configMapKeyRef,
  resourceFieldRef, envFrom, ``$(VAR)`` expansion, KUBERNETES_SERVICE_HOST/PORT);
- configMap, secret, emptyDir, hostPath, downwardAPI and projected (ServiceAccount token)
  volumes appear at their mount paths, and the termination message file at its path;
- each pod has its own IP on 127.0.0.0/8 and hostname, and ``<hostname>.<subdomain>`` of pods
  behind a Service named like the subdomain resolves through the pod's /etc/hosts;
- restartPolicy is honoured; deletion sends SIGTERM, then SIGKILL after the grace period;
- pod status is truthful: phase, IPs, conditions, container states with exit codes, reasons and
  termination messages (FallbackToLogsOnError included), restart counts.

It also serves the kubelet's ``/containerLogs`` so ``kubectl logs`` works, and ``/healthz``.
The rules themselves live in ``finetune_dev.podspec`` (pure); this module does the I/O.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.server
import ipaddress
import json
import logging
import os
import platform
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from finetune_dev import podspec
from finetune_dev.podspec import HostEntry, PodSpecError

log = logging.getLogger("process-node")

KUBELET_VERSION = "v1.37.2"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
RESTART_BACKOFF_MAX = 60.0
CONFIG_RETRY_SECONDS = 5.0
HEARTBEAT_SECONDS = 20
FIRST_POD_HOST = 10  # pod IPs are <pod network>.0.10 upwards


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    """One container of a pod: its process and what the kubelet reports about it."""

    spec: dict[str, Any]
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    next_start: float = 0.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.process is not None and self.terminated is None:
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            state = {
                "waiting": {
                    "reason": self.waiting_reason,
                    **({"message": self.waiting_message} if self.waiting_message else {}),
                }
            }
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.process is not None and self.terminated is None and not self.init,
            "started": self.process is not None and self.terminated is None,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.process is not None:
            status["containerID"] = f"process://{self.process.pid}"
        return status


@dataclass
class PodWorker:
    """Runs one pod from first sight to its final deletion, in its own thread."""

    agent: NodeAgent
    pod: dict[str, Any]
    ip: str
    stop_requested: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 30.0
    wake: threading.Event = field(default_factory=threading.Event)
    containers: list[ContainerRun] = field(default_factory=list)
    init_containers: list[ContainerRun] = field(default_factory=list)
    phase: str = "Pending"
    pod_conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    thread: threading.Thread | None = None

    # --- identity and paths -----------------------------------------------------------------
    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def directory(self) -> Path:
        return self.agent.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"

    def log_path(self, container: str, restart: int) -> Path:
        return self.directory / "logs" / f"{container}.{restart}.log"

    def host_entry(self) -> HostEntry:
        hostname, subdomain = podspec.pod_hostname(self.pod)
        return HostEntry(self.namespace, self.ip, hostname, subdomain)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True
        )
        self.thread.start()

    def request_stop(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.stop_requested.set()
        self.wake.set()

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.namespace, self.name)
        finally:
            self._kill_all(grace=0)
            self.agent.pod_finished(self)

    def _lifecycle(self) -> None:
        spec = self.pod["spec"]
        self.init_containers = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerRun(c) for c in spec.get("containers") or []]
        self.pod_conditions = {
            "PodReadyToStartContainers": self._condition("PodReadyToStartContainers", False),
            "Initialized": self._condition("Initialized", not self.init_containers),
            "ContainersReady": self._condition("ContainersReady", False),
            "Ready": self._condition("Ready", False),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        self.agent.refresh_hosts()
        self._patch_status(start=True)
        mounts = self._prepare_volumes_until_ready()
        if mounts is None:
            return self._finish_deleted()
        self.pod_conditions["PodReadyToStartContainers"] = self._condition("PodReadyToStartContainers", True)
        restart_policy = spec.get("restartPolicy", "Always")
        for init in self.init_containers:
            ok = self._run_to_completion(init, mounts, restart_policy)
            if not ok:
                return self._finish(failed_init=True)
        self.pod_conditions["Initialized"] = self._condition("Initialized", True)
        for container in self.containers:
            self._start_container(container, mounts)
        self._patch_status()
        self._supervise(mounts, restart_policy)

    def _prepare_volumes_until_ready(self) -> dict[str, Path] | None:
        """Materialize volumes, retrying while a ConfigMap/Secret is missing (like the kubelet)."""
        while True:
            try:
                return self._prepare_volumes()
            except PodSpecError as exc:
                for run in self.init_containers + self.containers:
                    run.waiting_reason, run.waiting_message = "ContainerCreating", exc.message
                self._patch_status(message=exc.message, reason=exc.reason)
                self.agent.event(self.pod, exc.reason, exc.message, warning=True)
                if self.stop_requested.wait(timeout=5):
                    return None

    def _prepare_volumes(self) -> dict[str, Path]:
        volumes_dir = self.directory / "volumes"
        prepared: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            contents = podspec.volume_files(
                self.pod,
                volume,
                lookup=self.agent.lookup,
                token=self._token,
                pod_ip=self.ip,
                host_ip=self.agent.host_ip,
            )
            if contents.host_path is not None:
                prepared[volume["name"]] = Path(contents.host_path)
                continue
            target = volumes_dir / volume["name"]
            if not contents.empty_dir:
                shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
            for relative, data in contents.files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            prepared[volume["name"]] = target
        return prepared

    def _token(self, expiration: int | None, audience: str | None) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[audience] if audience else [],
                expiration_seconds=expiration or 3607,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.name, uid=self.uid
                ),
            )
        )
        result = self.agent.core.create_namespaced_service_account_token(sa, self.namespace, body)
        return str(result.status.token)

    # --- containers -----------------------------------------------------------------------
    def _plan(self, run: ContainerRun, mounts: dict[str, Path]) -> Path:
        env = podspec.container_env(
            self.pod,
            run.spec,
            lookup=self.agent.lookup,
            pod_ip=self.ip,
            host_ip=self.agent.host_ip,
            service_env=self.agent.service_env(),
        )
        argv = podspec.command_line(run.spec, env)
        base = self.agent.base_env()
        full_env = {**base, **env, "HOSTNAME": self.host_entry().hostname}
        plan_mounts = [
            {"source": str(self.directory / "hosts"), "target": "/etc/hosts", "readOnly": False},
        ]
        termination_file = self.directory / f"{run.name}.termination-log"
        termination_file.write_bytes(b"")
        plan_mounts.append(
            {
                "source": str(termination_file),
                "target": run.spec.get("terminationMessagePath") or "/dev/termination-log",
                "readOnly": False,
            }
        )
        for mount in run.spec.get("volumeMounts") or []:
            if mount["name"] not in mounts:
                raise PodSpecError(
                    "CreateContainerConfigError", f"volumeMount {mount['name']!r}: no such volume"
                )
            source = mounts[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            plan_mounts.append(
                {"source": str(source), "target": mount["mountPath"], "readOnly": bool(mount.get("readOnly"))}
            )
        plan = {
            "mounts": plan_mounts,
            "hostname": self.host_entry().hostname,
            "command": argv,
            "env": full_env,
            "workingDir": run.spec.get("workingDir") or str(self.directory),
        }
        path = self.directory / f"{run.name}.plan.json"
        path.write_text(json.dumps(plan))
        path.chmod(0o600)
        return path

    def _start_container(self, run: ContainerRun, mounts: dict[str, Path]) -> None:
        try:
            plan = self._plan(run, mounts)
        except PodSpecError as exc:
            # Like the kubelet: report it, and try again later (the Secret may be created).
            run.waiting_reason, run.waiting_message = exc.reason, exc.message
            run.terminated = None
            run.process = None
            run.next_start = time.monotonic() + CONFIG_RETRY_SECONDS
            self.agent.event(self.pod, "Failed", f"Error: {exc.message}", warning=True)
            return
        log_file = self.log_path(run.name, run.restart_count).open("ab")
        cmd = [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "finetune_dev.podshim",
            str(plan),
        ]
        run.process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log_file.close()
        (self.directory / f"{run.name}.pid").write_text(str(run.process.pid))
        run.started_at = _now()
        run.terminated = None
        self.agent.event(self.pod, "Started", f"Started container {run.name}")

    def _collect_exit(self, run: ContainerRun) -> bool:
        """If the container's process has exited, record its terminated state. True if it did."""
        assert run.process is not None
        code = run.process.poll()
        if code is None:
            return False
        _kill_group(run.process.pid, signal.SIGKILL)
        exit_code = 128 - code if code < 0 else code
        run.terminated = {
            "exitCode": exit_code,
            "reason": podspec.termination_reason(exit_code),
            "startedAt": run.started_at,
            "finishedAt": _now(),
            "containerID": f"process://{run.process.pid}",
        }
        if code < 0:
            run.terminated["signal"] = -code
        message = self._termination_message(run, exit_code)
        if message:
            run.terminated["message"] = message
        return True

    def _termination_message(self, run: ContainerRun, exit_code: int) -> str:
        path = self.directory / f"{run.name}.termination-log"
        try:
            message = path.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        except OSError:
            message = ""
        if (
            not message.strip()
            and exit_code != 0
            and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = (
                self.log_path(run.name, run.restart_count).read_bytes().decode(errors="replace").splitlines()
            )
            message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-2048:]
        return message

    def _run_to_completion(self, run: ContainerRun, mounts: dict[str, Path], restart_policy: str) -> bool:
        backoff = 1.0
        while not self.stop_requested.is_set():
            self._start_container(run, mounts)
            self._patch_status()
            if run.process is None:  # a missing Secret/ConfigMap: retried like the kubelet does
                if self.stop_requested.wait(timeout=CONFIG_RETRY_SECONDS):
                    return False
                continue
            while not self._collect_exit(run):
                if self.stop_requested.wait(timeout=0.2):
                    return False
            if run.terminated and run.terminated["exitCode"] == 0:
                self._patch_status()
                return True
            if restart_policy == "Never":
                return False
            run.last_terminated, run.terminated = run.terminated, None
            run.restart_count += 1
            run.process = None
            run.waiting_reason = "CrashLoopBackOff"
            self._patch_status()
            if self.stop_requested.wait(timeout=backoff):
                return False
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
        return False

    def _supervise(self, mounts: dict[str, Path], restart_policy: str) -> None:
        backoff: dict[str, float] = {}
        while True:
            if self.stop_requested.is_set():
                return self._terminate_for_deletion()
            changed = False
            for run in self.containers:
                if run.process is not None and run.terminated is None and self._collect_exit(run):
                    changed = True
                    assert run.terminated is not None
                    self.agent.event(
                        self.pod,
                        "Exited",
                        f"Container {run.name} exited with code {run.terminated['exitCode']}",
                    )
                    if podspec.should_restart(restart_policy, run.terminated["exitCode"]):
                        delay = backoff.get(run.name, 1.0)
                        backoff[run.name] = min(delay * 2, RESTART_BACKOFF_MAX)
                        run.next_start = time.monotonic() + delay
                        run.last_terminated, run.terminated = run.terminated, None
                        run.process = None
                        run.restart_count += 1
                        run.waiting_reason, run.waiting_message = (
                            "CrashLoopBackOff",
                            f"back-off {delay:.0f}s restarting failed container",
                        )
                elif (
                    run.process is None
                    and run.terminated is None
                    and time.monotonic() >= run.next_start
                    and run.waiting_reason in ("CrashLoopBackOff", "CreateContainerConfigError")
                ):
                    self._start_container(run, mounts)
                    changed = True
            if all(run.terminated is not None for run in self.containers):
                return self._finish()
            if changed:
                self._patch_status()
            self.wake.wait(timeout=0.2)
            self.wake.clear()

    def _kill_all(self, grace: float) -> None:
        running = [
            r
            for r in self.init_containers + self.containers
            if r.process is not None and r.process.poll() is None
        ]
        for run in running:
            assert run.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (
            any(r.process is not None and r.process.poll() is None for r in running)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        for run in running:
            assert run.process is not None
            _kill_group(run.process.pid, signal.SIGKILL)
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error(
                    "pod %s/%s: container %s did not die after SIGKILL", self.namespace, self.name, run.name
                )

    def _terminate_for_deletion(self) -> None:
        if any(r.process is not None and r.terminated is None for r in self.containers):
            self.agent.event(
                self.pod, "Killing", f"Stopping containers (grace period {self.grace_seconds:.0f}s)"
            )
        self._kill_all(grace=self.grace_seconds)
        for run in self.init_containers + self.containers:
            if run.process is not None and run.terminated is None:
                self._collect_exit(run)
        self._finish(deleting=True)

    def _finish(self, failed_init: bool = False, deleting: bool = False) -> None:
        codes = [run.terminated["exitCode"] if run.terminated else 137 for run in self.containers]
        if failed_init or (deleting and any(run.terminated is None for run in self.containers)):
            self.phase = "Failed"
        else:
            self.phase = podspec.terminal_phase(codes)
        reason = "PodCompleted" if self.phase == "Succeeded" else "PodFailed"
        for kind in ("ContainersReady", "Ready"):
            self.pod_conditions[kind] = self._condition(kind, False, reason)
        self.pod_conditions["PodReadyToStartContainers"] = self._condition("PodReadyToStartContainers", False)
        self._patch_status()
        if deleting:
            self._finish_deleted()
        else:
            # Stay until the pod is deleted; a deletion then only needs the final delete.
            self.stop_requested.wait()
            self._finish_deleted()

    def _finish_deleted(self) -> None:
        """The kubelet's last word: delete the pod object with grace period 0."""
        try:
            self.agent.core.delete_namespaced_pod(
                self.name,
                self.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # --- status ---------------------------------------------------------------------------
    def _condition(self, kind: str, status: bool, reason: str | None = None) -> dict[str, Any]:
        condition = {
            "type": kind,
            "status": "True" if status else "False",
            "lastTransitionTime": _now(),
            "lastProbeTime": None,
        }
        if reason:
            condition["reason"] = reason
        return condition

    def _patch_status(
        self, *, start: bool = False, message: str | None = None, reason: str | None = None
    ) -> None:
        running = [r for r in self.containers if r.process is not None and r.terminated is None]
        if (
            self.phase == "Pending"
            and self.containers
            and (running or any(r.terminated for r in self.containers))
        ):
            self.phase = "Running"
        ready = bool(self.containers) and len(running) == len(self.containers) and self.phase == "Running"
        if self.phase == "Running":
            for kind in ("ContainersReady", "Ready"):
                if (self.pod_conditions[kind]["status"] == "True") != ready:
                    self.pod_conditions[kind] = self._condition(
                        kind, ready, None if ready else "ContainersNotReady"
                    )
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "conditions": list(self.pod_conditions.values()),
            "containerStatuses": [r.status() for r in self.containers],
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
        }
        if self.init_containers:
            status["initContainerStatuses"] = [r.status() for r in self.init_containers]
        if start:
            status["startTime"] = _now()
        if message is not None:
            status["message"], status["reason"] = message, reason
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                log.warning("pod %s/%s: status patch failed: %s", self.namespace, self.name, exc.reason)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class NodeAgent:
    """Registers the Node, watches its pods and runs a PodWorker for each."""

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
        self.kubelet_port = kubelet_port
        self.apiserver_port = apiserver_port
        self.host_ip = "127.0.0.1"
        self.first_pod_ip = ipaddress.ip_address(f"{pod_network}.0.{FIRST_POD_HOST}")
        self.kubernetes_service_ip = kubernetes_service_ip
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()

    # --- lookups for podspec ----------------------------------------------------------------
    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "Secret":
                obj = self.core.read_namespaced_secret(name, namespace)
            else:
                obj = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(self.core.api_client.sanitize_for_serialization(obj))

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

    def serve_kubernetes_service(self) -> None:
        """Forward <service ip>:443 to the API server, like kube-proxy does for the Service.

        In-cluster clients that use the DNS name https://kubernetes.default.svc (kopf does) or
        KUBERNETES_SERVICE_HOST then reach the API server with its certificate's name intact.
        """
        if not self.kubernetes_service_ip:
            return
        listener = socket.create_server((self.kubernetes_service_ip, 443), reuse_port=False)

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
            while not self.stopping.is_set():
                downstream, _ = listener.accept()
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.apiserver_port), timeout=10)
                except OSError:
                    downstream.close()
                    continue
                upstream.settimeout(None)
                for a, b in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

        threading.Thread(target=accept, name="kubernetes-service", daemon=True).start()

    def base_env(self) -> dict[str, str]:
        """What a process inherits from the "image": the project's Python environment on PATH."""
        venv_bin = str(Path(sys.executable).parent)
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        env = {"PATH": f"{venv_bin}:{path}", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
        for key, value in os.environ.items():
            if key.startswith(("OPENBLAS_", "FINETUNE_POD_")) or key in ("TZ", "PIP_CACHE_DIR", "HF_HOME"):
                env[key] = value
        return env

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
        with contextlib.suppress(ApiException):
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
        now = _now()
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

    def live_entries(self) -> list[HostEntry]:
        with self.lock:
            return [w.host_entry() for w in self.workers.values()]

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
                        self._final_delete(pod)
                    return
                if deleting:
                    self._final_delete(pod)
                    return
                worker = PodWorker(agent=self, pod=pod, ip=self.allocate_ip())
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
                            "reason": "Error",
                            "message": message,
                            "finishedAt": _now(),
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

    def _final_delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("final delete of %s/%s failed: %s", meta["namespace"], meta["name"], exc.reason)

    def _kill_leftovers(self) -> None:
        """Processes of a previous incarnation of this agent (their pods are marked lost)."""
        for pidfile in (self.state_dir / "pods").glob("*/*.pid"):
            with contextlib.suppress(ValueError):
                _kill_group(int(pidfile.read_text()), signal.SIGKILL)
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
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
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
            worker._kill_all(grace=5)

    def container_log(self, namespace: str, name: str, container: str, previous: bool) -> Path | None:
        for directory in (self.state_dir / "pods").glob(f"{namespace}_{name}_*"):
            logs = sorted(
                (directory / "logs").glob(f"{container}.*.log"), key=lambda p: int(p.name.split(".")[-2])
            )
            if previous:
                logs = logs[:-1]
            if logs:
                return logs[-1]
        return None


class _KubeletHandler(http.server.BaseHTTPRequestHandler):
    agent: NodeAgent

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            return self._reply(200, b"ok")
        if len(parts) == 4 and parts[0] == "containerLogs":
            path = self.agent.container_log(
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
            pod_dir = path.parent.parent
            while True:
                time.sleep(0.5)
                size = path.stat().st_size
                if size > offset:
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        self.wfile.write(handle.read(size - offset))
                        self.wfile.flush()
                    offset = size
                name = path.name.rsplit(".", 2)[0]
                alive = any(
                    w.directory == pod_dir
                    and any(
                        c.name == name and c.process is not None and c.terminated is None
                        for c in w.containers
                    )
                    for w in list(self.agent.workers.values())
                )
                if not alive:
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


def serve_kubelet_api(agent: NodeAgent, port: int, pki_dir: Path) -> None:
    handler = type("Handler", (_KubeletHandler,), {"agent": agent})
    server = _Server(("127.0.0.1", port), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / "kubelet-serving.crt", pki_dir / "kubelet-serving.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--node-name", default="process-node")
    parser.add_argument("--kubelet-port", type=int, required=True)
    parser.add_argument("--apiserver-port", type=int, required=True)
    parser.add_argument("--pki-dir", type=Path, required=True)
    parser.add_argument("--pod-network", default="127.0", help="first two octets of pod IPs")
    parser.add_argument(
        "--kubernetes-service-ip", default=None, help="serve the kubernetes Service here (port 443)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    if subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True).returncode != 0:
        sys.exit("process node: needs mount and UTS namespaces (run as root, or where `unshare -m -u` works)")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    agent = NodeAgent(
        core=client.CoreV1Api(api),
        node_name=args.node_name,
        state_dir=args.state_dir,
        kubelet_port=args.kubelet_port,
        apiserver_port=args.apiserver_port,
        pod_network=args.pod_network,
        kubernetes_service_ip=args.kubernetes_service_ip,
    )

    def stop(signum: int, frame: object) -> None:
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serve_kubelet_api(agent, args.kubelet_port, args.pki_dir)
    agent.serve_kubernetes_service()
    log.info("process node %s starting", args.node_name)
    agent.run()


if __name__ == "__main__":
    main()
