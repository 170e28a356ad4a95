"""``finetune-dev``: cached builds, idempotent ``up``, status and env, errors that name the part."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_dev import binaries
from finetune_dev.binaries import BuildError, Component
from finetune_dev.cluster import Cluster, ClusterError, Ports
from finetune_dev.cluster import Component as ClusterComponent
from tests.kube import ClusterHandle

FINETUNE_DEV = str(Path(sys.executable).parent / "finetune-dev")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_a_second_build_reuses_every_cached_binary(cluster: ClusterHandle) -> None:
    stamps = {c.name: (c.directory / ".complete").stat().st_mtime_ns for c in binaries.COMPONENTS}

    result = subprocess.run([FINETUNE_DEV, "build"], capture_output=True, text=True, check=True)

    assert "building" not in result.stdout
    assert {c.name: (c.directory / ".complete").stat().st_mtime_ns for c in binaries.COMPONENTS} == stamps
    for component in binaries.COMPONENTS:
        assert f"{component.name:12} {component.version:10}" in result.stdout


@pytest.mark.cluster
def test_kubernetes_binaries_report_the_pinned_version(cluster: ClusterHandle) -> None:
    version = cluster.kubectl("version", "-o", "json").stdout
    assert f'"gitVersion": "{binaries.KUBERNETES_VERSION}"' in version


@pytest.mark.cluster
def test_up_on_a_running_cluster_changes_nothing(cluster: ClusterHandle) -> None:
    before = cluster.cluster.status()
    said: list[str] = []

    cluster.cluster.up(echo=said.append)

    assert cluster.cluster.status() == before
    assert [line for line in said if line.startswith("starting")] == []
    assert all(state == "healthy" for _, _, state in before)


@pytest.mark.cluster
def test_status_and_env_commands(cluster: ClusterHandle) -> None:
    env = {
        **os.environ,
        "FINETUNE_DEV_STATE": str(cluster.cluster.root),
        "FINETUNE_DEV_PORT_BASE": str(cluster.cluster.ports.base),
    }

    status = subprocess.run([FINETUNE_DEV, "status"], capture_output=True, text=True, env=env)
    bare = {**env, "PATH": "/usr/bin:/bin"}  # the virtualenv not activated
    exports = subprocess.run([FINETUNE_DEV, "env"], capture_output=True, text=True, env=bare, check=True)

    assert status.returncode == 0, status.stdout
    for name in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "versitygw",
        "process-node",
    ):
        assert any(
            line.split()[0] == name and line.endswith("healthy") for line in status.stdout.splitlines()
        ), name
    # A fresh shell: the exports alone find kubectl and the plugin.
    shell = subprocess.run(
        [
            "bash",
            "-c",
            exports.stdout + "\nkubectl get node process-node -o name && echo $AWS_ENDPOINT_URL"
            " && kubectl finetune --help >/dev/null && echo kubectl-finetune-runs",
        ],
        capture_output=True,
        text=True,
        env={"HOME": os.environ.get("HOME", "/root"), "PATH": bare["PATH"]},
    )
    assert shell.stdout.split() == ["node/process-node", cluster.s3_endpoint, "kubectl-finetune-runs"], (
        shell.stderr
    )


def test_build_failure_names_the_component_and_shows_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_DEV_CACHE", str(tmp_path))
    bogus = Component(
        name="helm",
        module="helm.sh/helm/v3",
        version="v3.0.0-does-not-exist",
        binaries={"helm": "helm.sh/helm/v3/cmd/helm"},
    )

    with pytest.raises(BuildError) as info:
        binaries.build(bogus)

    message = str(info.value)
    assert message.startswith("building helm failed")
    assert "v3.0.0-does-not-exist" in message, "the log tail names the version that could not be fetched"
    assert not bogus.complete


def test_a_busy_port_is_reported_with_the_component_name(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ports = Ports(squatter.getsockname()[1])  # etcd's client port is the base port
        with pytest.raises(ClusterError, match=rf"^etcd: port 127.0.0.1:{ports.etcd} is in use"):
            Cluster(root=tmp_path, ports=ports).up(echo=lambda _: None)


def test_a_component_that_exits_at_start_is_named_with_its_log_tail(tmp_path: Path) -> None:
    cluster = Cluster(root=tmp_path)
    cluster.logs.mkdir(parents=True)
    broken = ClusterComponent(
        name="broken-component",
        command=lambda c: [
            "sh",
            "-c",
            f"echo starting in {c.root}; echo 'fatal: cannot open data dir' >&2; exit 3",
        ],
        health=lambda c: False,
        port=lambda c: 1,
    )
    process = broken.start(cluster)

    with pytest.raises(ClusterError) as info:
        broken.wait_healthy(cluster, process)

    assert str(info.value).startswith("broken-component exited during start-up")
    assert "fatal: cannot open data dir" in str(info.value)


def test_setup_refuses_a_checkout_under_tmp_saying_why(tmp_path: Path) -> None:
    """The process node runs pods from the checkout's .venv, which a pod's /tmp volume hides."""
    checkout = tmp_path / "finetune-operator"  # pytest's tmp_path is itself under /tmp
    assert str(checkout.resolve()).startswith("/tmp/")
    (checkout / "dev" / "finetune_dev").mkdir(parents=True)
    shutil.copy(ROOT / "dev" / "setup.sh", checkout / "dev" / "setup.sh")
    for module in ("__init__.py", "paths.py"):
        shutil.copy(ROOT / "dev" / "finetune_dev" / module, checkout / "dev" / "finetune_dev" / module)

    result = subprocess.run(["bash", str(checkout / "dev" / "setup.sh")], capture_output=True, text=True)

    assert result.returncode != 0
    assert f"this checkout is at {checkout.resolve()}, under /tmp" in result.stderr
    assert "hides the checkout's .venv" in result.stderr and "elsewhere" in result.stderr
    assert not (checkout / ".venv").exists(), "nothing is installed into a checkout that cannot work"
