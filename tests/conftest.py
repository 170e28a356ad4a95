"""Shared fixtures: the real local cluster, started once per test session.

Tiers (each directory's conftest states its boundary):
- tests/unit: pure logic, no processes, no network.
- tests/operator: operator logic with our Kubernetes wrapper faked.
- tests/trainer: the real trainer with torch on tiny models; no cluster.
- tests/integration and tests/e2e: the real control plane (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler built from Go modules), the process node and the
  versitygw S3 server, brought up by the ``cluster`` fixture below.

The ``cluster`` fixture starts a private cluster in a temporary state directory on port base
``$FINETUNE_TEST_PORT_BASE`` (default 17400) and tears it down at the end. With
``FINETUNE_TEST_REUSE_CLUSTER=1`` it uses (and starts if needed) the developer's cluster selected
by ``$FINETUNE_DEV_STATE``/``$FINETUNE_DEV_PORT_BASE`` instead, and leaves it running.

Every test that uses the ``cluster`` fixture must carry the ``cluster`` marker (so
``-m "not cluster"`` never starts a cluster); collection stops with the names of those that do
not. The default per-test timeout and the warnings that are not errors are in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_dev.cli import cluster_from_env
from finetune_dev.cluster import Cluster, Ports
from tests.kube import ClusterHandle, wait_for


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if "cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("cluster") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the `cluster` fixture but are not marked `cluster` "
            "(add `pytestmark = pytest.mark.cluster` or `@pytest.mark.cluster`):\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    if os.environ.get("FINETUNE_TEST_REUSE_CLUSTER") == "1":
        shared = cluster_from_env()
        if not shared.healthy():
            shared.up()
        yield ClusterHandle(shared)
        return
    root = Path(tempfile.mkdtemp(prefix="finetune-test-cluster-"))
    private = Cluster(root=root, ports=Ports(int(os.environ.get("FINETUNE_TEST_PORT_BASE", "17400"))))
    try:
        private.up()
        yield ClusterHandle(private)
    finally:
        private.down()
        shutil.rmtree(root, ignore_errors=True)


def _make_namespace(handle: ClusterHandle, pod_security: str) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    handle.kubectl("create", "namespace", name)
    handle.kubectl("label", "namespace", name, f"pod-security.kubernetes.io/enforce={pod_security}")
    wait_for(
        lambda: handle.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        timeout=60,
        what=f"the default ServiceAccount in namespace {name}",
    )
    yield name
    handle.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(cluster: ClusterHandle) -> Iterator[str]:
    """A fresh namespace enforcing Pod Security "restricted", deleted afterwards."""
    yield from _make_namespace(cluster, "restricted")


@pytest.fixture
def privileged_namespace(cluster: ClusterHandle) -> Iterator[str]:
    """A fresh namespace without Pod Security restrictions (for hostPath test fixtures)."""
    yield from _make_namespace(cluster, "privileged")
