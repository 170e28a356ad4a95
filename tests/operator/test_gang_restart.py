"""Gang restarts of a multi-node job against the fake cluster: one failed pod restarts all pods
(`finetune_operator.gang`), counted once, reported as events and conditions, bounded by
runPolicy.backoffLimit, and safe against the operator dying between the write and the delete."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta

from finetune_operator.reconcile import Outcome, reconcile
from tests.operator.factories import NOW, SETTINGS, condition, ftj, pod
from tests.operator.fake import Crash, FakeCluster

RANK1_CAUSE = "OSError: Unrecognized model in /var/cache/finetune/gguf/x"


def run(fake: FakeCluster, *, seconds: float = 0) -> Outcome:
    return reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW + timedelta(seconds=seconds))


def summary(rank: int, message: str, failed_at: str, reason: str = "Error") -> str:
    return json.dumps(
        {"phase": "Failed", "exitCode": 1, "reason": reason, "message": message, "step": 7,
         "totalSteps": 20, "runUri": None, "rank": rank, "failedAt": failed_at}
    )  # fmt: skip


def two_nodes(fake: FakeCluster, backoff_limit: int = 2) -> None:
    fake.put_finetunejob(
        ftj(resources={"nodes": 2}, hyperparameters={"maxSteps": 20, "batchSize": 8},
            runPolicy={"backoffLimit": backoff_limit})
    )  # fmt: skip
    run(fake)
    job = fake.objects[("Job", "team-a", "demo")]
    job["metadata"]["uid"] = "job-uid-1"


def rank1_fails(fake: FakeCluster) -> None:
    """Rank 1 dies first; rank 0 then fails on the closed connection (later, in the same second)."""
    job = fake.objects[("Job", "team-a", "demo")]
    job["status"] = {
        "startTime": "2026-11-29T06:00:01Z",
        "failed": 2,
        "conditions": [
            condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        ],
    }
    fake.pods = [
        pod(0, "Failed", exit_code=1, finished_at="2026-11-29T06:05:03Z",
            message=summary(0, "DistStoreError: Connection closed by peer", "2026-11-29T06:05:02.950Z")),
        pod(1, "Failed", exit_code=1, finished_at="2026-11-29T06:05:03Z",
            message=summary(1, RANK1_CAUSE, "2026-11-29T06:05:02.120Z")),
    ]  # fmt: skip


def test_one_failed_pod_restarts_the_gang_once(fake: FakeCluster) -> None:
    two_nodes(fake)
    fake.pods = [pod(0), pod(1, ip="127.0.0.6")]
    fake.objects[("Job", "team-a", "demo")]["status"] = {"startTime": "2026-11-29T06:00:01Z", "active": 2}
    assert run(fake, seconds=5).phase == "Running"
    fake.events.clear()

    rank1_fails(fake)
    outcome = run(fake, seconds=10)

    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"], status["restarts"]) == ("Running", "Restarting", 1)
    assert "restart 1 of runPolicy.backoffLimit 2" in status["message"]
    assert RANK1_CAUSE in status["message"], "the rank that failed first names the cause"
    assert "Connection closed" not in status["message"]
    reconciling = {c["type"]: c for c in status["conditions"]}["Reconciling"]
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Restarting")
    assert outcome.deleted == ["Job/demo"], "the failed attempt's Job is deleted (its pods first)"
    assert fake.calls[-1] == ("delete", "Job")
    assert [(kind, reason) for kind, reason, _ in fake.events] == [
        ("Normal", "Restarting"),
        ("Warning", "PodFailed"),
    ]
    assert RANK1_CAUSE in fake.events[1][2] and "pod demo-1" in fake.events[1][2]

    # While the old Job is being deleted: still restarting, nothing counted twice.
    run(fake, seconds=12)
    assert fake.finetunejob()["status"]["restarts"] == 1
    # Gone: the next cycle creates attempt 1, its pods resume from the newest checkpoint.
    fake.finish_deletion("Job", "team-a", "demo")
    outcome = run(fake, seconds=15)
    assert outcome.created == ["Job/demo"]
    job = fake.objects[("Job", "team-a", "demo")]
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "1"
    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"], status["restarts"]) == ("Running", "Restarting", 1)
    # Both pods running again: training.
    job["status"] = {"startTime": "2026-11-29T06:06:01Z", "active": 2}
    fake.pods = [pod(0), pod(1, ip="127.0.0.6")]
    run(fake, seconds=20)
    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"], status["restarts"]) == ("Running", "Training", 1)


def test_operator_dying_between_the_write_and_the_delete_counts_once(fake: FakeCluster) -> None:
    two_nodes(fake)
    rank1_fails(fake)
    fake.crash_on = ("delete", "Job")
    with contextlib.suppress(Crash):
        run(fake, seconds=10)
    assert fake.finetunejob()["status"]["restarts"] == 1
    outcome = run(fake, seconds=11)  # the Job of attempt 0 is stale now: deleted, not counted
    assert outcome.deleted == ["Job/demo"]
    assert fake.finetunejob()["status"]["restarts"] == 1
    assert [reason for _, reason, _ in fake.events].count("PodFailed") == 1


def test_restarts_are_bounded_by_the_backoff_limit(fake: FakeCluster) -> None:
    two_nodes(fake, backoff_limit=0)
    rank1_fails(fake)
    job = fake.objects[("Job", "team-a", "demo")]
    job["status"]["conditions"] = [
        condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    ]
    outcome = run(fake, seconds=10)
    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert RANK1_CAUSE in status["message"] and "pod demo-1" in status["message"]
    assert outcome.deleted == []


def test_invalid_input_is_not_restarted(fake: FakeCluster) -> None:
    two_nodes(fake)
    job = fake.objects[("Job", "team-a", "demo")]
    job["status"] = {"failed": 1, "conditions": [condition("Failed", "PodFailurePolicy", "exit code 3")]}
    fake.pods = [pod(1, "Failed", exit_code=3)]
    outcome = run(fake, seconds=10)
    assert fake.finetunejob()["status"]["phase"] == "Failed"
    assert outcome.deleted == []


def test_a_rank_killed_for_memory_is_not_restarted(fake: FakeCluster) -> None:
    """OOMKilled on any rank: the same config runs out again, so no gang restart."""
    two_nodes(fake)
    rank1_fails(fake)
    fake.pods[1]["status"]["containerStatuses"][0]["state"]["terminated"].update(
        exitCode=137, reason="OOMKilled"
    )
    outcome = run(fake, seconds=10)
    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "OOMKilled")
    assert outcome.deleted == [] and status.get("restarts", 0) == 0


def test_a_rank_whose_pod_is_already_gone_is_named_by_its_rank(fake: FakeCluster) -> None:
    """Rank 1's pod was deleted and, counted by the Job controller, removed before the operator
    looked: the restart still names the cause."""
    two_nodes(fake)
    rank1_fails(fake)
    fake.pods = [pod(0)]  # rank 0 still running (being stopped), rank 1 gone
    run(fake, seconds=10)
    message = fake.finetunejob()["status"]["message"]
    assert "after the pod of rank 1 is gone (deleted, evicted or lost with its node)" in message


def test_suspended_job_is_not_restarted(fake: FakeCluster) -> None:
    two_nodes(fake)
    rank1_fails(fake)
    obj = fake.finetunejob()
    obj["spec"]["suspend"] = True
    obj["metadata"]["generation"] += 1
    outcome = run(fake, seconds=10)
    assert outcome.deleted == []


def test_a_lost_peer_is_a_symptom_even_when_it_is_reported_first(fake: FakeCluster) -> None:
    """Clocks of two nodes differ by milliseconds: a PeerLost failure never names the cause
    while another pod failed for a reason of its own."""
    two_nodes(fake)
    rank1_fails(fake)
    fake.pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = summary(
        0, "RuntimeError: [gloo] Connection closed by peer", "2026-11-29T06:05:01.000Z", reason="PeerLost"
    )
    run(fake, seconds=10)
    message = fake.finetunejob()["status"]["message"]
    assert RANK1_CAUSE in message and "gloo" not in message


def _deleted(item: dict[str, object], at: str = "2026-11-29T06:05:31Z", grace: int = 30) -> dict[str, object]:
    meta = item["metadata"]
    assert isinstance(meta, dict)
    meta.update(deletionTimestamp=at, deletionGracePeriodSeconds=grace)
    return item


def _running(fake: FakeCluster) -> None:
    fake.pods = [pod(0), pod(1, ip="127.0.0.6")]
    fake.objects[("Job", "team-a", "demo")]["status"] = {"startTime": "2026-11-29T06:00:01Z", "active": 2}


def test_a_deleted_pod_is_remembered_as_the_cause_after_it_is_gone(fake: FakeCluster) -> None:
    """Seen once while its peers still run, a deleted pod stays the cause: when the Job controller
    has removed it and stopped rank 0 too, the restart, its event and the status still name it."""
    two_nodes(fake)
    _running(fake)
    run(fake, seconds=5)
    fake.pods[1] = _deleted(fake.pods[1])  # kubectl delete pod demo-1-abcde
    run(fake, seconds=6)
    recorded = fake.finetunejob()["status"]["lastFailure"]
    assert recorded == {
        "attempt": 0, "rank": 1, "pod": "demo-1-abcde", "reason": "Deleted",
        "message": "pod demo-1-abcde (rank 1) was deleted", "time": "2026-11-29T06:05:01.000Z",
    }  # fmt: skip
    assert fake.finetunejob()["status"]["phase"] == "Running"

    # Later: rank 1 counted and removed; rank 0 stopped by the Job controller (itself deleted now).
    rank1_fails(fake)
    fake.pods = [_deleted(pod(0), at="2026-11-29T06:05:34Z")]
    fake.events.clear()
    run(fake, seconds=10)

    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"], status["restarts"]) == ("Running", "Restarting", 1)
    assert status["message"].endswith("after pod demo-1-abcde (rank 1) was deleted"), status["message"]
    assert status["lastFailure"] == recorded
    assert ("Warning", "PodFailed", "pod demo-1-abcde (rank 1) was deleted") in fake.events
    reconciling = {c["type"]: c for c in status["conditions"]}["Reconciling"]
    assert "pod demo-1-abcde (rank 1) was deleted" in reconciling["message"]

    # The next attempt runs: the cause of the restart stays in the status.
    fake.finish_deletion("Job", "team-a", "demo")
    run(fake, seconds=15)
    _running(fake)
    run(fake, seconds=20)
    status = fake.finetunejob()["status"]
    assert (status["reason"], status["lastFailure"]) == ("Training", recorded)


def test_the_pods_the_job_controller_stops_are_never_the_cause(fake: FakeCluster) -> None:
    """Rank 1 already failed (gone); rank 0 being deleted is the Job controller ending the
    attempt, even in a cycle whose Job copy does not say so yet."""
    two_nodes(fake)
    _running(fake)
    run(fake, seconds=5)
    fake.pods = [_deleted(pod(0))]  # rank 1 gone, the Job's status not updated yet
    run(fake, seconds=6)
    assert "lastFailure" not in fake.finetunejob()["status"]
    rank1_fails(fake)
    fake.pods = [_deleted(pod(0))]
    run(fake, seconds=10)
    assert fake.finetunejob()["status"]["lastFailure"]["reason"] == "PodGone"
    assert fake.finetunejob()["status"]["lastFailure"]["rank"] == 1


def test_an_earlier_failure_seen_later_replaces_the_recorded_one(fake: FakeCluster) -> None:
    """Pod status reaches the API in any order: of the same attempt, the earliest own failure wins."""
    two_nodes(fake)
    _running(fake)
    run(fake, seconds=5)
    fake.pods[0] = pod(0, "Failed", exit_code=1, finished_at="2026-11-29T06:05:03Z",
                       message=summary(0, "RuntimeError: gloo timeout", "2026-11-29T06:05:02.950Z"))  # fmt: skip
    run(fake, seconds=6)
    assert fake.finetunejob()["status"]["lastFailure"]["rank"] == 0
    rank1_fails(fake)
    fake.pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = summary(
        0, "RuntimeError: gloo timeout", "2026-11-29T06:05:02.950Z"
    )
    run(fake, seconds=10)
    status = fake.finetunejob()["status"]
    assert status["lastFailure"]["rank"] == 1 and RANK1_CAUSE in status["lastFailure"]["message"]
    assert RANK1_CAUSE in status["message"]


def test_an_evicted_pod_is_named_with_the_eviction_reason(fake: FakeCluster) -> None:
    two_nodes(fake)
    _running(fake)
    run(fake, seconds=5)
    evicted = _deleted(fake.pods[1])
    evicted["status"]["conditions"] = [  # type: ignore[index]
        condition("DisruptionTarget", "EvictionByEvictionAPI", "Eviction API: evicting")
        | {"lastTransitionTime": "2026-11-29T06:05:01Z"}
    ]
    run(fake, seconds=6)
    recorded = fake.finetunejob()["status"]["lastFailure"]
    assert (recorded["rank"], recorded["reason"]) == (1, "EvictionByEvictionAPI")
    assert (
        recorded["message"]
        == "pod demo-1-abcde (rank 1) was disrupted (EvictionByEvictionAPI): Eviction API: evicting"
    )
