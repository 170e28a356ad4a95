"""reconcile() of a job queued with Kueue, against the fake cluster; the test plays Kueue.

Kueue owns the batch Job's spec.suspend: the operator must never write it, must deactivate the
Workload for spec.suspend / spec.cancel, and must show Kueue's reason and message in the status.
The real Kueue controller runs in tests/integration/test_kueue.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from finetune_operator.kueue import DEACTIVATED_BY_ANNOTATION, QueueState, queue_state
from finetune_operator.reconcile import BatchJobChanged, Outcome, ReadEverything, reconcile
from tests.operator.factories import NOW, SETTINGS, ftj, pod
from tests.operator.fake import FakeCluster

QUEUE = {"nodes": 1, "queueName": "team-queue"}
PENDING_MESSAGE = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, 1 more needed"


def run(fake: FakeCluster, *, seconds: float = 0, observed_job: dict[str, Any] | None = None) -> Outcome:
    return reconcile(
        fake,
        "team-a",
        "demo",
        settings=SETTINGS,
        now=NOW + timedelta(seconds=seconds),
        known=ReadEverything() if observed_job is None else BatchJobChanged(observed_job),
    )


def set_spec(fake: FakeCluster, **changes: Any) -> None:
    obj = fake.finetunejob()
    obj["spec"].update(changes)
    obj["metadata"]["generation"] += 1


def batch_job(fake: FakeCluster) -> dict[str, Any]:
    return fake.objects[("Job", "team-a", "demo")]


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def workload(
    fake: FakeCluster, *conditions: dict[str, Any], cluster_queue: str | None = None
) -> dict[str, Any]:
    """Kueue's Workload for the Job (created, or its status replaced)."""
    key = ("Workload", "team-a", "job-demo-1a2b3")
    obj = fake.objects.setdefault(
        key,
        {
            "kind": "Workload",
            "metadata": {
                "name": key[2],
                "namespace": "team-a",
                "labels": {"kueue.x-k8s.io/job-uid": batch_job(fake)["metadata"]["uid"]},
            },
            "spec": {"active": True, "queueName": "team-queue"},
        },
    )
    obj["status"] = {"conditions": list(conditions)}
    if cluster_queue:
        obj["status"]["admission"] = {"clusterQueue": cluster_queue}
    return obj


def queued(fake: FakeCluster) -> dict[str, Any]:
    return workload(fake, cond("QuotaReserved", "False", "Pending", PENDING_MESSAGE))


def admitted(fake: FakeCluster) -> None:
    """Kueue admits the Workload and unsuspends the Job; the Job controller starts a pod."""
    workload(
        fake,
        cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
        cond("Admitted", "True", "Admitted", "The workload is admitted"),
        cluster_queue="cq",
    )
    batch_job(fake)["spec"]["suspend"] = False
    batch_job(fake)["status"] = {"active": 1, "startTime": "2026-11-29T06:00:01Z"}
    fake.pods = [pod()]


def test_a_queued_job_is_created_suspended_and_shows_kueues_reason(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    outcome = run(fake)
    assert batch_job(fake)["spec"]["suspend"] is True
    assert batch_job(fake)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Pending", "Queued")
    assert "Kueue has not created a Workload" in outcome.status["message"]

    queued(fake)
    outcome = run(fake, seconds=5)
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Pending", "Queued")
    assert outcome.status["message"] == f"queued in LocalQueue team-queue (Kueue: Pending: {PENDING_MESSAGE})"


def test_the_operator_never_touches_kueues_suspend_flag(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    run(fake)
    queued(fake)
    for seconds in (5, 10):
        run(fake, seconds=seconds)
    assert ("patch", "Job") not in fake.calls, "a queued Job must stay as Kueue left it"
    admitted(fake)
    outcome = run(fake, seconds=15)
    assert outcome.phase == "Running"
    assert ("patch", "Job") not in fake.calls, "an admitted Job must not be re-suspended"
    assert batch_job(fake)["spec"]["suspend"] is False


def test_suspend_deactivates_the_workload_and_resume_reactivates_it(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    run(fake)
    admitted(fake)
    run(fake)
    set_spec(fake, suspend=True)
    outcome = run(fake, seconds=5)
    wl = fake.objects[("Workload", "team-a", "job-demo-1a2b3")]
    assert outcome.patched == ["Workload/job-demo-1a2b3"]
    assert wl["spec"]["active"] is False
    assert wl["metadata"]["annotations"][DEACTIVATED_BY_ANNOTATION] == "spec.suspend"
    assert ("patch", "Job") not in fake.calls
    assert outcome.status["reason"] == "Suspending"  # the pod still saves its checkpoint
    # Kueue evicts the deactivated Workload and suspends the Job; the pod exits.
    batch_job(fake)["spec"]["suspend"] = True
    fake.pods = []
    assert run(fake, seconds=10).status["reason"] == "Suspended"

    set_spec(fake, suspend=False)
    outcome = run(fake, seconds=15)
    assert wl["spec"]["active"] is True
    assert DEACTIVATED_BY_ANNOTATION not in wl["metadata"].get("annotations", {})
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Pending", "Queued")


def test_resume_leaves_a_workload_an_administrator_stopped(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    run(fake)
    queued(fake)["spec"]["active"] = False  # kueuectl stop workload
    outcome = run(fake, seconds=5)
    assert ("patch", "Workload") not in fake.calls
    assert outcome.status["reason"] == "Queued"
    set_spec(fake, suspend=True)
    run(fake, seconds=10)
    set_spec(fake, suspend=False)
    run(fake, seconds=15)
    assert fake.objects[("Workload", "team-a", "job-demo-1a2b3")]["spec"]["active"] is False


def test_cancel_of_a_queued_job_deactivates_the_workload_and_ends_cancelled(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    run(fake)
    queued(fake)
    set_spec(fake, cancel=True)
    outcome = run(fake, seconds=5)
    wl = fake.objects[("Workload", "team-a", "job-demo-1a2b3")]
    assert wl["spec"]["active"] is False
    assert wl["metadata"]["annotations"][DEACTIVATED_BY_ANNOTATION] == "spec.cancel"
    assert outcome.phase == "Cancelled"


def test_preemption_is_shown_with_kueues_message(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources=QUEUE))
    run(fake)
    admitted(fake)
    assert run(fake).phase == "Running"
    preempted = (
        "Preempted to accommodate a workload (UID: u2, JobUID: j2) due to prioritization in the ClusterQueue"
    )
    workload(
        fake,
        cond("Evicted", "True", "Preempted", preempted),
        cond("Preempted", "True", "InClusterQueue", preempted),
        cond("QuotaReserved", "True", "QuotaReserved"),
        cond("Admitted", "True", "Admitted"),
        cluster_queue="cq",
    )
    batch_job(fake)["spec"]["suspend"] = True  # Kueue stops the Job; the pod saves a checkpoint
    outcome = run(fake, observed_job=dict(batch_job(fake)), seconds=5)
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Pending", "Preempted")
    assert (
        preempted in outcome.status["message"] and "1 pod(s) saving a checkpoint" in outcome.status["message"]
    )
    assert ("Normal", "Preempted") in [(kind, reason) for kind, reason, _ in fake.events]
    # Requeued: waiting for quota again.
    workload(
        fake,
        cond("Requeued", "True", "Preempted", preempted),
        cond("QuotaReserved", "False", "Pending", PENDING_MESSAGE),
        cond("Evicted", "False", "QuotaReserved"),
    )
    fake.pods = []
    outcome = run(fake, seconds=10)
    assert outcome.status["reason"] == "Preempted"
    assert (
        PENDING_MESSAGE in outcome.status["message"]
        and "resumes from its newest checkpoint" in outcome.status["message"]
    )
    admitted(fake)
    assert run(fake, seconds=15).phase == "Running"


def test_a_job_without_queue_name_reads_no_workload(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    assert ("list", "Workload") not in fake.calls


@pytest.mark.parametrize(
    ("conditions", "active", "state"),
    [
        pytest.param([], True, QueueState.QUEUED, id="new"),
        pytest.param(
            [cond("QuotaReserved", "False", "Pending", "no quota")], True, QueueState.QUEUED, id="pending"
        ),
        pytest.param([cond("Admitted", "True", "Admitted")], True, QueueState.ADMITTED, id="admitted"),
        pytest.param(
            [cond("Evicted", "True", "Preempted", "x")], True, QueueState.PREEMPTED, id="evicted-preempted"
        ),
        pytest.param(
            [cond("Evicted", "True", "ClusterQueueStopped", "x")],
            True,
            QueueState.EVICTED,
            id="queue-stopped",
        ),
        pytest.param([cond("Admitted", "True", "Admitted")], False, QueueState.INACTIVE, id="deactivated"),
    ],
)
def test_queue_state(conditions: list[dict[str, Any]], active: bool, state: QueueState) -> None:
    wl = {"metadata": {"name": "w"}, "spec": {"active": active}, "status": {"conditions": conditions}}
    assert queue_state(wl).state is state
