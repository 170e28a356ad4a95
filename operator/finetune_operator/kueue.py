"""Kueue: what a queued Job's Workload says, and what the operator may change on it (pure).

With `spec.resources.queueName` the operator creates the batch Job suspended and labelled
`kueue.x-k8s.io/queue-name`; from then on Kueue owns the Job's `spec.suspend`. Kueue creates a
Workload for the Job, unsuspends the Job when the Workload is admitted (quota reserved in a
ClusterQueue), and suspends it again when the Workload is evicted (preempted for a workload of
higher priority, deactivated, its queue stopped). The operator therefore never writes the
suspend flag of such a Job. A user's `spec.suspend` or `spec.cancel` deactivates the Workload
instead (`spec.active: false`, what `kueuectl stop workload` does), which makes Kueue suspend
the Job and release its quota; lifting `spec.suspend` re-activates only a Workload the operator
deactivated itself (marked by `DEACTIVATED_BY_ANNOTATION`), never one an administrator stopped.

`queue_state` turns a Workload into the state, reason and message the FineTuneJob's status
shows; `workload_patch` is the one change the operator makes. Called by `reconcile` (patches)
and `status` (the queue state); no API calls here, no kopf, no Kubernetes client.
docs/kueue.md describes the behaviour for users.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import FineTuneJob

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
# Set by Kueue on each Workload: the uid of the Job it stands for.
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
# On a Workload the operator deactivated: which FineTuneJob field asked for it.
DEACTIVATED_BY_ANNOTATION = "finetune.dev/deactivated-by"


class QueueState(enum.StrEnum):
    NO_WORKLOAD = "NoWorkload"  # Kueue has not (yet) created one: not running, or just created
    QUEUED = "Queued"  # waiting for quota
    ADMITTED = "Admitted"  # quota reserved: Kueue starts (or has started) the Job
    PREEMPTED = "Preempted"  # evicted for a higher-priority workload; requeued
    EVICTED = "Evicted"  # evicted for another reason (queue stopped, pods not ready, ...)
    INACTIVE = "Inactive"  # spec.active is false


@dataclass(frozen=True)
class Queue:
    """A Workload as the status shows it: Kueue's own reason and message, unchanged."""

    state: QueueState
    reason: str
    message: str
    cluster_queue: str | None = None


def managed(job: FineTuneJob) -> bool:
    """Whether Kueue owns this job's batch Job (it carries a queue name)."""
    return bool(job.spec.resources.queue_name)


def _condition(workload: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _true(cond: Mapping[str, Any] | None) -> bool:
    return cond is not None and cond.get("status") == "True"


def active(workload: Mapping[str, Any]) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def queue_state(workload: Mapping[str, Any] | None) -> Queue:
    """The Workload's admission state with Kueue's reason and message (see QueueState)."""
    if workload is None:
        return Queue(
            QueueState.NO_WORKLOAD,
            "NoWorkload",
            "Kueue has not created a Workload for the Job yet (is Kueue running, and does the "
            "LocalQueue exist?)",
        )
    admission = (workload.get("status") or {}).get("admission") or {}
    cluster_queue = admission.get("clusterQueue")
    if not active(workload):
        evicted = _condition(workload, "Evicted")
        message = str((evicted or {}).get("message") or "the Workload is deactivated (spec.active: false)")
        return Queue(QueueState.INACTIVE, "Deactivated", message, cluster_queue)
    evicted = _condition(workload, "Evicted")
    if _true(evicted):
        assert evicted is not None
        reason = str(evicted.get("reason") or "Evicted")
        preempted = _condition(workload, "Preempted")
        if reason == "Preempted" and preempted is not None:
            message = str(preempted.get("message") or evicted.get("message") or "")
        else:
            message = str(evicted.get("message") or "")
        state = QueueState.PREEMPTED if reason == "Preempted" else QueueState.EVICTED
        return Queue(state, reason, message, cluster_queue)
    admitted = _condition(workload, "Admitted")
    if _true(admitted):
        assert admitted is not None
        reason = str(admitted.get("reason") or "Admitted")
        return Queue(QueueState.ADMITTED, reason, str(admitted.get("message") or ""), cluster_queue)
    reserved = _condition(workload, "QuotaReserved")
    requeued = _condition(workload, "Requeued")
    if requeued is not None and requeued.get("reason") == "Preempted":
        # Evicted and requeued: waiting for quota again after a preemption.
        waiting = str((reserved or {}).get("message") or "")
        return Queue(QueueState.PREEMPTED, "Preempted", _join(str(requeued.get("message") or ""), waiting))
    if reserved is not None:
        return Queue(
            QueueState.QUEUED, str(reserved.get("reason") or "Pending"), str(reserved.get("message") or "")
        )
    return Queue(QueueState.QUEUED, "Pending", "waiting for Kueue to consider the Workload")


def _join(first: str, second: str) -> str:
    return "; ".join(part for part in (first, second) if part)


def deactivate_patch(why: str) -> dict[str, Any]:
    """Deactivate a Workload (Kueue stops its Job's pods and keeps it suspended); `why` is
    recorded in our annotation."""
    return {"metadata": {"annotations": {DEACTIVATED_BY_ANNOTATION: why}}, "spec": {"active": False}}


def workload_patch(job: FineTuneJob, workload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch for the Workload, or None: deactivate it while the FineTuneJob is
    suspended or cancelled; re-activate it when spec.suspend is lifted, if we deactivated it."""
    stop = "spec.cancel" if job.spec.cancel else "spec.suspend" if job.spec.suspend else None
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    ours = annotations.get(DEACTIVATED_BY_ANNOTATION)
    if stop is not None and active(workload):
        return deactivate_patch(stop)
    if stop is None and ours is not None:
        return {"metadata": {"annotations": {DEACTIVATED_BY_ANNOTATION: None}}, "spec": {"active": True}}
    return None
