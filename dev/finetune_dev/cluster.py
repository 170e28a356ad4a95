"""Start, stop and inspect the local control plane.

Called by the ``finetune-dev`` CLI and by the pytest fixtures. ``up`` builds the binaries if
needed (cached), writes certificates and kubeconfigs, starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, the versitygw S3 server and the process node as
detached processes on loopback ports, and waits for each to report healthy. Re-running ``up``
on a healthy cluster changes nothing; a component that died is started again. ``down`` stops
them all (SIGTERM, then SIGKILL) and, with ``purge``, deletes the state directory.

Every failure names the component and shows the tail of its log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune_dev import binaries, pki
from finetune_dev.paths import log_tail, state_dir
from finetune_dev.pki import ClientIdentity

DEFAULT_PORT_BASE = 16400
NODE_NAME = "process-node"
# The components run on after the call that started them (they are found and stopped through
# their pid files); their Popen objects are kept here for the life of this process, so that
# Python neither warns that a dropped one "is still running" nor leaves an exited one unreaped.
_STARTED: list[subprocess.Popen[bytes]] = []
SERVICE_CIDR = "10.0.0.0/24"
S3_REGION = "us-east-1"


class ClusterError(RuntimeError):
    """A component failed to start or become healthy; the message names it and shows its log."""


@dataclass(frozen=True)
class Ports:
    """Loopback ports, all derived from one base so several clusters can run side by side."""

    base: int = DEFAULT_PORT_BASE

    @property
    def etcd(self) -> int:
        return self.base

    @property
    def etcd_peer(self) -> int:
        return self.base + 1

    @property
    def apiserver(self) -> int:
        return self.base + 2

    @property
    def controller_manager(self) -> int:
        return self.base + 3

    @property
    def scheduler(self) -> int:
        return self.base + 4

    @property
    def s3(self) -> int:
        return self.base + 5

    @property
    def kubelet(self) -> int:
        return self.base + 6

    @property
    def pod_network(self) -> str:
        """The first two octets of this cluster's pod IPs: 127.<n>, distinct per port base.

        Pods of two clusters on one machine then never share an address (all of 127.0.0.0/8
        is local)."""
        return f"127.{20 + (self.base // 100) % 200}"

    @property
    def kubernetes_service_ip(self) -> str:
        """Where pods reach the API server as https://kubernetes.default.svc (port 443)."""
        return f"{self.pod_network}.255.1"


@dataclass
class Cluster:
    """A local cluster rooted at ``root`` (its state directory)."""

    root: Path = field(default_factory=state_dir)
    ports: Ports = field(default_factory=Ports)

    # --- paths -----------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pods_dir(self) -> Path:
        """Where the process node keeps each pod's volumes and logs, one folder a pod
        (``<namespace>_<name>_<uid>``), removed when the pod is deleted."""
        return self.node_state / "pods"

    @property
    def node_state(self) -> Path:
        return self.root / "node"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def s3_credentials(self) -> tuple[str, str]:
        path = self.root / "s3-credentials.json"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            creds = {"accessKey": "dev" + secrets.token_hex(8), "secretKey": secrets.token_urlsafe(24)}
            path.write_text(json.dumps(creds))
            path.chmod(0o600)
        creds = json.loads(path.read_text())
        return creds["accessKey"], creds["secretKey"]

    def env(self) -> dict[str, str]:
        """Environment for clients: kubectl/helm/the kubernetes client, and S3 clients (boto3)."""
        access, secret = self.s3_credentials()
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": S3_REGION,
            "FINETUNE_DEV_BIN": str(self.bin_dir),
        }

    def s3_client(self) -> Any:
        """A boto3 S3 client for this cluster's versitygw (checksums only when required: boto3's
        default request checksums are not accepted by every S3-compatible server)."""
        import boto3
        from botocore.config import Config

        access, secret = self.s3_credentials()
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name=S3_REGION,
            config=Config(
                request_checksum_calculation="when_required", response_checksum_validation="when_required"
            ),
        )

    @property
    def bin_dir(self) -> Path:
        """A directory of symlinks to kubectl and helm, for PATH."""
        return self.root / "bin"

    # --- lifecycle ------------------------------------------------------------------------
    def up(self, *, echo: Callable[[str], None] = print) -> None:
        binaries.build_all(echo=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        pki.ensure(self.pki, extra_ips=(self.ports.kubernetes_service_ip,))
        self._write_kubeconfigs()
        self._link_tools()
        started = time.monotonic()
        for component in self._components():
            if component.running(self) and component.healthy(self):
                continue
            self._check_port_free(component)
            echo(f"starting {component.name}")
            process = component.start(self)
            component.wait_healthy(self, process)
        self._wait_bootstrap()
        echo(f"cluster ready in {time.monotonic() - started:.1f}s (kubeconfig {self.kubeconfig})")

    def down(self, *, purge: bool = False) -> None:
        for component in reversed(self._components()):
            component.stop(self)
        if purge:
            shutil.rmtree(self.root, ignore_errors=True)

    def status(self) -> list[tuple[str, str, str]]:
        """(component, pid or '-', 'healthy' | 'unhealthy' | 'stopped') for each component."""
        rows = []
        for component in self._components():
            pid = component.pid(self)
            if pid is None or not component.running(self):
                rows.append((component.name, "-", "stopped"))
            else:
                rows.append((component.name, str(pid), "healthy" if component.healthy(self) else "unhealthy"))
        return rows

    def healthy(self) -> bool:
        return all(state == "healthy" for _, _, state in self.status())

    # --- helpers ---------------------------------------------------------------------------
    def _components(self) -> list[Component]:
        return [ETCD, APISERVER, CONTROLLER_MANAGER, SCHEDULER, S3, NODE]

    def _check_port_free(self, component: Component) -> None:
        port = component.port(self)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise ClusterError(
                    f"{component.name}: port 127.0.0.1:{port} is in use ({exc.strerror}); stop whatever "
                    f"holds it or choose another port base (--port-base / FINETUNE_DEV_PORT_BASE)"
                ) from None

    def _kubeconfig_for(self, identity: ClientIdentity) -> dict[str, object]:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "finetune-dev",
                    "cluster": {
                        "server": self.apiserver_url,
                        "certificate-authority-data": b64(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": identity.user,
                    "user": {
                        "client-certificate-data": b64(self.pki / f"{identity.stem}.crt"),
                        "client-key-data": b64(self.pki / f"{identity.stem}.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "finetune-dev", "context": {"cluster": "finetune-dev", "user": identity.user}}
            ],
            "current-context": "finetune-dev",
        }

    def _write_kubeconfigs(self) -> None:
        for identity in (pki.ADMIN, pki.CONTROLLER_MANAGER, pki.SCHEDULER, pki.NODE_AGENT):
            path = self.kubeconfig if identity is pki.ADMIN else self.root / f"{identity.stem}.kubeconfig"
            path.write_text(yaml.safe_dump(self._kubeconfig_for(identity)))
            path.chmod(0o600)

    def _link_tools(self) -> None:
        self.bin_dir.mkdir(exist_ok=True)
        for name in ("kubectl", "helm"):
            link = self.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(binaries.binary(name))

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binaries.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def _wait_bootstrap(self, timeout: float = 90) -> None:
        """Wait until the cluster can run pods: default ServiceAccount, root CA ConfigMap, Node."""
        deadline = time.monotonic() + timeout
        checks = {
            "the default ServiceAccount (created by kube-controller-manager)": (
                "get",
                "serviceaccount",
                "default",
                "-n",
                "default",
            ),
            "the kube-root-ca.crt ConfigMap (created by kube-controller-manager)": (
                "get",
                "configmap",
                "kube-root-ca.crt",
                "-n",
                "default",
            ),
            f"the Node {NODE_NAME} (registered by the process node)": ("get", "node", NODE_NAME),
        }
        for what, args in checks.items():
            while self.kubectl(*args, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"timed out after {timeout:.0f}s waiting for {what}; controller-manager log:\n"
                        f"{log_tail(self.logs / 'kube-controller-manager.log')}"
                    )
                time.sleep(0.5)


# --- components ---------------------------------------------------------------------------


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return marker in cmdline


def _http_ok(url: str, *, context: ssl.SSLContext | None = None, accept: tuple[int, ...] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            return response.status in accept
    except urllib.error.HTTPError as exc:
        return exc.code in accept
    except (OSError, ssl.SSLError):
        return False


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Component:
    """One process of the cluster: how to start it and how to tell it is healthy."""

    name: str
    command: Callable[[Cluster], list[str]]
    health: Callable[[Cluster], bool]
    port: Callable[[Cluster], int]
    env: Callable[[Cluster], dict[str, str]] = lambda c: {}
    start_timeout: float = 60

    def _pidfile(self, cluster: Cluster) -> Path:
        return cluster.root / "run" / f"{self.name}.pid"

    def pid(self, cluster: Cluster) -> int | None:
        try:
            return int(self._pidfile(cluster).read_text())
        except (OSError, ValueError):
            return None

    def running(self, cluster: Cluster) -> bool:
        pid = self.pid(cluster)
        return pid is not None and _pid_alive(pid, str(cluster.root))

    def healthy(self, cluster: Cluster) -> bool:
        return self.health(cluster)

    def log(self, cluster: Cluster) -> Path:
        return cluster.logs / f"{self.name}.log"

    def start(self, cluster: Cluster) -> subprocess.Popen[bytes]:
        self._pidfile(cluster).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env(cluster)}
        env.pop("KUBECONFIG", None)
        with self.log(cluster).open("ab") as log:
            try:
                process = subprocess.Popen(
                    self.command(cluster),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=cluster.root,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ClusterError(f"{self.name} could not be started: {exc}") from exc
        self._pidfile(cluster).write_text(str(process.pid))
        _STARTED.append(process)
        return process

    def wait_healthy(self, cluster: Cluster, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.healthy(cluster):
            if process.poll() is not None:
                raise ClusterError(
                    f"{self.name} exited during start-up; log {self.log(cluster)}:\n{log_tail(self.log(cluster))}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.name} did not become healthy within {self.start_timeout:.0f}s; "
                    f"log {self.log(cluster)}:\n{log_tail(self.log(cluster))}"
                )
            time.sleep(0.25)

    def stop(self, cluster: Cluster, grace: float = 15) -> None:
        pid = self.pid(cluster)
        if pid is None:
            return
        if self.running(cluster):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.running(cluster) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running(cluster):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self._pidfile(cluster).unlink(missing_ok=True)


def _bin(name: str) -> str:
    return str(binaries.binary(name))


def _etcd_command(c: Cluster) -> list[str]:
    client = f"http://127.0.0.1:{c.ports.etcd}"
    peer = f"http://127.0.0.1:{c.ports.etcd_peer}"
    return [
        _bin("etcd"),
        "--name=finetune-dev",
        f"--data-dir={c.root / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=finetune-dev={peer}",
        "--listen-metrics-urls=",
        "--unsafe-no-fsync",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def _apiserver_command(c: Cluster) -> list[str]:
    p = c.pki
    return [
        _bin("kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{c.ports.etcd}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={c.ports.apiserver}",
        f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--client-ca-file={p / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p / 'service-account.pub'}",
        f"--service-account-signing-key-file={p / 'service-account.key'}",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={p / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        # The built-in "kubernetes" Service would get 127.0.0.1 as its endpoint, which endpoint
        # validation rejects; in-cluster clients here get KUBERNETES_SERVICE_HOST=127.0.0.1.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def _component_common(c: Cluster, stem: str, port: int) -> list[str]:
    kubeconfig = c.root / f"{stem}.kubeconfig"
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={c.root / stem}",
        "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        "--v=1",
    ]


def _controller_manager_command(c: Cluster) -> list[str]:
    return [
        _bin("kube-controller-manager"),
        *_component_common(c, "controller-manager", c.ports.controller_manager),
        f"--service-account-private-key-file={c.pki / 'service-account.key'}",
        f"--root-ca-file={c.pki / 'ca.crt'}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The process node does not renew a Lease: spare it from the node lifecycle controller.
        "--controllers=*,-node-lifecycle-controller,-taint-eviction-controller",
    ]


def _scheduler_command(c: Cluster) -> list[str]:
    return [_bin("kube-scheduler"), *_component_common(c, "scheduler", c.ports.scheduler)]


def _s3_command(c: Cluster) -> list[str]:
    root = c.root / "s3"
    root.mkdir(parents=True, exist_ok=True)
    return [_bin("versitygw"), "--port", f"127.0.0.1:{c.ports.s3}", "posix", str(root)]


def _s3_env(c: Cluster) -> dict[str, str]:
    access, secret = c.s3_credentials()
    return {"ROOT_ACCESS_KEY": access, "ROOT_SECRET_KEY": secret}


def _node_command(c: Cluster) -> list[str]:
    return [
        sys.executable,
        "-m",
        "finetune_dev.node",
        f"--kubeconfig={c.root / 'node-agent.kubeconfig'}",
        f"--state-dir={c.node_state}",
        f"--node-name={NODE_NAME}",
        f"--kubelet-port={c.ports.kubelet}",
        f"--pki-dir={c.pki}",
        f"--apiserver-port={c.ports.apiserver}",
        f"--pod-network={c.ports.pod_network}",
        f"--kubernetes-service-ip={c.ports.kubernetes_service_ip}",
    ]


def _apiserver_healthy(c: Cluster) -> bool:
    context = ssl.create_default_context(cafile=str(c.pki / "ca.crt"))
    return _http_ok(f"{c.apiserver_url}/readyz", context=context)


ETCD = Component(
    name="etcd",
    command=_etcd_command,
    health=lambda c: _http_ok(f"http://127.0.0.1:{c.ports.etcd}/health"),
    port=lambda c: c.ports.etcd,
)
APISERVER = Component(
    name="kube-apiserver",
    command=_apiserver_command,
    health=_apiserver_healthy,
    port=lambda c: c.ports.apiserver,
    start_timeout=120,
)
CONTROLLER_MANAGER = Component(
    name="kube-controller-manager",
    command=_controller_manager_command,
    health=lambda c: _http_ok(f"https://127.0.0.1:{c.ports.controller_manager}/healthz", context=_insecure()),
    port=lambda c: c.ports.controller_manager,
)
SCHEDULER = Component(
    name="kube-scheduler",
    command=_scheduler_command,
    health=lambda c: _http_ok(f"https://127.0.0.1:{c.ports.scheduler}/healthz", context=_insecure()),
    port=lambda c: c.ports.scheduler,
)
S3 = Component(
    name="versitygw",
    command=_s3_command,
    env=_s3_env,
    # Anonymous requests get 403 Access Denied: the server is answering S3 requests.
    health=lambda c: _http_ok(f"http://127.0.0.1:{c.ports.s3}/", accept=(200, 403)),
    port=lambda c: c.ports.s3,
)
NODE = Component(
    name="process-node",
    command=_node_command,
    health=lambda c: _http_ok(f"https://127.0.0.1:{c.ports.kubelet}/healthz", context=_insecure()),
    port=lambda c: c.ports.kubelet,
)
