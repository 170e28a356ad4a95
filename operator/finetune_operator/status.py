"""FineTuneJob status from what was observed (pure): the Job, its pods, the trainer's progress.

`derive_status(job, observed, progress, now)` returns the complete new `status` as a dict.
Level-based: the same observation gives the same status (times are carried over from the
previous status unless something changed), so `reconcile` writes only when the result differs.

Phases: Pending → Running → Succeeded | Failed, with Suspended (spec.suspend) and Cancelled
(spec.cancel). A job queued with Kueue is Pending with reason Queued (or Preempted) while Kueue
holds its Job suspended, the message quoting Kueue's reason and message (`kueue.queue_state`). A job in mode Evaluate has the same phases (Running with reason Evaluating); its
progress is step 0 of 0 steps, printed as `eval`, and its result is the step-0 evaluation.
Terminal phases are sticky: a finished Job deleted by its TTL leaves the status as it was.
Conditions follow kstatus (Ready normal-true; Reconciling and Stalled abnormal-true), each with
observedGeneration, so Argo CD and Flux report health:

| phase     | Ready | Reconciling | Stalled |
|-----------|-------|-------------|---------|
| Pending   | False | True        | False (True when stuck on something outside the spec) |
| Running   | False | True        | False   |
| Suspended | (none) | False (True while pods still save a checkpoint: reason Suspending) | False |
| Succeeded | True  | False       | False   |
| Failed    | False | False       | True    |
| Cancelled | False | False       | True    |

Results: evaluations and baselines accumulate (merged by step and by model); checkpoints are
replaced by the trainer's own list — the complete checkpoints that still exist, after
checkpoints.keepLast deleted older ones (a resumed run's earlier checkpoints are in it). The
list comes from rank 0's progress report while it runs and from its termination summary once
no rank-0 pod is live (a summary of an earlier attempt never overrides a newer report).

Called by `reconcile` and the unit tests; must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator import gang
from finetune_operator.api import ConditionType, FineTuneJob, ObjectRef, Phase, Reason
from finetune_operator.builders import COMPLETION_INDEX_ANNOTATION, CONTAINER_NAME
from finetune_operator.kueue import Queue, QueueState
from finetune_trainer import contract
from finetune_trainer.config import EVALUATE
from finetune_trainer.errors import Reason as TrainerReason

MESSAGE_MAX = 1024


@dataclass(frozen=True)
class Problem:
    """Something only the operator can detect. permanent: Failed; else Pending + Stalled."""

    reason: Reason
    message: str
    permanent: bool


@dataclass(frozen=True)
class Observed:
    """The children as read from the API in this cycle (None: does not exist)."""

    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    problem: Problem | None = None
    run_uri: str | None = None
    # Spec fields the API server dropped (`api.unknown_fields`); None: not known this cycle.
    unknown_fields: Sequence[str] | None = None
    # The Workload's state, for a job queued with Kueue (spec.resources.queueName).
    queue: Queue | None = None


def rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------


def derive_status(
    job: FineTuneJob,
    observed: Observed,
    progress: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The new status. `progress` is rank 0's ProgressReport if it was polled this cycle."""
    previous = dict(job.status)
    status: dict[str, Any] = {
        key: previous[key]
        for key in (
            "startTime",
            "completionTime",
            "progress",
            "latestEvaluation",
            "evaluations",
            "baselines",
            "checkpoints",
        )
        if key in previous
    }
    status["model"] = job.spec.model.display_name
    status["observedGeneration"] = job.ref.generation
    if observed.run_uri:
        status["runUri"] = observed.run_uri
    elif "runUri" in previous:
        status["runUri"] = previous["runUri"]

    evaluate = job.spec.mode == EVALUATE
    if progress is not None:
        _apply_progress(status, progress, now, evaluate=evaluate)
    summary = _termination_summary(observed.pods)
    if summary is not None:
        _apply_summary(status, summary, latest=not _rank0_live(observed.pods), evaluate=evaluate)
    _trim(status)

    phase, reason, message, stalled = _phase(job, observed, previous)
    if observed.job is not None:
        status["jobName"] = observed.job["metadata"]["name"]
        job_status = observed.job.get("status") or {}
        if not gang.is_gang(job) and job_status.get("failed"):
            status["restarts"] = int(job_status["failed"])
    elif "jobName" in previous:
        status["jobName"] = previous["jobName"]
    if gang.is_gang(job):
        restarts = (
            gang.restarts_so_far(job)  # killed for memory: no restart to count
            if reason is Reason.OOM_KILLED
            else gang.decide(job, observed.job, failure_cause(job, observed.pods)).restarts
        )
        if restarts:
            status["restarts"] = restarts
    exit_code = _last_exit(observed.pods)
    if exit_code is not None:
        status["exitCode"] = exit_code[0]
    elif "exitCode" in previous:
        status["exitCode"] = previous["exitCode"]

    status["phase"] = phase.value
    status["reason"] = reason.value
    status["message"] = _clip(message)
    if "startTime" not in status:
        # Also for a job that ran and finished while the operator was away: it did start.
        started = _job_start(observed.job) or _first_pod_start(observed.pods)
        if phase is Phase.RUNNING:
            status["startTime"] = started or rfc3339(now)
        elif phase.terminal and started and reason is not Reason.INVALID_SPEC:
            status["startTime"] = started
    if phase.terminal and "completionTime" not in status:
        status["completionTime"] = ((observed.job or {}).get("status") or {}).get(
            "completionTime"
        ) or rfc3339(now)
    if phase is Phase.SUCCEEDED and status.get("progress"):
        progress_status = dict(status["progress"])
        total = progress_status.get("totalSteps")
        if evaluate:
            progress_status["percent"] = 100.0
        elif total:
            progress_status["step"] = total
            progress_status["percent"] = 100.0
            progress_status["steps"] = f"{total}/{total}"
        progress_status.pop("etaSeconds", None)
        status["progress"] = progress_status
    status["conditions"] = conditions(
        phase,
        reason,
        status["message"],
        job.ref.generation,
        previous.get("conditions") or [],
        now,
        stalled=stalled,
    )
    extra = unknown_fields_condition(observed.unknown_fields, previous, job.ref.generation, now)
    if extra is not None:
        status["conditions"].append(extra)
    return status


UNKNOWN_FIELDS_REASON = "FieldsDropped"


def unknown_fields_condition(
    fields: Sequence[str] | None, previous: Mapping[str, Any], generation: int, now: datetime
) -> dict[str, Any] | None:
    """The UnknownFields condition: present while the last applied manifest has fields the
    schema does not know; carried over when this cycle could not tell (`fields` None)."""
    before = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == ConditionType.UNKNOWN_FIELDS.value), None
    )
    if fields is None:
        return dict(before) if before else None
    if not fields:
        return None
    message = _clip(
        "the API server dropped fields it does not know (typos?), so they have no effect: "
        + ", ".join(fields)
        + " (kubectl explain finetunejob.spec lists the fields; kubectl apply refuses them)"
    )
    same = before is not None and before.get("message") == message
    return {
        "type": ConditionType.UNKNOWN_FIELDS.value,
        "status": "True",
        "reason": UNKNOWN_FIELDS_REASON,
        "message": message,
        "lastTransitionTime": before.get("lastTransitionTime", rfc3339(now)) if same and before else rfc3339(now),
        "observedGeneration": generation,
    }


def invalid_spec_status(
    ref: ObjectRef, previous: Mapping[str, Any], errors: Sequence[str], now: datetime
) -> dict[str, Any]:
    """Status of a job whose spec the operator cannot use (nothing is created)."""
    status = {
        key: previous[key]
        for key in ("startTime", "runUri", "jobName", "progress", "evaluations")
        if key in previous
    }
    message = _clip("invalid spec: " + "; ".join(errors))
    status.update(
        {
            "phase": Phase.FAILED.value,
            "reason": Reason.INVALID_SPEC.value,
            "message": message,
            "observedGeneration": ref.generation,
            "completionTime": previous.get("completionTime") or rfc3339(now),
        }
    )
    status["conditions"] = conditions(
        Phase.FAILED, Reason.INVALID_SPEC, message, ref.generation, previous.get("conditions") or [], now
    )
    return status


# ---------------------------------------------------------------------------------------------
# phase


def _phase(
    job: FineTuneJob, observed: Observed, previous: Mapping[str, Any]
) -> tuple[Phase, Reason, str, bool]:
    """(phase, reason, message, stalled)."""
    prev_phase = _as_phase(previous.get("phase"))
    if prev_phase is not None and prev_phase.terminal and previous.get("reason") != Reason.INVALID_SPEC.value:
        return (
            prev_phase,
            _as_reason(previous.get("reason"), _default_reason(prev_phase)),
            previous.get("message") or "",
            False,
        )

    if observed.job is not None and _oom_killed(observed.pods):
        # Not retried (the same config runs out again) and not gang-restarted; reconcile stops
        # the Job, whose controller would otherwise replace the pod.
        oom = (Phase.FAILED, Reason.OOM_KILLED, "")
        return Phase.FAILED, Reason.OOM_KILLED, _finish_message(job, oom, observed), False

    decision = gang.decide(job, observed.job, failure_cause(job, observed.pods))
    if decision.action is not gang.Action.NONE:
        return Phase.RUNNING, Reason.RESTARTING, decision.message, False

    if observed.job is not None:
        finished = _job_finished(observed.job)
        if finished is not None:
            return finished[0], finished[1], _finish_message(job, finished, observed), False

    if observed.problem is not None:
        if observed.problem.permanent:
            return Phase.FAILED, observed.problem.reason, observed.problem.message, False
        return Phase.PENDING, observed.problem.reason, observed.problem.message, True
    phase, reason, message = _live_phase(job, observed, prev_phase)
    if phase is Phase.PENDING and gang.restarting(job, observed.pods):
        return Phase.RUNNING, Reason.RESTARTING, str(previous.get("message") or ""), False
    stuck = _stuck(observed.pods) if phase is Phase.PENDING else None
    if stuck is not None:
        return Phase.PENDING, stuck[0], stuck[1], True
    return phase, reason, message, False


def _live_phase(job: FineTuneJob, observed: Observed, prev_phase: Phase | None) -> tuple[Phase, Reason, str]:
    active = _live_pods(observed.pods)
    if job.spec.cancel:
        if active:
            return (
                prev_phase
                if prev_phase in (Phase.RUNNING, Phase.PENDING, Phase.SUSPENDED)
                else Phase.RUNNING,
                Reason.CANCELLING,
                f"cancelling: waiting for {len(active)} pod(s) to save a checkpoint and stop",
            )
        return (
            Phase.CANCELLED,
            Reason.CANCELLED,
            "cancelled (spec.cancel); checkpoints are kept in the run folder",
        )
    if observed.job is None:
        return Phase.PENDING, Reason.CREATING, "creating the Job"
    if job.spec.suspend:
        if active:
            return Phase.SUSPENDED, Reason.SUSPENDING, f"suspending: {len(active)} pod(s) saving a checkpoint"
        return Phase.SUSPENDED, Reason.SUSPENDED, "suspended (spec.suspend); set it to false to resume"
    if observed.queue is not None and (observed.job.get("spec") or {}).get("suspend"):
        return _queued_phase(job, observed.queue, len(active))
    running = [pod for pod in active if (pod.get("status") or {}).get("phase") == "Running"]
    if running:
        nodes = job.spec.resources.nodes
        if job.spec.mode == EVALUATE:
            return Phase.RUNNING, Reason.EVALUATING, f"evaluating: {len(running)}/{nodes} pod(s) running"
        return Phase.RUNNING, Reason.TRAINING, f"training: {len(running)}/{nodes} pod(s) running"
    if prev_phase is Phase.RUNNING and not active and _sorted_terminated(observed.pods):
        # The pods have exited and the Job controller has not concluded yet (it batches pod
        # updates for ~1 s): stay Running rather than flap to Pending on the way to the end.
        return Phase.RUNNING, Reason.TRAINING, "pods exited; waiting for the Job to conclude"
    return Phase.PENDING, Reason.WAITING_FOR_PODS, "waiting for pods to start"


def _queued_phase(job: FineTuneJob, queue: Queue, active: int) -> tuple[Phase, Reason, str]:
    """A Job Kueue holds suspended: waiting for quota, or preempted (pods saving a checkpoint,
    then waiting for quota again). The message quotes Kueue's reason and message."""
    local_queue = job.spec.resources.queue_name
    kueue_says = f"Kueue: {queue.reason}: {queue.message}" if queue.message else f"Kueue: {queue.reason}"
    if queue.state is QueueState.PREEMPTED:
        saving = (
            f"; {active} pod(s) saving a checkpoint" if active else "; resumes from its newest checkpoint"
        )
        return (
            Phase.PENDING,
            Reason.PREEMPTED,
            f"preempted, queued again in LocalQueue {local_queue} ({kueue_says}){saving}",
        )
    if queue.state is QueueState.ADMITTED:
        return (
            Phase.PENDING,
            Reason.QUEUED,
            f"admitted by ClusterQueue {queue.cluster_queue}; Kueue is starting the Job",
        )
    stopping = f"; {active} pod(s) saving a checkpoint" if active else ""
    return Phase.PENDING, Reason.QUEUED, f"queued in LocalQueue {local_queue} ({kueue_says}){stopping}"


def _stuck(pods: Sequence[Mapping[str, Any]]) -> tuple[Reason, str] | None:
    """A pod that cannot start for a reason outside the spec (a missing Secret, a bad image)."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            why = str(waiting.get("reason") or "")
            text = str(waiting.get("message") or why)
            name = (pod.get("metadata") or {}).get("name", "?")
            if why == "CreateContainerConfigError":
                reason = (
                    Reason.SECRET_NOT_FOUND if "secret" in text.lower() else Reason.CONTAINER_CONFIG_ERROR
                )
                return reason, f"pod {name} cannot start: {text}"
            if why in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                return Reason.IMAGE_PULL_FAILED, f"pod {name} cannot start: {text}"
    return None


def _as_reason(value: Any, default: Reason) -> Reason:
    try:
        return Reason(value)
    except ValueError:
        return default


def _as_phase(value: Any) -> Phase | None:
    try:
        return Phase(value)
    except ValueError:
        return None


def _default_reason(phase: Phase) -> Reason:
    return {Phase.SUCCEEDED: Reason.SUCCEEDED, Phase.CANCELLED: Reason.CANCELLED}.get(
        phase, Reason.JOB_FAILED
    )


def _job_condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    conds: list[Mapping[str, Any]] = (job.get("status") or {}).get("conditions") or []
    for cond in conds:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _job_finished(job: Mapping[str, Any]) -> tuple[Phase, Reason, str] | None:
    """(phase, reason, Job condition message) if the Job reached (or is reaching) its end."""
    for kind in ("Complete", "SuccessCriteriaMet"):
        if _job_condition(job, kind) is not None:
            return Phase.SUCCEEDED, Reason.SUCCEEDED, "training finished"
    for kind in ("Failed", "FailureTarget"):
        cond = _job_condition(job, kind)
        if cond is not None:
            reason = {
                "PodFailurePolicy": Reason.INVALID_INPUT,
                "BackoffLimitExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
                "DeadlineExceeded": Reason.DEADLINE_EXCEEDED,
            }.get(str(cond.get("reason")), Reason.JOB_FAILED)
            return Phase.FAILED, reason, str(cond.get("message") or cond.get("reason") or "the Job failed")
    return None


def _finish_message(job: FineTuneJob, finished: tuple[Phase, Reason, str], observed: Observed) -> str:
    phase, reason, job_message = finished
    if phase is Phase.SUCCEEDED:
        summary = _termination_summary(observed.pods)
        if job.spec.mode == EVALUATE:
            points = [
                e for p in (summary or {}).get("evaluations") or [] if (e := _evaluation(p)) is not None
            ]
            result = next((e for e in points if e["step"] == 0), {})
            if not {"loss", "accuracy", "perplexity"} <= set(result):
                return "evaluation finished"
            return (
                f"evaluation finished: eval loss {result['loss']:.4f}, token accuracy "
                f"{result['accuracy']:.4f}, perplexity {result['perplexity']:.3f}"
            )
        final = summary.get("finalUri") if summary else None
        return f"training finished; final model in {final}" if final else "training finished"
    pod_message = failure_cause(job, observed.pods)
    if reason is Reason.OOM_KILLED:
        return _clip(f"{OOM_ADVICE} ({pod_message})" if pod_message else OOM_ADVICE)
    prefix = {
        Reason.INVALID_INPUT: "invalid input (the trainer exited with code "
        f"{contract.EXIT_INVALID_INPUT}; not retried)",
        Reason.BACKOFF_LIMIT_EXCEEDED: "failed after the retries of runPolicy.backoffLimit",
        Reason.DEADLINE_EXCEEDED: "runPolicy.activeDeadlineSeconds exceeded",
    }.get(reason, job_message)
    return f"{prefix}: {pod_message}" if pod_message else prefix


OOM_ADVICE = (
    "the trainer ran out of memory (OOMKilled; not retried: it would run out again): "
    "lower hyperparameters.microBatchSize (gradient accumulation keeps batchSize), set "
    "hyperparameters.gradientCheckpointing: true, use lora, or raise resources.memory"
)


def _oom_killed(pods: Sequence[Mapping[str, Any]]) -> bool:
    """A trainer container was killed for memory: its terminated reason is OOMKilled (the
    runtime's word for the cgroup's OOM killer). Exit code 137 alone is not enough: a kill after
    the grace period, an eviction and a container the kubelet lost (ContainerStatusUnknown)
    exit 137 too, and are retried."""
    return any(state.get("reason") == "OOMKilled" for _, state in _sorted_terminated(pods))


def _live_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [pod for pod in pods if (pod.get("status") or {}).get("phase") in ("Pending", "Running", None)]


def _job_start(job: Mapping[str, Any] | None) -> str | None:
    return ((job or {}).get("status") or {}).get("startTime")


def _first_pod_start(pods: Sequence[Mapping[str, Any]]) -> str | None:
    times = [str(t) for pod in pods if (t := (pod.get("status") or {}).get("startTime"))]
    return min(times) if times else None


# ---------------------------------------------------------------------------------------------
# pods


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            state: Mapping[str, Any] | None = (cs.get("state") or {}).get("terminated")
            if state:
                return state
    return None


def _sorted_terminated(
    pods: Sequence[Mapping[str, Any]],
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    found = [(pod, state) for pod in pods if (state := _terminated(pod)) is not None]
    return sorted(found, key=lambda item: str(item[1].get("finishedAt") or ""))


def _last_exit(pods: Sequence[Mapping[str, Any]]) -> tuple[int, Mapping[str, Any]] | None:
    found = _sorted_terminated(pods)
    if not found:
        return None
    pod, state = found[-1]
    return int(state.get("exitCode", 0)), pod


def failure_cause(job: FineTuneJob, pods: Sequence[Mapping[str, Any]]) -> str:
    """Why the job's pods failed: of a multi-node job, the pod that failed first (its peers'
    failures — "connection closed by peer", or SIGTERM from the Job controller — follow from
    it); of a single pod, the newest failure."""
    return _pod_failure_message(pods, first=gang.is_gang(job))


def _failure_order(item: tuple[Mapping[str, Any], Mapping[str, Any]]) -> tuple[bool, str]:
    """Sort key of a failed pod: symptoms last — stopped by a signal (SIGTERM/SIGKILL, the Job
    controller ending the attempt) or a collective that lost its peer (reason PeerLost); then
    the trainer's own failure time (milliseconds), else the container's finishedAt."""
    _, state = item
    summary = _parse_summary(str(state.get("message") or "").strip()) or {}
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
    failed = [(pod, state) for pod, state in _sorted_terminated(pods) if state.get("exitCode")]
    if first:
        failed = sorted(failed, key=_failure_order, reverse=True)
    if failed:
        pod, state = failed[-1]
        name = (pod.get("metadata") or {}).get("name", "?")
        text = str(state.get("message") or "").strip()
        reason = str(state.get("reason") or "Error")
        summary = _parse_summary(text)
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


def _parse_summary(text: str) -> dict[str, Any] | None:
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


def _rank0_live(pods: Sequence[Mapping[str, Any]]) -> bool:
    """A rank-0 pod that has not ended: a newer attempt than any terminated one."""
    return any(_is_rank0(pod) for pod in _live_pods(pods))


def _termination_summary(pods: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Rank 0's final summary (the newest one, if it was restarted)."""
    summaries = []
    for pod, state in _sorted_terminated(pods):
        if not _is_rank0(pod):
            continue
        summary = _parse_summary(str(state.get("message") or ""))
        if summary is not None:
            summaries.append(summary)
    return summaries[-1] if summaries else None


# ---------------------------------------------------------------------------------------------
# progress


# Metrics in the status are for people, `kubectl get` and GitOps tools: 5 significant digits
# (0.78004, not 0.7800356164157423). Full precision stays in the run folder's metrics.jsonl and
# in the trainer's Prometheus metrics.
SIGNIFICANT_DIGITS = 5


def _number(value: Any) -> float | None:
    """A finite number from untrusted JSON, rounded to SIGNIFICANT_DIGITS, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return float(f"{number:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    """A non-negative integer from untrusted JSON, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _evaluation(point: Any) -> dict[str, Any] | None:
    if not isinstance(point, Mapping):
        return None
    step = _count(point.get("step"))
    if step is None:
        return None
    out: dict[str, Any] = {"step": step}
    for key in ("loss", "accuracy", "perplexity"):
        value = _number(point.get(key))
        if value is not None:
            out[key] = value
    return out


def _replace_checkpoints(
    existing: Sequence[Mapping[str, Any]], reported: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Exactly the reported checkpoints (the ones that still exist), oldest first; a time or
    metrics a shortened report left out are kept from the known entry of the same step and URI."""
    known = {(item.get("step"), item.get("uri")): item for item in existing}
    out: dict[int, dict[str, Any]] = {}
    for item in reported:
        before = known.get((item["step"], item["uri"])) or {}
        out[item["step"]] = {
            **{k: before[k] for k in ("time", "metrics") if k in before},
            **item,
        }
    return [out[step] for step in sorted(out)]


def _merge_by(
    existing: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], key: str
) -> list[dict[str, Any]]:
    merged = {item[key]: dict(item) for item in existing if key in item}
    for item in new:
        merged[item[key]] = dict(item)
    return [merged[k] for k in sorted(merged)]


def _apply_progress(
    status: dict[str, Any], report: Mapping[str, Any], now: datetime, *, evaluate: bool
) -> None:
    raw_step, raw_total = report.get("step"), report.get("totalSteps")
    step = _count(raw_step) or 0
    total = _count(raw_total) or None
    progress: dict[str, Any] = {"step": step, "steps": f"{step}/{total}" if total else str(step)}
    if isinstance(report.get("phase"), str):
        progress["trainerPhase"] = report["phase"]
    if evaluate:
        progress.update(step=0, totalSteps=0, steps="eval")
    elif total:
        progress["totalSteps"] = total
        progress["percent"] = round(min(100.0, 100.0 * step / total), 1)
    for source, target in (
        ("epoch", "epoch"),
        ("trainLoss", "trainLoss"),
        ("learningRate", "learningRate"),
        ("tokensPerSecond", "tokensPerSecond"),
        ("etaSeconds", "etaSeconds"),
    ):
        value = _number(report.get(source))
        if value is not None and (value >= 0 or target in ("trainLoss", "learningRate")):
            progress[target] = value
    trained = _count(report.get("trainedTokens"))
    if trained is not None:
        progress["trainedTokens"] = trained
    progress["updatedAt"] = rfc3339(now)
    status["progress"] = progress
    _apply_results(status, report, checkpoints=True)


def _apply_results(status: dict[str, Any], report: Mapping[str, Any], *, checkpoints: bool) -> None:
    """Evaluations and baselines merged in; with `checkpoints`, the reported checkpoint list (if
    the report has one) replaces the status's."""
    evaluations = [e for p in report.get("evaluations") or [] if (e := _evaluation(p)) is not None]
    if evaluations:
        status["evaluations"] = _merge_by(status.get("evaluations") or [], evaluations, "step")
    baselines = []
    for item in report.get("baselines") or []:
        if isinstance(item, Mapping) and isinstance(item.get("model"), str):
            baseline: dict[str, Any] = {"model": item["model"]}
            for key in ("loss", "accuracy", "perplexity"):
                value = _number(item.get(key))
                if value is not None:
                    baseline[key] = value
            baselines.append(baseline)
    if baselines:
        status["baselines"] = _merge_by(status.get("baselines") or [], baselines, "model")
    reported = report.get("checkpoints")
    if checkpoints and isinstance(reported, list):  # null or absent: not known, keep the list
        valid = [c for item in reported if (c := _checkpoint(item)) is not None]
        status["checkpoints"] = _replace_checkpoints(status.get("checkpoints") or [], valid)


def _checkpoint(item: Any) -> dict[str, Any] | None:
    if (
        not isinstance(item, Mapping)
        or _count(item.get("step")) is None
        or not isinstance(item.get("uri"), str)
    ):
        return None
    out: dict[str, Any] = {"step": item["step"], "uri": item["uri"]}
    if isinstance(item.get("time"), str):
        out["time"] = item["time"]
    metrics = {k: n for k, v in (item.get("metrics") or {}).items() if (n := _number(v)) is not None}
    if metrics:
        out["metrics"] = metrics
    return out


def _apply_summary(
    status: dict[str, Any], summary: Mapping[str, Any], *, latest: bool, evaluate: bool
) -> None:
    """Fold rank 0's termination summary in: results survive the pod and the Job. Its checkpoint
    list counts only when it is the `latest` word (no rank-0 pod of a newer attempt is live)."""
    _apply_results(status, summary, checkpoints=latest)
    step = _count(summary.get("step"))
    if evaluate:
        progress = dict(status.get("progress") or {})
        progress.update(step=0, totalSteps=0, steps="eval")
        if isinstance(summary.get("phase"), str):
            progress["trainerPhase"] = summary["phase"]
        status["progress"] = progress
    elif step is not None:
        progress = dict(status.get("progress") or {})
        total = _count(summary.get("totalSteps")) or progress.get("totalSteps")
        progress["step"] = max(step, int(progress.get("step") or 0))
        if total:
            progress["totalSteps"] = total
            progress["percent"] = round(min(100.0, 100.0 * progress["step"] / total), 1)
            progress["steps"] = f"{progress['step']}/{total}"
        else:
            progress["steps"] = str(progress["step"])
        if isinstance(summary.get("phase"), str):
            progress["trainerPhase"] = summary["phase"]
        status["progress"] = progress


def _trim(status: dict[str, Any], max_evaluations: int = 50, max_checkpoints: int = 20) -> None:
    evaluations = status.get("evaluations") or []
    if evaluations:
        # keep step 0 (the zero-shot baseline) and the newest ones
        kept = (
            evaluations
            if len(evaluations) <= max_evaluations
            else [evaluations[0], *evaluations[-(max_evaluations - 1) :]]
        )
        status["evaluations"] = kept
        status["latestEvaluation"] = kept[-1]
    if len(status.get("checkpoints") or []) > max_checkpoints:
        status["checkpoints"] = status["checkpoints"][-max_checkpoints:]


# ---------------------------------------------------------------------------------------------
# conditions


def conditions(
    phase: Phase,
    reason: Reason,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
    *,
    stalled: bool = False,
) -> list[dict[str, Any]]:
    """kstatus conditions for a phase (see the module docstring's table)."""
    reconciling = (phase in (Phase.PENDING, Phase.RUNNING) or reason is Reason.SUSPENDING) and not stalled
    is_stalled = phase in (Phase.FAILED, Phase.CANCELLED) or stalled
    values = {
        ConditionType.READY: phase is Phase.SUCCEEDED,
        ConditionType.RECONCILING: reconciling,
        ConditionType.STALLED: is_stalled,
    }
    if phase is Phase.SUSPENDED:
        # No Ready condition: kstatus (Flux) reads Ready=False as "in progress", which would hold
        # a `wait: true` Kustomization until it times out; without it a settled suspended job is
        # Current, as intended. Ready=True would make `kubectl wait --for=condition=Ready` lie.
        del values[ConditionType.READY]
    before = {c.get("type"): c for c in previous}
    out = []
    for kind, value in values.items():
        text = "True" if value else "False"
        old = before.get(kind.value)
        changed = old is None or old.get("status") != text
        out.append(
            {
                "type": kind.value,
                "status": text,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": rfc3339(now)
                if changed or not old
                else old.get("lastTransitionTime", rfc3339(now)),
                "observedGeneration": generation,
            }
        )
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 1] + "…"
