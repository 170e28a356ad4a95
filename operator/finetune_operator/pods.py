"""Readers of a FineTuneJob's pods (pure): which are live, how and when their trainer
containers ended, rank 0's termination summary, and why the job's pods failed.

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator import gang
from finetune_operator.api import FineTuneJob
from finetune_operator.builders import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME
from finetune_trainer import contract
from finetune_trainer.errors import Reason as TrainerReason


def live_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [pod for pod in pods if (pod.get("status") or {}).get("phase") in ("Pending", "Running", None)]


def first_pod_start(pods: Sequence[Mapping[str, Any]]) -> str | None:
    times = [str(t) for pod in pods if (t := (pod.get("status") or {}).get("startTime"))]
    return min(times) if times else None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            state: Mapping[str, Any] | None = (cs.get("state") or {}).get("terminated")
            if state:
                return state
    return None


def sorted_terminated(
    pods: Sequence[Mapping[str, Any]],
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    found = [(pod, state) for pod in pods if (state := _terminated(pod)) is not None]
    return sorted(found, key=lambda item: str(item[1].get("finishedAt") or ""))


def last_exit(pods: Sequence[Mapping[str, Any]]) -> tuple[int, Mapping[str, Any]] | None:
    found = sorted_terminated(pods)
    if not found:
        return None
    pod, state = found[-1]
    return int(state.get("exitCode", 0)), pod


def oom_killed(pods: Sequence[Mapping[str, Any]]) -> bool:
    """A trainer container was killed for memory: its terminated reason is OOMKilled (the
    runtime's word for the cgroup's OOM killer). Exit code 137 alone is not enough: a kill after
    the grace period, an eviction and a container the kubelet lost (ContainerStatusUnknown)
    exit 137 too, and are retried."""
    return any(state.get("reason") == "OOMKilled" for _, state in sorted_terminated(pods))


def failure_cause(job: FineTuneJob, pods: Sequence[Mapping[str, Any]]) -> str:
    """Why the job's pods failed: of a multi-node job, the pod that failed first (its peers'
    failures — "connection closed by peer", or SIGTERM from the Job controller — follow from
    it); of a single pod, the newest failure. A multi-node job's rank whose pod object is gone
    (deleted or evicted, and removed once the Job controller counted it) is named by its rank.
    While every pod is still terminating, nothing tells the deleted one from the peers the Job
    controller stops: the cause is then unknown ("")."""
    message = _pod_failure_message(pods, first=gang.is_gang(job))
    if message or not gang.is_gang(job) or not pods:
        return message
    present = {
        str(((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION))
        for pod in pods
    }
    gone = [rank for rank in range(job.spec.resources.nodes) if str(rank) not in present]
    if not gone:
        return ""
    ranks = ", ".join(str(rank) for rank in gone)
    return f"the pod of rank {ranks} is gone (deleted, evicted or lost with its node)"


def _failure_order(item: tuple[Mapping[str, Any], Mapping[str, Any]]) -> tuple[bool, str]:
    """Sort key of a failed pod: symptoms last — stopped by a signal (SIGTERM/SIGKILL, the Job
    controller ending the attempt) or a collective that lost its peer (reason PeerLost); then
    the trainer's own failure time (milliseconds), else the container's finishedAt."""
    _, state = item
    summary = parse_summary(str(state.get("message") or "").strip()) or {}
    when = str(summary.get("failedAt") or state.get("finishedAt") or "")
    when = when.replace("Z", ".000Z") if "." not in when else when  # seconds sort with milliseconds
    symptom = (
        int(state.get("exitCode") or 0) in (contract.EXIT_TERMINATED, 137)
        or summary.get("reason") == TrainerReason.PEER_LOST
    )
    return symptom, when


def _pod_failure_message(pods: Sequence[Mapping[str, Any]], *, first: bool = False) -> str:
    """'pod x-0: exit code 3 (InvalidConfig): <trainer message>' for the newest failed pod (with
    `first`: the one that failed first)."""
    failed = [(pod, state) for pod, state in sorted_terminated(pods) if state.get("exitCode")]
    if first:
        failed = sorted(failed, key=_failure_order, reverse=True)
    if failed:
        pod, state = failed[-1]
        name = (pod.get("metadata") or {}).get("name", "?")
        text = str(state.get("message") or "").strip()
        reason = str(state.get("reason") or "Error")
        summary = parse_summary(text)
        if summary is not None:
            reason = str(summary.get("reason") or reason)
            text = str(summary.get("message") or "")
        detail = f": {text}" if text else ""
        return f"pod {name}: exit code {state.get('exitCode')} ({reason}){detail}"
    for pod in pods:
        pod_status = pod.get("status") or {}
        if pod_status.get("phase") == "Failed":
            name = (pod.get("metadata") or {}).get("name", "?")
            return f"pod {name}: {pod_status.get('reason') or 'Failed'}: {pod_status.get('message') or ''}".rstrip(
                ": "
            )
    return ""


def parse_summary(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "exitCode" in data else None


def _is_rank0(pod: Mapping[str, Any]) -> bool:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) in (
        None,
        "0",
    )


def rank0_live(pods: Sequence[Mapping[str, Any]]) -> bool:
    """A rank-0 pod that has not ended: a newer attempt than any terminated one."""
    return any(_is_rank0(pod) for pod in live_pods(pods))


def termination_summary(pods: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's final summary (the newest one, if it was restarted)."""
    summaries = []
    for pod, state in sorted_terminated(pods):
        if not _is_rank0(pod):
            continue
        summary = parse_summary(str(state.get("message") or ""))
        if summary is not None:
            summaries.append(summary)
    return summaries[-1] if summaries else None
