"""Integration tier: tests against the real local control plane.

Boundary: real etcd, kube-apiserver (RBAC on), kube-controller-manager (Job controller, garbage
collector, TTL controller), kube-scheduler, the process node running pods as local processes,
and the versitygw S3 server — all started once per session by the ``cluster`` fixture in
tests/conftest.py. Nothing here is mocked. Every test works in its own namespace. A test that
needs the cluster is marked ``cluster`` (tests/conftest.py refuses to collect one that is not).

Fixtures for the operator's tests (their helpers are in operator_env.py):

- `crd` (session): the generated CRD applied to the real API server, Established.
- `operator_kubeconfig` (session): a ServiceAccount `finetune-operator-tests/finetune-operator-test`
  bound to exactly the ClusterRole of `finetune_operator.rbac` (what the Helm chart ships), and
  a kubeconfig holding its token — the operator never runs as cluster admin here.
- `operator` (module): the operator running in-process under `kopf.testing.KopfRunner` with that
  identity, the stand-in trainer (standin_trainer.py) as the trainer command, file:// run
  folders, and a 1 s progress poll.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_operator import crdgen, rbac
from tests.integration.kueue_env import Kueue, running_kueue
from tests.integration.operator_env import (
    SERVICE_ACCOUNT,
    OperatorProcess,
    assert_no_other_operator,
    identity_kubeconfig,
    running_operator,
)
from tests.kube import ClusterHandle, wait_for


@pytest.fixture(scope="session")
def crd(cluster: ClusterHandle) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crdgen.CRD_PATH))
    # Right after the apply the CRD may have no status.conditions yet, which `kubectl wait` reports
    # as an error rather than waiting: wait until it answers, then until Established.
    wait_for(
        lambda: cluster.kubectl(
            "wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=10s", check=False
        ).returncode
        == 0,
        timeout=60, what="the FineTuneJob CRD Established",
    )  # fmt: skip


@pytest.fixture(scope="session")
def operator_dir() -> Iterator[Path]:
    # Not under /tmp: trainer pods mount a volume of their own at /tmp (their root filesystem is
    # read-only), which would hide a file:// run folder there from the stand-in trainer.
    with tempfile.TemporaryDirectory(prefix="finetune-operator-test-", dir="/var/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: ClusterHandle, crd: None, operator_dir: Path) -> Path:
    return identity_kubeconfig(cluster, SERVICE_ACCOUNT, rbac.cluster_role(), operator_dir)


@pytest.fixture(scope="module")
def operator(
    cluster: ClusterHandle, operator_kubeconfig: Path, operator_dir: Path
) -> Iterator[OperatorProcess]:
    assert_no_other_operator(cluster)
    runs = operator_dir / "runs"
    runs.mkdir(exist_ok=True)
    with running_operator(operator_kubeconfig, runs) as process:
        yield process


@pytest.fixture(scope="module")
def kueue(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """Kueue's real controller manager on the cluster (kueue_env.py), for test_kueue.py."""
    with running_kueue(cluster, tmp_path_factory.mktemp("kueue")) as kept:
        yield kept
