"""The pod worker: runs one pod's containers as local processes, from first sight to deletion.

Created by the node agent (``finetune_dev.node.agent``) for each pod bound to the node, one thread
per pod. It materializes the pod's volumes, starts each container under ``unshare`` through
``finetune_dev.podshim``, restarts containers as ``restartPolicy`` says, kills them on deletion
(SIGTERM, then SIGKILL after the grace period) and reports truthful pod status.

Everything it needs from the node and the API server goes through ``PodHost``, the narrow
protocol below, which the agent implements: this module imports no Kubernetes client. The rules
(env, volumes, hosts files, exit reasons) live in ``finetune_dev.podspec`` (pure).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune_dev import podspec
from finetune_dev.podspec import HostEntry, PodSpecError

log = logging.getLogger("process-node")

MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
RESTART_BACKOFF_MAX = 60.0
CONFIG_RETRY_SECONDS = 5.0


def utc_timestamp() -> str:
    """Now, as the kubelet writes times into pod and node status (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MEMORY_CHECK_SECONDS = 1.0


def session_memory_bytes(session: int) -> int:
    """The proportional set size (PSS: shared pages split between their users, as a memory
    cgroup counts them once) of every process in `session` — a container's processes."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[3]) != session:  # field 6: the session id
                continue
            for line in Path(entry.path, "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or a kernel thread
    return total


def kill_group(pid: int, sig: int) -> None:
    """Signal a container's whole process group (it was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class PodHost(Protocol):
    """What a pod worker may ask of its node: the whole of the worker ↔ agent protocol."""

    @property
    def host_ip(self) -> str: ...

    @property
    def pods_dir(self) -> Path:
        """Where each pod gets its directory (volumes, logs, plans, /etc/hosts)."""
        ...

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap or Secret as a dict, or None if it does not exist."""
        ...

    def service_env(self) -> dict[str, str]:
        """KUBERNETES_SERVICE_HOST/PORT and friends, as the kubelet injects them."""
        ...

    def base_env(self) -> dict[str, str]:
        """What a process inherits from the "image"."""
        ...

    def network_env(self, pod_ip: str, inherited: str | None) -> dict[str, str]:
        """Variables that give the pod its own listening ports (`pod_ports`); `inherited`: the
        container's own LD_PRELOAD, kept."""
        ...

    def service_account_token(self, pod: dict[str, Any], expiration: int | None, audience: str | None) -> str:
        """A token for the pod's ServiceAccount, bound to the pod (TokenRequest API)."""
        ...

    def patch_pod_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        """Write the pod's status; a pod already gone is not an error."""
        ...

    def delete_pod(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word: delete the pod object with grace period 0."""
        ...

    def event(self, pod: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        """Record an Event about the pod (best effort)."""
        ...

    def refresh_hosts(self) -> None:
        """Rewrite every live pod's /etc/hosts (a pod appeared or its Service did)."""
        ...

    def pod_finished(self, worker: PodWorker) -> None:
        """The worker's thread is about to end: forget the pod."""
        ...


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
    oom_killed: bool = False  # killed by the node for exceeding resources.limits.memory
    memory_checked: float = 0.0

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

    host: PodHost
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
        return self.host.pods_dir / f"{self.namespace}_{self.name}_{self.uid}"

    def log_path(self, container: str, restart: int) -> Path:
        return self.directory / "logs" / f"{container}.{restart}.log"

    def host_entry(self) -> HostEntry:
        hostname, subdomain = podspec.pod_hostname(self.pod)
        return HostEntry(self.namespace, self.ip, hostname, subdomain)

    def container_running(self, name: str) -> bool:
        return any(
            run.name == name and run.process is not None and run.terminated is None for run in self.containers
        )

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
            self.kill_all(grace=0)
            if self.stop_requested.is_set():
                # The pod is deleted: as a kubelet does, remove its volumes (emptyDirs) and logs,
                # so that a session of many pods does not fill the disk.
                shutil.rmtree(self.directory, ignore_errors=True)
            self.host.pod_finished(self)

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
        self.host.refresh_hosts()
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
                self.host.event(self.pod, exc.reason, exc.message, warning=True)
                if self.stop_requested.wait(timeout=5):
                    return None

    def _prepare_volumes(self) -> dict[str, Path]:
        volumes_dir = self.directory / "volumes"
        prepared: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            contents = podspec.volume_files(
                self.pod,
                volume,
                lookup=self.host.lookup,
                token=self._token,
                pod_ip=self.ip,
                host_ip=self.host.host_ip,
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
        return self.host.service_account_token(self.pod, expiration, audience)

    # --- containers -----------------------------------------------------------------------
    def _plan(self, run: ContainerRun, mounts: dict[str, Path]) -> Path:
        env = podspec.container_env(
            self.pod,
            run.spec,
            lookup=self.host.lookup,
            pod_ip=self.ip,
            host_ip=self.host.host_ip,
            service_env=self.host.service_env(),
        )
        argv = podspec.command_line(run.spec, env)
        base = self.host.base_env()
        full_env = {**base, **env, "HOSTNAME": self.host_entry().hostname}
        full_env.update(self.host.network_env(self.ip, full_env.get("LD_PRELOAD")))
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
            self.host.event(self.pod, "Failed", f"Error: {exc.message}", warning=True)
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
        run.started_at = utc_timestamp()
        run.terminated = None
        run.oom_killed = False
        self.host.event(self.pod, "Started", f"Started container {run.name}")

    def _enforce_memory_limit(self, run: ContainerRun) -> None:
        """What a memory cgroup's OOM killer does: a container above its memory limit is killed
        (SIGKILL, all its processes) and reported OOMKilled. Checked once a second."""
        assert run.process is not None
        limit = podspec.memory_limit_bytes(run.spec)
        now = time.monotonic()
        if limit is None or now - run.memory_checked < MEMORY_CHECK_SECONDS:
            return
        run.memory_checked = now
        used = session_memory_bytes(run.process.pid)
        if used > limit:
            log.warning(
                "%s/%s: container %s uses %d bytes, above its memory limit of %d: killed",
                self.namespace, self.name, run.name, used, limit,
            )  # fmt: skip
            run.oom_killed = True
            kill_group(run.process.pid, signal.SIGKILL)

    def _collect_exit(self, run: ContainerRun) -> bool:
        """If the container's process has exited, record its terminated state. True if it did."""
        assert run.process is not None
        code = run.process.poll()
        if code is None:
            self._enforce_memory_limit(run)
            return False
        kill_group(run.process.pid, signal.SIGKILL)
        exit_code = 128 - code if code < 0 else code
        run.terminated = {
            "exitCode": exit_code,
            "reason": "OOMKilled" if run.oom_killed else podspec.termination_reason(exit_code),
            "startedAt": run.started_at,
            "finishedAt": utc_timestamp(),
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
                    self.host.event(
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

    def kill_all(self, grace: float) -> None:
        """SIGTERM every running container, SIGKILL what is left after `grace` seconds."""
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
            kill_group(run.process.pid, signal.SIGKILL)
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error(
                    "pod %s/%s: container %s did not die after SIGKILL", self.namespace, self.name, run.name
                )

    def _terminate_for_deletion(self) -> None:
        if any(r.process is not None and r.terminated is None for r in self.containers):
            self.host.event(
                self.pod, "Killing", f"Stopping containers (grace period {self.grace_seconds:.0f}s)"
            )
        self.kill_all(grace=self.grace_seconds)
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
        self.host.delete_pod(self.pod)

    # --- status ---------------------------------------------------------------------------
    def _condition(self, kind: str, status: bool, reason: str | None = None) -> dict[str, Any]:
        condition = {
            "type": kind,
            "status": "True" if status else "False",
            "lastTransitionTime": utc_timestamp(),
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
            "hostIP": self.host.host_ip,
            "hostIPs": [{"ip": self.host.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "conditions": list(self.pod_conditions.values()),
            "containerStatuses": [r.status() for r in self.containers],
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
        }
        if self.init_containers:
            status["initContainerStatuses"] = [r.status() for r in self.init_containers]
        if start:
            status["startTime"] = utc_timestamp()
        if message is not None:
            status["message"], status["reason"] = message, reason
        self.host.patch_pod_status(self.pod, status)
