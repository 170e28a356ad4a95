"""A FineTuneJob's phase, reason and message from what one cycle observed (pure).

`decide_phase(job, observed, previous)` decides, in order: a finished job stays as it was
(`is_finished`, the one home of "a terminal phase is sticky"), an OOMKilled trainer fails the
job, a gang restart, the Job's own end, a problem only the operator sees, then the live phases
(cancelling, suspended, queued with Kueue, running, waiting for pods, stuck on a pod).

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator import gang
from finetune_operator.api import FineTuneJob, Phase, Reason
from finetune_operator.conditions import clip
from finetune_operator.kueue import Queue, QueueState
from finetune_operator.observed import Observed
from finetune_operator.pods import (
    cause_message,
    live_pods,
    oom_killed,
    sorted_terminated,
    termination_summary,
)
from finetune_operator.results import evaluation
from finetune_trainer import contract
from finetune_trainer.config import EVALUATE


def is_finished(previous: Mapping[str, Any]) -> bool:
    """A terminal phase is sticky: a job that finished stays as it was (a finished Job deleted by
    its TTL changes nothing, and its children are never created again). The exception is
    Failed/InvalidSpec: fixing the spec retries the job."""
    phase = _as_phase(previous.get("phase"))
    return phase is not None and phase.terminal and previous.get("reason") != Reason.INVALID_SPEC.value


def decide_phase(
    job: FineTuneJob, observed: Observed, previous: Mapping[str, Any]
) -> tuple[Phase, Reason, str, bool]:
    """(phase, reason, message, stalled)."""
    prev_phase = _as_phase(previous.get("phase"))
    if prev_phase is not None and is_finished(previous):
        return (
            prev_phase,
            _as_reason(previous.get("reason"), _default_reason(prev_phase)),
            previous.get("message") or "",
            False,
        )

    if observed.batch_job is not None and oom_killed(observed.pods):
        # Not retried (the same config runs out again) and not gang-restarted; reconcile stops
        # the Job, whose controller would otherwise replace the pod.
        oom = (Phase.FAILED, Reason.OOM_KILLED, "")
        return Phase.FAILED, Reason.OOM_KILLED, _finish_message(job, oom, observed), False

    decision = gang.decide(job, observed.batch_job, cause_message(job, observed.batch_job, observed.pods))
    if decision.action is not gang.Action.NONE:
        return Phase.RUNNING, Reason.RESTARTING, decision.message, False

    if observed.batch_job is not None:
        finished = _batch_job_finished(observed.batch_job)
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
    active = live_pods(observed.pods)
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
    if observed.batch_job is None:
        return Phase.PENDING, Reason.CREATING, "creating the Job"
    if job.spec.suspend:
        if active:
            return Phase.SUSPENDED, Reason.SUSPENDING, f"suspending: {len(active)} pod(s) saving a checkpoint"
        return Phase.SUSPENDED, Reason.SUSPENDED, "suspended (spec.suspend); set it to false to resume"
    if observed.queue is not None and (observed.batch_job.get("spec") or {}).get("suspend"):
        return _queued_phase(job, observed.queue, len(active))
    running = [pod for pod in active if (pod.get("status") or {}).get("phase") == "Running"]
    if running:
        nodes = job.spec.resources.nodes
        if job.spec.mode == EVALUATE:
            return Phase.RUNNING, Reason.EVALUATING, f"evaluating: {len(running)}/{nodes} pod(s) running"
        return Phase.RUNNING, Reason.TRAINING, f"training: {len(running)}/{nodes} pod(s) running"
    if prev_phase is Phase.RUNNING and not active and sorted_terminated(observed.pods):
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


def _batch_job_condition(batch_job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    conds: list[Mapping[str, Any]] = (batch_job.get("status") or {}).get("conditions") or []
    for cond in conds:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _batch_job_finished(batch_job: Mapping[str, Any]) -> tuple[Phase, Reason, str] | None:
    """(phase, reason, Job condition message) if the Job reached (or is reaching) its end."""
    for kind in ("Complete", "SuccessCriteriaMet"):
        if _batch_job_condition(batch_job, kind) is not None:
            return Phase.SUCCEEDED, Reason.SUCCEEDED, "training finished"
    for kind in ("Failed", "FailureTarget"):
        cond = _batch_job_condition(batch_job, kind)
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
        summary = termination_summary(observed.pods)
        if job.spec.mode == EVALUATE:
            points = [e for p in (summary or {}).get("evaluations") or [] if (e := evaluation(p)) is not None]
            result = next((e for e in points if e["step"] == 0), {})
            if not {"loss", "accuracy", "perplexity"} <= set(result):
                return "evaluation finished"
            return (
                f"evaluation finished: eval loss {result['loss']:.4f}, token accuracy "
                f"{result['accuracy']:.4f}, perplexity {result['perplexity']:.3f}"
            )
        final = summary.get("finalUri") if summary else None
        return f"training finished; final model in {final}" if final else "training finished"
    pod_message = cause_message(job, observed.batch_job, observed.pods)
    if reason is Reason.OOM_KILLED:
        return clip(f"{OOM_ADVICE} ({pod_message})" if pod_message else OOM_ADVICE)
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
