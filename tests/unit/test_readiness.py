"""`finetune_dev.readiness`: what the demo says about a pod it waits on, from the pod's status."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_dev.readiness import readiness


def pod(
    *containers: dict[str, Any], ready: bool = False, restart: str = "Always", **status: Any
) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": str(ready)}, *status.pop("conditions", [])]
    return {
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": {"restartPolicy": restart},
        "status": {
            "phase": "Pending",
            "conditions": conditions,
            "containerStatuses": list(containers),
            **status,
        },
    }


def waiting(
    reason: str, message: str = "", restarts: int = 0, last: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": "operator",
        "restartCount": restarts,
        "state": {"waiting": {"reason": reason, **({"message": message} if message else {})}},
        "lastState": {"terminated": last} if last else {},
    }


EXEC_FAILED = {
    "exitCode": 127,
    "reason": "Error",
    "message": "process node: the volume mounted at /tmp hides /tmp/x/.venv/bin",
}


@pytest.mark.parametrize(
    ("obj", "ready", "blocked", "fragment"),
    [
        pytest.param(pod(ready=True), True, False, "", id="ready"),
        pytest.param(pod(waiting("ContainerCreating")), False, False, "ContainerCreating", id="creating"),
        pytest.param(
            pod(waiting("CrashLoopBackOff", restarts=1, last=EXEC_FAILED)),
            False,
            False,
            "CrashLoopBackOff",
            id="crashed-once-may-recover",
        ),
        pytest.param(
            pod(waiting("CrashLoopBackOff", "back-off 4s", restarts=2, last=EXEC_FAILED)),
            False,
            True,
            "keeps crashing (2 restarts); last exit code 127 (Error): process node: the volume mounted at /tmp",
            id="keeps-crashing",
        ),
        pytest.param(
            pod(waiting("ImagePullBackOff", "pull access denied")),
            False,
            True,
            "ImagePullBackOff: pull access denied",
            id="image-cannot-be-pulled",
        ),
        pytest.param(
            pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes: Insufficient cpu",
                    }
                ]
            ),
            False,
            True,
            "unschedulable: 0/1 nodes: Insufficient cpu",
            id="unschedulable",
        ),
        pytest.param(
            pod(
                {
                    "name": "trainer",
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 3, "message": "bad data"}},
                },
                restart="Never",
            ),
            False,
            True,
            "container trainer failed: exit code 3: bad data",
            id="failed-without-restart",
        ),
        pytest.param(
            pod(waiting("CreateContainerConfigError", 'secret "finetune-s3" not found')),
            False,
            False,
            'CreateContainerConfigError: secret "finetune-s3" not found',
            id="missing-secret-is-retried",
        ),
    ],
)
def test_readiness_says_why_a_pod_is_not_ready(
    obj: dict[str, Any], ready: bool, blocked: bool, fragment: str
) -> None:
    state = readiness(obj)

    assert (state.ready, state.blocked) == (ready, blocked)
    assert fragment in state.reason


def test_a_crashed_container_points_at_its_previous_log() -> None:
    state = readiness(pod(waiting("CrashLoopBackOff", restarts=3, last=EXEC_FAILED)))

    assert (state.container, state.previous) == ("operator", True)
