"""`make demo` never waits in silence: a pod it waits on that cannot become ready ends the wait
with the pod's own reason, on the real cluster and its process node.

The first case is the newcomer's: a container whose program lives under a path that a volume of
the pod hides (a checkout under /tmp, hidden by the pod's /tmp emptyDir) crash-loops; the demo
stops with the process node's explanation from the container's log instead of waiting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import demo
from tests.kube import RESTRICTED_CONTAINER_SECURITY, ClusterHandle, apply

pytestmark = pytest.mark.cluster


def deployment(name: str, container: dict[str, Any], **pod_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {"image": "local", "securityContext": RESTRICTED_CONTAINER_SECURITY, **container}
                    ],
                    **pod_spec,
                },
            },
        },
    }


def test_a_crash_looping_pod_ends_the_wait_with_its_own_reason(
    cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    checkout_bin = tmp_path / "checkout" / ".venv" / "bin"  # tmp_path is under /tmp
    checkout_bin.mkdir(parents=True)
    program = checkout_bin / "fake-operator"
    program.write_text("#!/bin/sh\necho started\n")
    program.chmod(0o755)
    apply(
        cluster,
        namespace,
        deployment(
            "hidden",
            {
                "name": "operator",
                "command": ["fake-operator"],
                "env": [
                    {"name": "PATH", "value": f"{checkout_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
                ],
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            },
            volumes=[{"name": "tmp", "emptyDir": {}}],
        ),
    )

    with pytest.raises(SystemExit) as info:
        # A deadline far beyond the crash loop: the wait must end because the pod is blocked.
        demo.wait_deployment_ready(
            cluster.cluster, namespace, "app=hidden", "the operator's pod", timeout=600
        )

    message = str(info.value.code)
    assert message.startswith(f"demo: the operator's pod {namespace}/hidden-"), message
    assert "container operator keeps crashing" in message and "exit code 127" in message, message
    assert f"the volume mounted at /tmp hides {checkout_bin}" in message, "the container's own words"
    assert "kubectl describe pod hidden-" in message


def test_a_pod_that_stays_unready_ends_the_wait_with_what_it_waits_for(
    cluster: ClusterHandle, namespace: str
) -> None:
    secret_env = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "not-there", "key": "token"}}}
    apply(
        cluster,
        namespace,
        deployment("waiting", {"name": "operator", "command": ["sleep", "600"], "env": [secret_env]}),
    )

    with pytest.raises(SystemExit) as info:
        demo.wait_deployment_ready(
            cluster.cluster, namespace, "app=waiting", "the operator's pod", timeout=10
        )

    message = str(info.value.code)
    assert "not ready after" in message, message
    assert "CreateContainerConfigError" in message and "not-there" in message, message


def test_a_ready_deployment_ends_the_wait_at_once(cluster: ClusterHandle, namespace: str) -> None:
    apply(cluster, namespace, deployment("fine", {"name": "operator", "command": ["sleep", "600"]}))

    demo.wait_deployment_ready(cluster.cluster, namespace, "app=fine", "the operator's pod", timeout=120)
