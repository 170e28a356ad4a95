"""One reconcile cycle of a FineTuneJob: fetch → ensure children → observe → one status write.

Level-based and idempotent: create, update, resume, Job events and the progress timer all call
`reconcile`; running it twice changes nothing (deterministic names, AlreadyExists is success,
the status is written only when it differs). Decisions are made by the pure modules
(`builders`, `status`); this module only sequences API calls through `k8s.Cluster` and polls
progress through `progress.ProgressSource`. Events are emitted after the status write.

What the API server could not reject (an unknown catalog model, no run folder) ends in phase
Failed with reason InvalidSpec and creates nothing; it is never an exception, so kopf never
retries it. So does a child the API server refuses, created or patched, with 400/413/422 (a
value only the Pod or Job API checks, a body too large): Failed/InvalidSpec with the API
server's message, until the spec changes. A 403 on create (a ResourceQuota, an admission
policy) and a missing ServiceAccount or PriorityClass are Pending + Stalled with a reason naming
the cause, re-checked by the Pending poll. Other API errors propagate as `k8s.ApiError` for the
glue to retry.

A finished Job gets `runPolicy.ttlSecondsAfterFinished` only after its result is in the status
(`_ttl_patch`): with any TTL, even 0, the Job and its pods outlive the operator's reading them,
and a finished job's Job is never created again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator import builders, gang, kueue, metrics
from finetune_operator.api import (
    ConditionType,
    FineTuneJob,
    FineTuneJobStatus,
    ObjectRef,
    Phase,
    Reason,
    SpecError,
    unknown_fields,
)
from finetune_operator.k8s import ApiError, Cluster, Conflict
from finetune_operator.progress import ProgressSource
from finetune_operator.settings import Settings
from finetune_operator.status import (
    Observed,
    Problem,
    derive_status,
    invalid_spec_status,
    is_finished,
)

log = logging.getLogger(__name__)

# Status fields that change on every poll without meaning anything new.
_VOLATILE = ("updatedAt",)


@dataclass
class Outcome:
    """What one cycle did (for the controller, metrics and tests)."""

    phase: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False
    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    gone: bool = False
    # The FineTuneJob as this cycle left it (the status write's response, else as read): what
    # the controller may pass as `BatchJobChanged.cached` next time.
    object: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# what the trigger already knows


@dataclass(frozen=True)
class ReadEverything:
    """Nothing is known: read the FineTuneJob, read (and create or sync) its children."""


@dataclass(frozen=True)
class JustCreated:
    """The FineTuneJob just created (its ADDED watch event): used instead of reading it again,
    and its children are created without reading them first (AlreadyExists still works)."""

    finetunejob: Mapping[str, Any]


@dataclass(frozen=True)
class BatchJobChanged:
    """The batch Job from its watch event: the status is refreshed from it, and the children are
    neither read nor re-created (a FineTuneJob event or the loop does that).

    `cached`: the FineTuneJob as last seen (a watch event or our last write), used instead of a
    GET; the status write then carries its resourceVersion, and if the object changed since, the
    cycle runs once more on a fresh read. Nothing is written from a stale copy, and a cached spec
    never reaches the children (only this kind of cycle, which leaves them alone, takes one)."""

    batch_job: Mapping[str, Any]
    cached: Mapping[str, Any] | None = None


Known = ReadEverything | JustCreated | BatchJobChanged


def reconcile(
    cluster: Cluster,
    namespace: str,
    name: str,
    *,
    settings: Settings,
    now: datetime,
    progress: ProgressSource | None = None,
    trigger: str = "event",
    known: Known = ReadEverything(),
) -> Outcome:
    """Bring one FineTuneJob's children and status up to date. `progress`: poll rank 0 too;
    `known`: what the trigger already read (see `ReadEverything`, `JustCreated`, `BatchJobChanged`)."""
    started = time.monotonic()
    result = "ok"
    try:
        try:
            outcome = _reconcile(cluster, namespace, name, settings, now, progress, known)
        except Conflict:
            if not isinstance(known, BatchJobChanged) or known.cached is None:
                raise
            log.debug("%s/%s changed since it was cached; reading it again", namespace, name)
            outcome = _reconcile(
                cluster, namespace, name, settings, now, progress, BatchJobChanged(known.batch_job)
            )
        metrics.PHASES.set(namespace, name, None if outcome.gone else outcome.phase)
        return outcome
    except Exception:
        result = "error"
        raise
    finally:
        metrics.RECONCILES.labels(trigger=trigger, result=result).inc()
        metrics.RECONCILE_DURATION.labels(trigger=trigger).observe(time.monotonic() - started)


def _reconcile(
    cluster: Cluster,
    namespace: str,
    name: str,
    settings: Settings,
    now: datetime,
    progress: ProgressSource | None,
    known: Known,
) -> Outcome:
    # 1. The FineTuneJob: as the trigger knows it, else read. Gone (or going): nothing to do,
    #    its children go with it (ownerReferences).
    obj, precondition = _read_finetunejob(cluster, namespace, name, known)
    if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
        return Outcome(gone=True)
    ref = ObjectRef.from_object(obj)
    previous: Mapping[str, Any] = obj.get("status") or {}
    outcome = Outcome(object=obj)

    # 2. A spec the operator cannot use: Failed/InvalidSpec, nothing created.
    try:
        job = FineTuneJob.from_object(obj)
    except SpecError as exc:
        metrics.ERRORS.labels(kind="invalid_spec").inc()
        _write(
            cluster,
            ref,
            previous,
            invalid_spec_status(ref, previous, exc.errors, now),
            outcome,
            now,
            precondition,
        )
        return outcome

    # 3. The batch Job: a finished job's as it is (never re-created: its Job may be gone by
    #    TTL); a Job event's as the event says; else its children created or synced.
    finished = is_finished(previous)
    problem: Problem | None = None
    run_uri: str | None = None
    if finished:
        batch_job = cluster.get("Job", namespace, builders.batch_job_name(name))
    elif isinstance(known, BatchJobChanged):
        batch_job = dict(known.batch_job)
        run_uri = builders.run_uri(job, settings)
    else:
        batch_job, run_uri, problem = _ensure_children(
            cluster, job, settings, previous, outcome, create_first=isinstance(known, JustCreated)
        )

    # 4. Kueue's Workload (read; (de)activated only where the children are synced).
    queue: kueue.Queue | None = None
    if batch_job is not None and kueue.managed(job) and not finished:
        queue = _sync_workload(cluster, job, batch_job, outcome, apply=not isinstance(known, BatchJobChanged))

    # 5. The pods, and rank 0's progress if this cycle polls.
    pods: list[dict[str, Any]] = []
    if batch_job is not None and _may_have_pods(batch_job):
        pods = cluster.list_pods(namespace, builders.labels(name))
    report = _poll(progress, pods, settings) if progress is not None else None

    # 6. The status from what was observed; one write if it changed, then its events.
    observed = Observed(
        batch_job=batch_job,
        pods=pods,
        problem=problem,
        run_uri=run_uri,
        unknown_fields=unknown_fields(obj),
        queue=queue,
    )
    new_status = derive_status(job, observed, report, now)
    _write(cluster, ref, previous, new_status, outcome, now, precondition)

    # 7. What the written status decided for the batch Job: a gang restart, stopping it after
    #    an OOM kill, its TTL once the result is recorded.
    if batch_job is not None:
        _act_on_batch_job(cluster, job, batch_job, new_status, outcome, now)
    return outcome


def _read_finetunejob(
    cluster: Cluster, namespace: str, name: str, known: Known
) -> tuple[dict[str, Any] | None, str | None]:
    """(the FineTuneJob, the resourceVersion a status write must match, if any)."""
    if isinstance(known, JustCreated):
        return dict(known.finetunejob), None
    if isinstance(known, BatchJobChanged) and known.cached is not None:
        obj = dict(known.cached)
        return obj, str((obj.get("metadata") or {}).get("resourceVersion") or "") or None
    return cluster.get_finetunejob(namespace, name), None


def _ensure_children(
    cluster: Cluster,
    job: FineTuneJob,
    settings: Settings,
    previous: Mapping[str, Any],
    outcome: Outcome,
    *,
    create_first: bool,
) -> tuple[dict[str, Any] | None, str | None, Problem | None]:
    """(the batch Job, the run folder, a problem): the children built from the spec, the
    references they need checked while Pending, then created or synced (`_apply_children`)."""
    try:
        children = builders.build_children(job, settings)
    except SpecError as exc:
        metrics.ERRORS.labels(kind="invalid_spec").inc()
        return (
            None,
            None,
            Problem(Reason.INVALID_SPEC, "invalid spec: " + "; ".join(exc.errors), permanent=True),
        )
    run_uri = builders.run_uri(job, settings)
    problem: Problem | None = None
    if (
        previous.get("phase") in (None, Phase.PENDING.value)
        or previous.get("reason") == Reason.INVALID_SPEC.value
    ):
        problem = _missing_references(cluster, job)
    if problem is not None:
        return None, run_uri, problem
    try:
        batch_job, problem = _apply_children(cluster, job, children, outcome, create_first=create_first)
    except ApiError as exc:
        problem = _refused(exc)
        if problem is None:
            raise
        return None, run_uri, problem
    return batch_job, run_uri, problem


def _act_on_batch_job(
    cluster: Cluster,
    job: FineTuneJob,
    batch_job: Mapping[str, Any],
    status: FineTuneJobStatus,
    outcome: Outcome,
    now: datetime,
) -> None:
    """After the status write (a crash in between loses nothing): what it decided for the Job."""
    if status.reason == Reason.RESTARTING.value:
        _restart_gang(cluster, job, batch_job, status, outcome, now)
    if status.reason == Reason.OOM_KILLED.value:
        _stop_after_oom(cluster, job, batch_job, outcome)
    if status.phase is not None and status.phase.terminal:
        ttl = _ttl_patch(job, batch_job)
        if ttl is not None:
            cluster.patch("Job", job.namespace, batch_job["metadata"]["name"], ttl)
            outcome.patched.append(f"Job/{batch_job['metadata']['name']}")


def _restart_gang(
    cluster: Cluster,
    job: FineTuneJob,
    batch_job: Mapping[str, Any],
    status: FineTuneJobStatus,
    outcome: Outcome,
    now: datetime,
) -> None:
    """After the status write that counted it: delete the failed attempt's Job (its pods first);
    the Job's DELETED event starts the cycle that creates the next attempt. (`gang` explains.)
    The PodFailed event names the cause the status recorded (`status.lastFailure`)."""
    cause = status.last_failure.message if status.last_failure is not None else ""
    decision = gang.decide(job, batch_job, cause)
    if decision.action not in (gang.Action.RESTART, gang.Action.DELETE_STALE):
        return
    if decision.action is gang.Action.RESTART:  # the event before the delete: a crash loses neither
        message = cause or "a pod failed"
        cluster.event(job.ref, type="Warning", reason=Reason.POD_FAILED.value, message=message, now=now)
        outcome.events.append(("Warning", Reason.POD_FAILED.value, message))
    meta = batch_job["metadata"]
    cluster.delete("Job", meta["namespace"], meta["name"], uid=meta.get("uid"))
    outcome.deleted.append(f"Job/{meta['name']}")


def _stop_after_oom(
    cluster: Cluster, job: FineTuneJob, batch_job: Mapping[str, Any], outcome: Outcome
) -> None:
    """A trainer was OOMKilled: the FineTuneJob failed, but the Job controller would replace the
    pod (a podFailurePolicy cannot tell OOMKilled from other kills of exit code 137). Suspend
    the Job: its running pods stop, the failed pod stays for `kubectl logs`. A Job Kueue
    manages keeps its suspend flag (Kueue owns it): its Workload is deactivated instead."""
    meta = batch_job.get("metadata") or {}
    if meta.get("deletionTimestamp") or _batch_job_ended(batch_job):
        return
    if builders.QUEUE_NAME_LABEL in (meta.get("labels") or {}):
        workload = cluster.find_workload(job.namespace, str(meta.get("uid") or ""))
        if workload is not None and kueue.active(workload):
            name = workload["metadata"]["name"]
            cluster.patch_workload(job.namespace, name, kueue.deactivate_patch(Reason.OOM_KILLED.value))
            outcome.patched.append(f"Workload/{name}")
        return
    if not (batch_job.get("spec") or {}).get("suspend"):
        cluster.patch("Job", job.namespace, meta["name"], {"spec": {"suspend": True}})
        outcome.patched.append(f"Job/{meta['name']}")


def _missing_references(cluster: Cluster, job: FineTuneJob) -> Problem | None:
    """A ServiceAccount or PriorityClass the pods name that does not exist: the Job controller
    could not create a single pod and would say so only in its own events. Checked before the
    Job is created (and while the job is Pending), so the status names the field."""
    res = job.spec.resources
    if (
        res.service_account_name
        and cluster.get("ServiceAccount", job.namespace, res.service_account_name) is None
    ):
        return Problem(
            Reason.SERVICE_ACCOUNT_NOT_FOUND,
            f"spec.resources.serviceAccountName: ServiceAccount {res.service_account_name!r} does not exist "
            f"in namespace {job.namespace!r}: create it (it needs no Kubernetes API rights) or remove the "
            "field; the job starts once it exists",
            permanent=False,
        )
    if res.priority_class_name and cluster.get("PriorityClass", "", res.priority_class_name) is None:
        return Problem(
            Reason.PRIORITY_CLASS_NOT_FOUND,
            f"spec.resources.priorityClassName: PriorityClass {res.priority_class_name!r} does not exist "
            "(kubectl get priorityclasses lists them): create it or change the field; the job starts "
            "once it exists",
            permanent=False,
        )
    return None


# What the API server answers for a child it refuses for what the child is, created or patched:
# 400 (a body it cannot read), 413 (larger than it accepts), 422 (a value only the Job or Pod
# API validates). Retrying the same request cannot help; changing the spec can.
REFUSED_STATUSES = (400, 413, 422)


def _refused(exc: ApiError) -> Problem | None:
    """A child the API server refuses for what it is (`REFUSED_STATUSES`, on create or on patch)
    fails the job with the server's message. 403 on create (a ResourceQuota, an admission policy)
    stalls it. Else None: a transient error, retried."""
    detail = exc.message or exc.reason
    if exc.verb in ("create", "patch") and exc.status in REFUSED_STATUSES:
        return Problem(
            Reason.INVALID_SPEC,
            f"the API server refused the {exc.kind}: {detail} (fix the spec field it names)",
            permanent=True,
        )
    if exc.verb == "create" and exc.status == 403:
        return Problem(
            Reason.CREATE_FORBIDDEN,
            f"the API server refused the {exc.kind}: {detail}; retried while Pending",
            permanent=False,
        )
    return None


def _ttl_patch(job: FineTuneJob, batch_job: Mapping[str, Any]) -> dict[str, Any] | None:
    """runPolicy.ttlSecondsAfterFinished for a Job that finished, once its result is recorded
    (the TTL counts from the Job's own finish time, so it ends when the user asked)."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or (batch_job.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if (batch_job.get("spec") or {}).get("ttlSecondsAfterFinished") == ttl:
        return None
    if not _batch_job_ended(batch_job):
        return None  # not finished (cancelled or suspended Jobs keep no TTL)
    return {"spec": {"ttlSecondsAfterFinished": ttl}}


def _apply_children(
    cluster: Cluster,
    job: FineTuneJob,
    children: list[dict[str, Any]],
    outcome: Outcome,
    *,
    create_first: bool = False,
) -> tuple[dict[str, Any] | None, Problem | None]:
    """Create what is missing, sync what may change; returns (the batch Job, a problem).

    A new job (`create_first`) creates them without reading first (after a restart,
    AlreadyExists returns the existing object), the ConfigMap and the Service at once, then the
    Job: two round trips instead of three, and the Job — whose pods mount the ConfigMap — is
    never created beside a ConfigMap that is not ours. Otherwise one child after the other, read
    first: in the steady state a cycle costs reads only. A name taken by a foreign object stops
    the cycle before the Job is created."""
    created_at_once: dict[int, tuple[dict[str, Any], bool]] = {}
    if create_first:
        supporting = [i for i, child in enumerate(children) if child["kind"] != "Job"]
        results = cluster.create_all([children[i] for i in supporting])
        created_at_once = dict(zip(supporting, results, strict=True))
    batch_job: dict[str, Any] | None = None
    for index, desired in enumerate(children):
        kind = desired["kind"]
        meta = desired["metadata"]
        if index in created_at_once:
            current, created = created_at_once[index]
        elif create_first:
            current, created = cluster.create(desired)
        else:
            existing = cluster.get(kind, meta["namespace"], meta["name"])
            current, created = cluster.create(desired) if existing is None else (existing, False)
        if created:
            outcome.created.append(f"{kind}/{meta['name']}")
        elif not _owned_by(current, job.ref.uid):
            return None, Problem(
                Reason.NAME_CONFLICT,
                f"{kind} {meta['name']!r} exists and is not owned by this FineTuneJob: delete or rename it",
                permanent=False,
            )
        else:
            patch = _sync_patch(desired, current)
            if patch:
                current = cluster.patch(kind, meta["namespace"], meta["name"], patch)
                outcome.patched.append(f"{kind}/{meta['name']}")
        if kind == "Job":
            batch_job = current
    return batch_job, None


def _batch_job_ended(batch_job: Mapping[str, Any]) -> bool:
    """The Job controller concluded the Job: condition Complete or Failed is True."""
    conditions = (batch_job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _may_have_pods(batch_job: Mapping[str, Any]) -> bool:
    """False for a Job that never had a pod (just created, or suspended from the start)."""
    job_status = batch_job.get("status") or {}
    counts = ("active", "failed", "succeeded", "terminating", "ready")
    return any(job_status.get(key) for key in counts) or bool(job_status.get("uncountedTerminatedPods"))


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def _sync_patch(desired: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any] | None:
    """What to change on an existing child: the ConfigMap's data, the Job's suspend flag.
    (A Job's pod template is immutable; other spec changes apply to the next FineTuneJob.)
    A Job queued with Kueue (it carries the queue-name label) keeps its suspend flag: Kueue owns
    it, and spec.suspend / spec.cancel deactivate its Workload instead (`_sync_workload`)."""
    if desired["kind"] == "ConfigMap" and desired.get("data") != current.get("data"):
        return {"data": desired["data"]}
    queued = builders.QUEUE_NAME_LABEL in ((current.get("metadata") or {}).get("labels") or {})
    if desired["kind"] == "Job" and not queued:
        want = bool(desired["spec"].get("suspend"))
        if bool((current.get("spec") or {}).get("suspend")) != want:
            return {"spec": {"suspend": want}}
    return None


def _sync_workload(
    cluster: Cluster, job: FineTuneJob, batch_job: Mapping[str, Any], outcome: Outcome, *, apply: bool
) -> kueue.Queue:
    """Read the Workload Kueue keeps for `batch_job`; with `apply`, (de)activate it for the
    FineTuneJob's spec.suspend / spec.cancel. Returns its queue state for the status."""
    uid = str((batch_job.get("metadata") or {}).get("uid") or "")
    workload = cluster.find_workload(job.namespace, uid) if uid else None
    if workload is not None and apply:
        patch = kueue.workload_patch(job, workload)
        if patch is not None:
            workload_name = workload["metadata"]["name"]
            workload = cluster.patch_workload(job.namespace, workload_name, patch)
            outcome.patched.append(f"Workload/{workload_name}")
    return kueue.queue_state(workload)


def _poll(progress: ProgressSource, pods: list[dict[str, Any]], settings: Settings) -> dict[str, Any] | None:
    """Rank 0's progress report, if rank 0 is running."""
    for pod in pods:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        pod_status = pod.get("status") or {}
        if (
            annotations.get(builders.COMPLETION_INDEX_ANNOTATION) == "0"
            and pod_status.get("phase") == "Running"
            and pod_status.get("podIP")
            and not (pod.get("metadata") or {}).get("deletionTimestamp")
        ):
            return progress(pod_status["podIP"], settings.progress_port)
    return None


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning `old` into `new`: changed keys, None for removed
    keys at any depth, lists replaced whole."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif value != before or key not in old:
            patch[key] = value
    return patch


def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(status)
    if isinstance(out.get("progress"), Mapping):
        out["progress"] = {k: v for k, v in out["progress"].items() if k not in _VOLATILE}
    return out


def _write(
    cluster: Cluster,
    ref: ObjectRef,
    previous: Mapping[str, Any],
    status: FineTuneJobStatus,
    outcome: Outcome,
    now: datetime,
    precondition: str | None = None,
) -> None:
    """One status write if anything changed (only onto `precondition`'s resourceVersion, if
    given); then the events for a phase change."""
    new = status.to_dict()
    outcome.status = new
    outcome.phase = new.get("phase")
    if _comparable(new) == _comparable(previous):
        return
    written = cluster.patch_status(
        ref.namespace, ref.name, merge_patch(previous, new), resource_version=precondition
    )
    outcome.object = written if written.get("metadata") else None
    metrics.STATUS_WRITES.inc()
    outcome.status_written = True
    old_phase = previous.get("phase")
    if new.get("phase") != old_phase or new.get("reason") != previous.get("reason"):
        failed = new.get("phase") == Phase.FAILED.value or bool(
            [
                c
                for c in new.get("conditions") or []
                if c.get("type") == "Stalled" and c.get("status") == "True"
            ]
            and new.get("phase") != Phase.CANCELLED.value
        )
        kind = "Warning" if failed else "Normal"
        reason = str(new.get("reason") or new.get("phase"))
        message = f"{old_phase or 'New'} → {new.get('phase')}: {new.get('message') or ''}".strip()
        cluster.event(ref, type=kind, reason=reason, message=message, now=now)
        outcome.events.append((kind, reason, message))
    skipped = _skipped_message(new)
    if skipped is not None and skipped != _skipped_message(previous):
        cluster.event(ref, type="Warning", reason=Reason.CHECKPOINT_SKIPPED.value, message=skipped, now=now)
        outcome.events.append(("Warning", Reason.CHECKPOINT_SKIPPED.value, skipped))
    dropped = _unknown_fields_message(new)
    if dropped is not None and dropped != _unknown_fields_message(previous):
        cluster.event(ref, type="Warning", reason="UnknownFields", message=dropped, now=now)
        outcome.events.append(("Warning", "UnknownFields", dropped))
    log.info("%s/%s: %s (%s)", ref.namespace, ref.name, new.get("phase"), new.get("reason"))


def _skipped_message(status: Mapping[str, Any]) -> str | None:
    """The event text for a resume that skipped corrupt checkpoints, else None."""
    resumed = status.get("resumedFrom") or {}
    skipped = resumed.get("skipped") or []
    if not skipped:
        return None
    which = "; ".join(f"step {s['step']} ({s['reason']})" for s in skipped)
    return f"resumed from the checkpoint at step {resumed['step']}, skipping {which}"


def _unknown_fields_message(status: Mapping[str, Any]) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == ConditionType.UNKNOWN_FIELDS.value:
            return str(cond.get("message") or "")
    return None
