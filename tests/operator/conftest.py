"""Operator-logic tier: `finetune_operator.reconcile` and the `controller` against an in-memory
fake of our own Kubernetes wrapper (`k8s.Cluster`) and a fake progress source.

Boundary: kopf is never run (test_controller imports it), no API server, no network, no
processes. What the Job controller, the garbage collector or kubelet would do is done by the
test, explicitly, on the fake's objects. The real client (`k8s.KubeCluster`) and kopf itself
are covered by tests/integration.
"""

from __future__ import annotations

import pytest

from tests.operator.fake import FakeCluster


@pytest.fixture
def fake() -> FakeCluster:
    return FakeCluster()
