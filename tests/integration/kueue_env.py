"""Kueue's real controller manager on the local cluster, for tests/integration/test_kueue.py.

`running_kueue` (the module-scoped `kueue` fixture of conftest.py) installs Kueue's CRDs from the
pinned module's source (Go module cache), runs the controller manager built by
finetune_dev.binaries as a local process under a ServiceAccount bound to Kueue's own ClusterRole
(config/components/rbac/role.yaml: the rights it ships with, not cluster admin), and registers its admission webhooks — the batch Job and Kueue
API ones — with `clientConfig.url` on 127.0.0.1 and a serving certificate from the cluster's CA
(Kueue's internal certificate management names a Service, which the local API server cannot
route to; the same certificate serves its metrics endpoint, see `METRICS_CERT_DIR`). Only the
`batch/job` integration is enabled. On teardown the webhooks are removed
before Kueue stops, so later tests' Jobs are not sent to a server that is gone; the CRDs stay
(their objects live in the tests' namespaces, deleted with them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_dev import binaries, pki
from tests.integration.operator_env import SYSTEM_NAMESPACE, free_port, identity_kubeconfig
from tests.kube import ClusterHandle, wait_for

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager-test"
# Webhooks of what this cluster runs: Kueue's own API and batch Jobs (the only integration on).
KEPT_WEBHOOK_PATHS = ("-kueue-x-k8s-io-", "-batch-v1-job")
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"


@dataclass(frozen=True)
class Kueue:
    """The running controller manager: where its log and metrics are."""

    log: Path
    metrics_url: str

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _source() -> Path:
    return binaries.module_source(binaries.KUEUE)


def _webhook_configurations(source: Path, webhook_port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, pointed at the local process by URL."""
    out = []
    for doc in yaml.safe_load_all((source / "config/components/webhook/manifests.yaml").read_text()):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if any(marker in path for marker in KEPT_WEBHOOK_PATHS):
                hook["clientConfig"] = {
                    "url": f"https://127.0.0.1:{webhook_port}{path}",
                    "caBundle": ca_bundle,
                }
                kept.append(hook)
        doc["metadata"] = {"name": f"kueue-test-{doc['metadata']['name']}"}
        doc["webhooks"] = kept
        out.append(doc)
    return out


def _configuration(
    *, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path
) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_kueue(cluster: ClusterHandle, directory: Path) -> Iterator[Kueue]:
    """Kueue's CRDs, identity and controller manager (with its webhooks) on `cluster`, its files
    in `directory`; the webhooks removed and the process stopped on exit."""
    source = _source()
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(source / "config/components/crd/bases")
    )
    for crd in ("workloads", "clusterqueues", "localqueues", "resourceflavors"):
        wait_for(  # a CRD just created has no status yet: `kubectl wait` fails until it has one
            lambda crd=crd: (
                cluster.kubectl(
                    "wait",
                    "--for=condition=Established",
                    f"crd/{crd}.kueue.x-k8s.io",
                    "--timeout=10s",
                    check=False,
                ).returncode
                == 0
            ),
            timeout=60,
            what=f"the CRD {crd}.kueue.x-k8s.io to be established",
        )
    role = yaml.safe_load((source / "config/components/rbac/role.yaml").read_text())
    kubeconfig = identity_kubeconfig(cluster, SERVICE_ACCOUNT, role, directory)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    # Its Role on Secrets in its own namespace (manager_secrets_role.yaml), bound the same way.
    secrets_role = yaml.safe_load((source / "config/components/rbac/manager_secrets_role.yaml").read_text())
    secrets_role["metadata"] = {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": SYSTEM_NAMESPACE}],
    }
    manifest = {"apiVersion": "v1", "kind": "List", "items": [secrets_role, binding]}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    webhook_port, health_port, metrics_port = free_port(), free_port(), free_port()
    pki_dir = Path(cluster.cluster.pki)
    cert_dir = pki.serving_certificate(
        pki_dir, directory / "certs", common_name="kueue-webhook", ips=("127.0.0.1",)
    )
    config = directory / "kueue-config.yaml"
    config.write_text(
        yaml.safe_dump(
            _configuration(
                webhook_port=webhook_port,
                health_port=health_port,
                metrics_port=metrics_port,
                cert_dir=cert_dir,
            )
        )
    )
    log = directory / "kueue.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    kueue_command = [
        str(binaries.binary("kueue")),
        f"--config={config}",
        "--feature-gates=VisibilityOnDemand=false",  # its aggregated API server is not needed
        "--zap-log-level=2",
    ]
    # Without internal certificate management Kueue reads its metrics server's certificate from a
    # fixed path, /etc/kueue/metrics/certs (a Secret volume in its Deployment). A private mount
    # namespace with an overlay on /etc gives it that path; the machine's /etc is not touched.
    overlay = directory / "etc-overlay"
    (overlay / "upper").mkdir(parents=True)
    (overlay / "work").mkdir()
    script = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay / 'upper'},workdir={overlay / 'work'} /etc"
        f" && mkdir -p {METRICS_CERT_DIR} && cp {cert_dir}/tls.crt {cert_dir}/tls.key {METRICS_CERT_DIR}/"
        ' && exec "$@"'
    )
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "kueue", *kueue_command]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    kept = Kueue(log=log, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    webhooks: list[dict[str, Any]] = []
    try:
        wait_for(
            lambda: process.poll() is None and _ready(f"http://127.0.0.1:{health_port}/readyz"),
            timeout=90,
            what=f"Kueue's controller manager to be ready (log {log}:\n{kept.log_tail() if log.exists() else ''})",
        )
        ca_bundle = base64.b64encode((pki_dir / "ca.crt").read_bytes()).decode()
        webhooks = _webhook_configurations(source, webhook_port, ca_bundle)
        cluster.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(w) for w in webhooks))
        yield kept
    finally:
        for hook in webhooks:
            cluster.kubectl(
                "delete", hook["kind"].lower(), hook["metadata"]["name"], "--ignore-not-found", check=False
            )
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()
