"""Why a pod is not ready, read from its status (pure): the demo never waits in silence.

``finetune_dev.demo`` waits on the operator's pod after installing the chart and on the training
pods while it follows the job. Each poll it asks `readiness(pod)`: ready, still on its way (and
what it waits for), or blocked — it cannot become ready unless someone changes something, so the
wait ends at once with the pod's own reason. Nothing here talks to the API server.

Blocked means: a container crashed `CRASHES_BEFORE_BLOCKED` times (a single crash may be a
transient start-up failure; the kubelet retries it), or exited non-zero in a pod that does not
restart it, or its image cannot be pulled (nothing here serves images), or the scheduler found
no node for the pod. Everything else (creating containers, a missing ConfigMap or Secret the
kubelet keeps retrying) is waiting: the caller's deadline decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CRASHES_BEFORE_BLOCKED = 2
IMAGE_PROBLEMS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})


@dataclass(frozen=True)
class Readiness:
    ready: bool
    blocked: bool
    reason: str  # what the pod waits for, or why it is blocked; "" when ready
    container: str | None = None  # the container whose logs say more
    previous: bool = False  # its logs are those of the previous (crashed) run


def _terminated(state: Mapping[str, Any] | None) -> str:
    """`exit code N (Reason): message` of a terminated state, "" if none."""
    if not state or "terminated" not in state:
        return ""
    done = state["terminated"]
    text = f"exit code {done.get('exitCode')}"
    if done.get("reason"):
        text += f" ({done['reason']})"
    message = (done.get("message") or "").strip()
    return f"{text}: {message}" if message else text


def readiness(pod: Mapping[str, Any]) -> Readiness:
    """Ready, waiting (with what for) or blocked (with why) — see the module docstring."""
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    if (conditions.get("Ready") or {}).get("status") == "True":
        return Readiness(ready=True, blocked=False, reason="")
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return Readiness(ready=False, blocked=True, reason=f"unschedulable: {scheduled.get('message', '')}")
    restarts = (pod.get("spec") or {}).get("restartPolicy", "Always") != "Never"
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    for container in statuses:
        name = container.get("name")
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        last = _terminated(container.get("lastState"))
        if (
            waiting.get("reason") == "CrashLoopBackOff"
            and container.get("restartCount", 0) >= CRASHES_BEFORE_BLOCKED
        ):
            return Readiness(
                ready=False,
                blocked=True,
                reason=f"container {name} keeps crashing ({container['restartCount']} restarts); last {last}",
                container=name,
                previous=True,
            )
        if waiting.get("reason") in IMAGE_PROBLEMS:
            message = waiting.get("message") or "the image cannot be pulled"
            return Readiness(
                ready=False, blocked=True, reason=f"container {name}: {waiting['reason']}: {message}"
            )
        done = _terminated(state)
        if done and not restarts and state["terminated"].get("exitCode") != 0:
            return Readiness(
                ready=False, blocked=True, reason=f"container {name} failed: {done}", container=name
            )
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return Readiness(
                ready=False,
                blocked=False,
                reason=f"container {container.get('name')}: {waiting['reason']}{detail}",
                container=container.get("name") if container.get("restartCount") else None,
                previous=bool(container.get("restartCount")),
            )
    if status.get("message"):
        return Readiness(
            ready=False, blocked=False, reason=f"{status.get('reason', '')}: {status['message']}"
        )
    return Readiness(ready=False, blocked=False, reason=f"phase {status.get('phase', 'Pending')}")
