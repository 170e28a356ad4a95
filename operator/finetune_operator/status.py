"""FineTuneJob status from what was observed (pure): the Job, its pods, the trainer's progress.

`derive_status(job, observed, progress, now)` returns the complete new status (typed).
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

This module assembles the status; its subjects live apart: `phase` (phase, reason and message;
the terminal-phase rule, `is_finished`), `pods` (pod readers: exits, failures, termination
summaries), `results` (folding the trainer's reports in) and `conditions` (kstatus conditions).
The status is the typed `api.FineTuneJobStatus`; `reconcile` writes its `to_dict()`.

Called by `reconcile` and the unit tests; must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from finetune_operator import gang
from finetune_operator.api import FineTuneJob, FineTuneJobStatus, ObjectRef, Phase, Reason, rfc3339
from finetune_operator.conditions import clip, conditions, unknown_fields_condition
from finetune_operator.observed import Observed, Problem
from finetune_operator.phase import decide_phase, is_finished
from finetune_operator.pods import (
    attempt_failure,
    cause_message,
    first_pod_start,
    last_exit,
    rank0_live,
    restart_cause,
    termination_summary,
)
from finetune_operator.results import apply_progress, apply_summary, trim
from finetune_trainer.config import EVALUATE

# What `reconcile` reads from here, besides the two functions below.
__all__ = ["Observed", "Problem", "derive_status", "invalid_spec_status", "is_finished"]


def derive_status(
    job: FineTuneJob,
    observed: Observed,
    progress: Mapping[str, Any] | None,
    now: datetime,
) -> FineTuneJobStatus:
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
        apply_progress(status, progress, now, evaluate=evaluate)
    summary = termination_summary(observed.pods)
    if summary is not None:
        apply_summary(status, summary, latest=not rank0_live(observed.pods), evaluate=evaluate)
    trim(status)

    phase, reason, message, stalled = decide_phase(job, observed, previous)
    if observed.batch_job is not None:
        status["jobName"] = observed.batch_job["metadata"]["name"]
        job_status = observed.batch_job.get("status") or {}
        if not gang.is_gang(job) and job_status.get("failed"):
            status["restarts"] = int(job_status["failed"])
    elif "jobName" in previous:
        status["jobName"] = previous["jobName"]
    if gang.is_gang(job):
        decision = gang.decide(job, observed.batch_job, cause_message(job, observed.batch_job, observed.pods))
        restarts = (
            gang.restarts_so_far(job)  # killed for memory: no restart to count
            if reason is Reason.OOM_KILLED
            else decision.restarts
        )
        if restarts:
            status["restarts"] = restarts
        # The cause of the newest failed attempt, recorded when first seen (`pods.attempt_failure`);
        # when the attempt ends without one, what this cycle tells (`pods.restart_cause`).
        if is_finished(previous):
            record = previous.get("lastFailure")
        else:
            ending = decision.action is gang.Action.RESTART or phase is Phase.FAILED
            found = (restart_cause if ending else attempt_failure)(job, observed.batch_job, observed.pods)
            record = found.model_dump(by_alias=True, exclude_none=True) if found is not None else None
        if record:
            status["lastFailure"] = record
    exit_code = last_exit(observed.pods)
    if exit_code is not None:
        status["exitCode"] = exit_code[0]
    elif "exitCode" in previous:
        status["exitCode"] = previous["exitCode"]

    status["phase"] = phase.value
    status["reason"] = reason.value
    status["message"] = clip(message)
    if "startTime" not in status:
        # Also for a job that ran and finished while the operator was away: it did start.
        started = _batch_job_start(observed.batch_job) or first_pod_start(observed.pods)
        if phase is Phase.RUNNING:
            status["startTime"] = started or rfc3339(now)
        elif phase.terminal and started and reason is not Reason.INVALID_SPEC:
            status["startTime"] = started
    if phase.terminal and "completionTime" not in status:
        status["completionTime"] = ((observed.batch_job or {}).get("status") or {}).get(
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
    return FineTuneJobStatus.from_dict(status)


def invalid_spec_status(
    ref: ObjectRef, previous: Mapping[str, Any], errors: Sequence[str], now: datetime
) -> FineTuneJobStatus:
    """Status of a job whose spec the operator cannot use (nothing is created)."""
    status = {
        key: previous[key]
        for key in ("startTime", "runUri", "jobName", "progress", "evaluations")
        if key in previous
    }
    message = clip("invalid spec: " + "; ".join(errors))
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
    return FineTuneJobStatus.from_dict(status)


def _batch_job_start(batch_job: Mapping[str, Any] | None) -> str | None:
    return ((batch_job or {}).get("status") or {}).get("startTime")
