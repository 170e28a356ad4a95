"""Readers of a FineTuneJob's pods (pure): which are live, how and when their trainer
containers ended, rank 0's termination summary, and why the job's pods failed — including,
for a multi-node job, the first failure seen in the current attempt (`attempt_failure`, kept in
`status.lastFailure` so a later cycle still names it).

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from finetune_operator import gang
from finetune_operator.api import FailureRecord, FineTuneJob, rfc3339
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
    """Why the job's pods failed, as far as this one look at them tells: of a multi-node job,
    the pod that failed first (its peers' failures — "connection closed by peer", or SIGTERM
    from the Job controller — follow from it); of a single pod, the newest failure. A
    multi-node job's rank whose pod object is gone (deleted or evicted, and removed once the Job
    controller counted it) is named by its rank. While every pod is still terminating, nothing
    tells the deleted one from the peers the Job controller stops: the cause is then unknown
    (""). What an earlier cycle saw is `attempt_failure`'s; `restart_cause` combines both."""
    record = _failure_now(job, pods)
    return record.message if record is not None else ""


def _failure_now(job: FineTuneJob, pods: Sequence[Mapping[str, Any]]) -> FailureRecord | None:
    gang_job = gang.is_gang(job)
    record = _pod_failure(pods, first=gang_job, with_rank=gang_job)
    if record is not None or not gang_job or not pods:
        return record
    present = {_rank(pod) for pod in pods}
    gone = [rank for rank in range(job.spec.resources.nodes) if rank not in present]
    if not gone:
        return None
    ranks = ", ".join(str(rank) for rank in gone)
    return FailureRecord(
        attempt=gang.restarts_so_far(job),
        rank=gone[0] if len(gone) == 1 else None,
        reason="PodGone",
        message=f"the pod of rank {ranks} is gone (deleted, evicted or lost with its node)",
    )


def attempt_failure(
    job: FineTuneJob, batch_job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> FailureRecord | None:
    """`status.lastFailure` after this cycle: the first failure seen in the current attempt of a
    multi-node job, recorded the first time a cycle sees it and kept, so that a later cycle —
    when the Job controller has removed the deleted pod, or stopped every other pod alike —
    still names it. Of what is seen now, only a pod's own failure counts (`_own_failures`);
    an earlier one replaces the record of the same attempt. Without a new one, the record of
    an earlier attempt stays (the cause of the newest restart)."""
    raw = job.status.get("lastFailure")
    recorded = FailureRecord.model_validate(raw) if isinstance(raw, Mapping) else None
    if not gang.is_gang(job) or batch_job is None:
        return recorded
    attempt = gang.attempt_of(batch_job)
    seen = _own_failures(job, batch_job, pods, attempt)
    if not seen:
        return recorded
    first = min(seen, key=lambda record: (record.time or "", record.rank or 0))
    if recorded is None or recorded.attempt < attempt:
        return first
    if recorded.attempt == attempt and (first.time or "") < (recorded.time or ""):
        return first
    return recorded


def restart_cause(
    job: FineTuneJob, batch_job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> FailureRecord | None:
    """The cause of the current attempt's failure: what a cycle recorded (`attempt_failure`),
    else what this cycle's look at the pods tells (`failure_cause`)."""
    record = attempt_failure(job, batch_job, pods)
    attempt = gang.attempt_of(batch_job) if batch_job is not None else gang.restarts_so_far(job)
    if record is not None and record.attempt == attempt:
        return record
    now = _failure_now(job, pods)
    return now.model_copy(update={"attempt": attempt}) if now is not None else None


def cause_message(
    job: FineTuneJob, batch_job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> str:
    """The failure's cause as the status message and the PodFailed event say it ("" unknown)."""
    if not gang.is_gang(job):
        return failure_cause(job, pods)
    record = restart_cause(job, batch_job, pods)
    return record.message if record is not None else ""


def _own_failures(
    job: FineTuneJob, batch_job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], attempt: int
) -> list[FailureRecord]:
    """The pods of the attempt that failed for a reason of their own: a trainer failure that is
    not a symptom (`_failure_order`), a disruption (the DisruptionTarget condition an eviction
    or preemption sets), or a deletion while every other pod is still healthy — once one pod
    has failed, the Job controller deletes the others, and those deletions are symptoms.
    Nothing counts while the Job or the FineTuneJob is being stopped on purpose."""
    meta = batch_job.get("metadata") or {}
    if (
        meta.get("deletionTimestamp")
        or (batch_job.get("spec") or {}).get("suspend")
        or job.spec.suspend
        or job.spec.cancel
    ):
        return []
    found = []
    for pod, state in sorted_terminated(pods):
        if state.get("exitCode") and not _failure_order((pod, state))[0]:
            record = _describe(pod, state, with_rank=True)
            found.append(record.model_copy(update={"attempt": attempt}))
    healthy = {
        _rank(pod)
        for pod in pods
        if not (pod.get("metadata") or {}).get("deletionTimestamp")
        and (pod.get("status") or {}).get("phase") in ("Pending", "Running")
    }
    for pod in pods:
        pod_meta = pod.get("metadata") or {}
        name = str(pod_meta.get("name") or "?")
        rank = _rank(pod)
        disruption = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            ),
            None,
        )
        if disruption is not None:
            reason = str(disruption.get("reason") or "DisruptionTarget")
            detail = f": {disruption['message']}" if disruption.get("message") else ""
            found.append(
                FailureRecord(
                    attempt=attempt,
                    rank=rank,
                    pod=name,
                    reason=reason,
                    message=f"pod {name} (rank {rank}) was disrupted ({reason}){detail}",
                    time=_millis(str(disruption.get("lastTransitionTime") or "")),
                )
            )
            continue
        others = set(range(job.spec.resources.nodes)) - {rank}
        if pod_meta.get("deletionTimestamp") and others <= healthy:
            found.append(
                FailureRecord(
                    attempt=attempt,
                    rank=rank,
                    pod=name,
                    reason="Deleted",
                    message=f"pod {name} (rank {rank}) was deleted",
                    time=_deletion_requested(pod_meta),
                )
            )
    return found


def _rank(pod: Mapping[str, Any]) -> int | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    return int(value) if value is not None and str(value).isdigit() else None


def _millis(when: str) -> str:
    """An RFC 3339 time with milliseconds, so whole seconds sort with the trainer's failedAt."""
    return when.replace("Z", ".000Z") if when and "." not in when else when


def _deletion_requested(meta: Mapping[str, Any]) -> str:
    """When the pod's deletion was asked for: deletionTimestamp less the grace period."""
    stamp = datetime.fromisoformat(str(meta["deletionTimestamp"]).replace("Z", "+00:00"))
    asked = stamp - timedelta(seconds=int(meta.get("deletionGracePeriodSeconds") or 0))
    return _millis(rfc3339(asked))


def _failure_order(item: tuple[Mapping[str, Any], Mapping[str, Any]]) -> tuple[bool, str]:
    """Sort key of a failed pod: symptoms last — stopped by a signal (SIGTERM/SIGKILL, the Job
    controller ending the attempt) or a collective that lost its peer (reason PeerLost); then
    the trainer's own failure time (milliseconds), else the container's finishedAt."""
    _, state = item
    summary = parse_summary(str(state.get("message") or "").strip()) or {}
    when = _millis(str(summary.get("failedAt") or state.get("finishedAt") or ""))
    symptom = (
        int(state.get("exitCode") or 0) in (contract.EXIT_TERMINATED, 137)
        or summary.get("reason") == TrainerReason.PEER_LOST
    )
    return symptom, when


def _describe(pod: Mapping[str, Any], state: Mapping[str, Any], *, with_rank: bool) -> FailureRecord:
    """'pod x-0 (rank 0): exit code 3 (InvalidConfig): <trainer message>' (the rank of a
    multi-node job's pod only)."""
    name = str((pod.get("metadata") or {}).get("name", "?"))
    rank = _rank(pod)
    text = str(state.get("message") or "").strip()
    reason = str(state.get("reason") or "Error")
    summary = parse_summary(text)
    if summary is not None:
        reason = str(summary.get("reason") or reason)
        text = str(summary.get("message") or "")
    detail = f": {text}" if text else ""
    who = f"pod {name} (rank {rank})" if with_rank and rank is not None else f"pod {name}"
    return FailureRecord(
        attempt=0,
        rank=rank,
        pod=name,
        reason=reason,
        message=f"{who}: exit code {state.get('exitCode')} ({reason}){detail}",
        time=_failure_order((pod, state))[1] or None,
    )


def _pod_failure(
    pods: Sequence[Mapping[str, Any]], *, first: bool = False, with_rank: bool = False
) -> FailureRecord | None:
    """The newest failed pod (with `first`: the one that failed first)."""
    failed = [(pod, state) for pod, state in sorted_terminated(pods) if state.get("exitCode")]
    if first:
        failed = sorted(failed, key=_failure_order, reverse=True)
    if failed:
        pod, state = failed[-1]
        return _describe(pod, state, with_rank=with_rank)
    for pod in pods:
        pod_status = pod.get("status") or {}
        if pod_status.get("phase") == "Failed":
            name = (pod.get("metadata") or {}).get("name", "?")
            reason = str(pod_status.get("reason") or "Failed")
            return FailureRecord(
                attempt=0,
                rank=_rank(pod),
                pod=str(name),
                reason=reason,
                message=f"pod {name}: {reason}: {pod_status.get('message') or ''}".rstrip(": "),
            )
    return None


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
