"""Gang restarts of multi-node jobs (pure): one failed or deleted pod restarts all pods.

A job of several pods is one unit: its ranks meet in collectives, so one dead rank leaves the
others failing (gloo) or blocked until the collective timeout (NCCL). The batch Job of such a
job is one *attempt*: `backoffLimit: 0`, so the first retryable pod failure — a crash, a killed
process, a deleted, evicted or preempted pod — fails the Job, and the Job controller stops the
remaining pods at once. The operator then restarts the gang, as JobSet does with its child
Jobs: it deletes the failed Job (foreground: its pods go first) and creates it again; every
pod resumes from the newest complete checkpoint. `runPolicy.backoffLimit` bounds the restarts.

Each Job carries its attempt number (`ATTEMPT_LABEL`, = `status.restarts` when it was created),
so the cycle stays level-based: a restart is counted once, in the status write that decides
it; a Job of an older attempt (the cycle stopped between the write and the delete) is deleted
without counting again. Invalid input (exit 3, the Job's podFailurePolicy) and
`activeDeadlineSeconds` end the job as before; single-pod jobs keep the Job's own retries.

Called by `status.derive_status` and `phase` (phase, reason, restarts) and `reconcile` (the delete). Must
not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import FineTuneJob

ATTEMPT_LABEL = "finetune.dev/attempt"


class Action(enum.StrEnum):
    NONE = "None"
    RESTART = "Restart"  # count a restart, then delete the failed attempt's Job
    DELETE_STALE = "DeleteStale"  # a Job of an attempt already counted: delete it
    WAIT = "Wait"  # the old Job is being deleted; the next cycle creates the new one


@dataclass(frozen=True)
class Decision:
    action: Action
    restarts: int  # status.restarts after this cycle
    message: str = ""


def is_gang(job: FineTuneJob) -> bool:
    return job.spec.resources.nodes > 1


def restarts_so_far(job: FineTuneJob) -> int:
    return int(job.status.get("restarts") or 0) if is_gang(job) else 0


def attempt_of(batch_job: Mapping[str, Any]) -> int:
    value = ((batch_job.get("metadata") or {}).get("labels") or {}).get(ATTEMPT_LABEL)
    return int(value) if value is not None and str(value).isdigit() else 0


def _failed_retryably(batch_job: Mapping[str, Any]) -> bool:
    """The Job failed (or is failing) because a pod failed — not invalid input or a deadline."""
    for cond in (batch_job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
            return bool(cond.get("reason") == "BackoffLimitExceeded")
    return False


def decide(
    job: FineTuneJob,
    batch_job: Mapping[str, Any] | None,
    cause: str,
) -> Decision:
    """What to do about this job's current batch Job. `cause`: the first failed pod's message
    (`pods.failure_cause`), for the status and the event."""
    restarts = restarts_so_far(job)
    if not is_gang(job) or batch_job is None or job.spec.cancel:
        return Decision(Action.NONE, restarts)
    previous = str(job.status.get("message") or "")
    if (batch_job.get("metadata") or {}).get("deletionTimestamp"):
        return Decision(Action.WAIT, restarts, previous or "restarting: waiting for the old pods to stop")
    if attempt_of(batch_job) < restarts:
        return Decision(Action.DELETE_STALE, restarts, previous or "restarting all pods")
    if job.spec.suspend or not _failed_retryably(batch_job):
        return Decision(Action.NONE, restarts)
    limit = job.spec.run_policy.backoff_limit
    if restarts >= limit:
        return Decision(Action.NONE, restarts)
    nodes = job.spec.resources.nodes
    why = cause or "a pod failed"
    return Decision(
        Action.RESTART,
        restarts + 1,
        f"restarting all {nodes} pods from the newest checkpoint (restart {restarts + 1} of "
        f"runPolicy.backoffLimit {limit}) after {why}",
    )


def restarting(job: FineTuneJob, pods: Sequence[Mapping[str, Any]]) -> bool:
    """True while a restarted gang's pods are not all running yet (the previous cycle said
    Restarting): the phase stays Running, reason Restarting, instead of going back to Pending."""
    running = sum(1 for pod in pods if (pod.get("status") or {}).get("phase") == "Running")
    return is_gang(job) and job.status.get("reason") == "Restarting" and running < job.spec.resources.nodes
