"""Helpers for the operator's integration tests: identities, the operator run in-process,
FineTuneJob manifests for the stand-in trainer, and reading what the operator wrote.

The fixtures built on them (`crd`, `operator_kubeconfig`, `operator`) are in
tests/integration/conftest.py; this module holds none.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.kube import ClusterHandle, wait_for

STANDIN = Path(__file__).with_name("standin_trainer.py")
SYSTEM_NAMESPACE = "finetune-operator-tests"
SERVICE_ACCOUNT = "finetune-operator-test"  # cluster-scoped names must not clash with the chart


def identity_kubeconfig(cluster: ClusterHandle, name: str, role: dict[str, Any], directory: Path) -> Path:
    """A ServiceAccount bound to `role` (a ClusterRole dict) and a kubeconfig with its token."""
    role = {**role, "metadata": {"name": name}}
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE},
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
    }
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}
    manifest = {"apiVersion": "v1", "kind": "List", "items": [namespace, account, role, binding]}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    token = cluster.kubectl("create", "token", name, "-n", SYSTEM_NAMESPACE, "--duration=4h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "local", "user": name}}],
        "current-context": name,
    }
    path = directory / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def assert_no_other_operator(cluster: ClusterHandle) -> None:
    """Two operators on one cluster would both reconcile the tests' jobs, with different
    settings (trainer command, run folders): refuse to run rather than fail obscurely."""
    out = cluster.kubectl(
        "get", "deployments", "-A", "-l", "app.kubernetes.io/name=finetune-operator", "-o", "json"
    ).stdout
    running = [
        f"{d['metadata']['namespace']}/{d['metadata']['name']}"
        for d in json.loads(out)["items"]
        if (d.get("spec") or {}).get("replicas", 1)
    ]
    assert not running, (
        f"another finetune-operator runs in this cluster ({', '.join(running)}); the operator tests "
        "need to be the only one: uninstall or scale it to 0, or use a private test cluster"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """The running operator: its metrics URL and kopf's captured output."""

    def __init__(self, runner: Any, metrics_url: str, runs_dir: Path) -> None:
        self.runner = runner
        self.metrics_url = metrics_url
        self.runs_dir = runs_dir

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())


_METRICS_PORT: dict[str, int] = {}


def operator_environment(kubeconfig: Path, runs_dir: Path, trainer: Path = STANDIN) -> dict[str, str]:
    port = _METRICS_PORT.setdefault("port", free_port())  # one metrics server per process
    return {
        "KUBECONFIG": str(kubeconfig),
        "FINETUNE_TRAINER_COMMAND": json.dumps([sys.executable, str(trainer)]),
        "FINETUNE_RUNS_URI": f"file://{runs_dir}/",
        "FINETUNE_POLL_INTERVAL_SECONDS": "1",
        "FINETUNE_METRICS_PORT": str(port),
        "FINETUNE_METRICS_ADDR": "127.0.0.1",
    }


@contextmanager
def running_operator(kubeconfig: Path, runs_dir: Path, trainer: Path = STANDIN) -> Iterator[OperatorProcess]:
    """The operator under KopfRunner with `kubeconfig`'s identity and `trainer` (a script) as the
    trainer command, until the block ends."""
    from kopf.testing import KopfRunner

    env = operator_environment(kubeconfig, runs_dir, trainer)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        # The operator reads its settings from os.environ when it starts (Controller.start).
        args = ["run", "--standalone", "--all-namespaces", "--verbose", "-m", "finetune_operator.handlers"]
        with KopfRunner(args, timeout=60) as runner:
            url = f"http://127.0.0.1:{env['FINETUNE_METRICS_PORT']}/metrics"
            wait_for(lambda: _reachable(url), timeout=30, what="the operator's metrics endpoint")
            yield OperatorProcess(runner, url, runs_dir)
        assert runner.exit_code == 0, runner.output[-4000:]
        assert runner.exception is None, runner.output[-4000:]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# manifests and observation


def manifest(name: str, scenario: str = "ok", **spec: Any) -> dict[str, Any]:
    """A FineTuneJob for the stand-in trainer; `scenario` picks its behaviour."""
    body: dict[str, Any] = {
        "model": {"name": "smollm2-135m-instruct"},
        "dataset": {"train": [f"file:///standin/{scenario}/train.jsonl"]},
        "hyperparameters": {"maxSteps": 20, "batchSize": 4},
        "evaluation": {"everySteps": 10},
        "checkpoints": {"everySteps": 5},
        "runPolicy": {"backoffLimit": 0, "terminationGracePeriodSeconds": 30},
    }
    body.update(spec)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def apply(cluster: ClusterHandle, namespace: str, obj: dict[str, Any]) -> str:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj)).stdout


def get_ftj(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout))


def job_run_dir(cluster: ClusterHandle, namespace: str, name: str) -> Path:
    """The job's run folder on this machine (file:// run folders): status.runUri, which is
    <runsUri><namespace>/<name>/<uid>/ by default."""
    uri = status(cluster, namespace, name)["runUri"]
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


def status(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_ftj(cluster, namespace, name).get("status") or {})


def wait_phase(
    cluster: ClusterHandle, namespace: str, name: str, *phases: str, timeout: float = 90
) -> dict[str, Any]:
    seen: list[str] = []

    def check() -> dict[str, Any] | None:
        current = status(cluster, namespace, name)
        if not seen or seen[-1] != current.get("phase"):
            seen.append(str(current.get("phase")))
        return current if current.get("phase") in phases else None

    try:
        result: dict[str, Any] = wait_for(
            check, timeout=timeout, what=f"{name} to reach {phases}", interval=0.3
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; phases seen: {seen}; status: {status(cluster, namespace, name)}"
        ) from None
    return result


def conditions(current: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in current.get("conditions") or []}


def events(cluster: ClusterHandle, namespace: str, name: str) -> list[dict[str, Any]]:
    items = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
            "-o",
            "json",
        ).stdout
    )["items"]
    return sorted(items, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))


def children(cluster: ClusterHandle, namespace: str, name: str) -> list[str]:
    out = cluster.kubectl(
        "get",
        "configmaps,services,jobs",
        "-n",
        namespace,
        "-l",
        f"finetune.dev/job-name={name}",
        "-o",
        "name",
    ).stdout
    return sorted(line for line in out.splitlines() if line)


def elapsed(since: float) -> float:
    return time.monotonic() - since
