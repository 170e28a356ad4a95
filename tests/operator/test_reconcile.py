"""reconcile() against the fake cluster: children, status writes, idempotency, restart safety."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from finetune_operator import metrics
from finetune_operator.k8s import ApiError
from finetune_operator.reconcile import (
    BatchJobChanged,
    JustCreated,
    Outcome,
    ReadEverything,
    merge_patch,
    reconcile,
)
from tests.operator.factories import NOW, SETTINGS, UID, condition, ftj, pod, progress_report
from tests.operator.fake import Crash, FakeCluster

CHILDREN = [("ConfigMap", "demo-config"), ("Job", "demo"), ("Service", "demo")]


class FakeProgress:
    def __init__(self, report: dict[str, Any] | None) -> None:
        self.report = report
        self.calls: list[tuple[str, int]] = []

    def __call__(self, pod_ip: str, port: int) -> dict[str, Any] | None:
        self.calls.append((pod_ip, port))
        return copy.deepcopy(self.report)


def run(fake: FakeCluster, *, seconds: float = 0, progress: FakeProgress | None = None) -> Outcome:
    return reconcile(
        fake, "team-a", "demo", settings=SETTINGS, now=NOW + timedelta(seconds=seconds), progress=progress
    )


def set_spec(fake: FakeCluster, **changes: Any) -> None:
    obj = fake.finetunejob()
    obj["spec"].update(changes)
    obj["metadata"]["generation"] += 1


def job_runs(fake: FakeCluster, *pods: dict[str, Any], **status: Any) -> None:
    """What the Job controller and kubelet would report."""
    fake.objects[("Job", "team-a", "demo")]["status"] = {"startTime": "2026-11-29T06:00:01Z", **status}
    fake.pods = list(pods)


def test_first_cycle_creates_children_and_writes_status_once(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    outcome = run(fake)
    assert fake.children() == CHILDREN
    assert outcome.created == ["ConfigMap/demo-config", "Service/demo", "Job/demo"]
    assert fake.writes() == [
        ("create", "ConfigMap"),
        ("create", "Service"),
        ("create", "Job"),
        ("patch", "FineTuneJob/status"),
        ("event", "Event"),
    ]
    assert ("list", "Pod") not in fake.calls, "a Job just created has no pods to list"
    status = fake.finetunejob()["status"]
    assert (status["phase"], status["reason"], status["runUri"]) == (
        "Pending",
        "WaitingForPods",
        f"s3://runs/team-a/demo/{UID}/",
    )
    assert fake.events == [("Normal", "WaitingForPods", "New → Pending: waiting for pods to start")]


def test_second_cycle_writes_nothing(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    fake.calls.clear()
    outcome = run(fake, seconds=30)
    assert fake.writes() == [] and not outcome.status_written
    assert fake.children() == CHILDREN


def test_running_then_succeeded(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1, ready=1)
    assert run(fake, seconds=5).phase == "Running"
    assert fake.finetunejob()["status"]["startTime"] == "2026-11-29T06:00:01Z"
    summary = '{"phase":"Succeeded","exitCode":0,"reason":"Completed","message":"ok","step":100,"totalSteps":100,"runUri":null}'
    job_runs(
        fake,
        pod(phase="Succeeded", exit_code=0, message=summary),
        succeeded=1,
        conditions=[condition("Complete")],
    )
    outcome = run(fake, seconds=60)
    assert outcome.phase == "Succeeded"
    status = fake.finetunejob()["status"]
    assert status["progress"]["steps"] == "100/100"
    assert [e[1] for e in fake.events] == ["WaitingForPods", "Training", "Succeeded"]


def test_progress_polled_from_rank_zero_only(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(resources={"nodes": 2}))
    run(fake)
    job_runs(fake, pod(1, ip="127.0.0.9"), pod(0, ip="127.0.0.8"), active=2)
    source = FakeProgress(progress_report())
    run(fake, progress=source)
    assert source.calls == [("127.0.0.8", 9090)]
    assert fake.finetunejob()["status"]["progress"]["steps"] == "40/100"


def test_unreachable_progress_keeps_the_last_known(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    run(fake, progress=FakeProgress(progress_report()))
    fake.calls.clear()
    run(fake, seconds=10, progress=FakeProgress(None))
    assert fake.writes() == []
    assert fake.finetunejob()["status"]["progress"]["step"] == 40


def test_a_resume_that_skipped_a_corrupt_checkpoint_is_in_status_and_one_warning(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    reason = "corrupt: checkpoints/step-000020/state/__0_0.distcp: SHA-256 mismatch"
    resumed = {"step": 10, "skipped": [{"step": 20, "reason": reason}]}
    fake.events.clear()
    run(fake, progress=FakeProgress(progress_report(step=12, resumedFrom=resumed)))
    assert fake.finetunejob()["status"]["resumedFrom"] == resumed
    warnings = [(kind, message) for kind, why, message in fake.events if why == "CheckpointSkipped"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning"
    assert "resumed from the checkpoint at step 10, skipping step 20" in warnings[0][1]
    assert reason in warnings[0][1]
    run(fake, seconds=10, progress=FakeProgress(progress_report(step=14, resumedFrom=resumed)))
    assert len([e for e in fake.events if e[1] == "CheckpointSkipped"]) == 1, "said once"


def test_same_progress_again_is_not_rewritten(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    run(fake, progress=FakeProgress(progress_report()))
    fake.calls.clear()
    run(fake, seconds=10, progress=FakeProgress(progress_report()))
    assert fake.writes() == [], "only updatedAt changed: no write"


def test_suspend_and_resume_patch_the_job(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    run(fake)
    set_spec(fake, suspend=True)
    outcome = run(fake)
    assert outcome.patched == ["Job/demo"]
    assert fake.objects[("Job", "team-a", "demo")]["spec"]["suspend"] is True
    fake.pods = []
    assert run(fake).phase == "Suspended"
    set_spec(fake, suspend=False)
    outcome = run(fake)
    assert fake.objects[("Job", "team-a", "demo")]["spec"]["suspend"] is False
    assert outcome.phase == "Pending"


def test_cancel_ends_cancelled_and_never_restarts(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    run(fake)
    set_spec(fake, cancel=True)
    assert run(fake).phase == "Running"  # pods still saving their checkpoint
    assert fake.objects[("Job", "team-a", "demo")]["spec"]["suspend"] is True
    fake.pods = []
    assert run(fake).phase == "Cancelled"
    fake.calls.clear()
    del fake.objects[("Job", "team-a", "demo")]
    assert run(fake).phase == "Cancelled"
    assert ("create", "Job") not in fake.calls


def test_finished_job_is_not_recreated_after_ttl(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, succeeded=1, conditions=[condition("Complete")])
    run(fake)
    status = copy.deepcopy(fake.finetunejob()["status"])
    del fake.objects[("Job", "team-a", "demo")]
    fake.calls.clear()
    run(fake, seconds=600)
    assert fake.writes() == []
    assert fake.finetunejob()["status"] == status


def test_unknown_model_fails_without_children_or_retry(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(model={"name": "gpt-17"}))
    outcome = run(fake)
    assert fake.children() == []
    assert (outcome.phase, outcome.status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.model.name: unknown catalog model 'gpt-17'" in outcome.status["message"]
    assert fake.events[0][0] == "Warning"
    fake.calls.clear()
    run(fake, seconds=60)
    assert fake.writes() == []


def test_fixing_an_invalid_spec_recovers(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(model={"name": "gpt-17"}))
    run(fake)
    set_spec(fake, model={"name": "pythia-70m"})
    assert run(fake).phase == "Pending"
    assert fake.children() == CHILDREN


def test_schema_invalid_object_becomes_failed(fake: FakeCluster) -> None:
    obj = ftj()
    obj["spec"]["hyperparameters"] = {"dropout": 7}
    fake.put_finetunejob(obj)
    outcome = run(fake)
    assert outcome.phase == "Failed"
    assert "spec.hyperparameters.dropout" in outcome.status["message"]


@pytest.mark.parametrize("cycle", ["read-first", "fresh-create"])
def test_name_taken_by_a_foreign_object_stalls(fake: FakeCluster, cycle: str) -> None:
    """No Job (whose pods would mount the foreign ConfigMap), also when a new job creates its
    children without reading them first."""
    obj = ftj()
    fake.put_finetunejob(obj)
    fake.objects[("ConfigMap", "team-a", "demo-config")] = {
        "kind": "ConfigMap",
        "metadata": {"name": "demo-config", "namespace": "team-a"},
        "data": {},
    }
    if cycle == "fresh-create":
        outcome = reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=JustCreated(obj))
    else:
        outcome = run(fake)
    assert (outcome.phase, outcome.status["reason"]) == ("Pending", "NameConflict")
    assert ("Job", "demo") not in fake.children()
    assert {c["type"]: c["status"] for c in outcome.status["conditions"]}["Stalled"] == "True"


def test_config_map_follows_spec_changes(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    set_spec(fake, evaluation={"everySteps": 7})
    outcome = run(fake)
    assert outcome.patched == ["ConfigMap/demo-config"]
    assert "everySteps: 7" in fake.objects[("ConfigMap", "team-a", "demo-config")]["data"]["config.yaml"]


def test_api_errors_propagate_for_retry(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    fake.fail_on = ("create", "Job")
    before = metrics.RECONCILES.labels(trigger="event", result="error")._value.get()
    with pytest.raises(ApiError):
        run(fake)
    assert metrics.RECONCILES.labels(trigger="event", result="error")._value.get() == before + 1


def test_deleted_or_deleting_job_is_left_alone(fake: FakeCluster) -> None:
    assert run(fake).gone
    obj = ftj()
    obj["metadata"]["deletionTimestamp"] = "2026-11-29T06:00:00Z"
    fake.put_finetunejob(obj)
    assert run(fake).gone
    assert fake.children() == []


CRASH_POINTS = [
    ("create", "ConfigMap"),
    ("create", "Service"),
    ("get", "Job"),
    ("create", "Job"),
    ("patch", "FineTuneJob/status"),
    ("event", "Event"),
]


@pytest.mark.parametrize(
    "crash_on", [pytest.param(point, id=f"{point[0]}-{point[1]}") for point in CRASH_POINTS]
)
def test_restart_at_any_point_converges(crash_on: tuple[str, str]) -> None:
    """The operator dies mid-cycle; the next cycle (after a restart) ends like an uninterrupted one."""
    clean = FakeCluster()
    clean.put_finetunejob(ftj())
    run(clean)
    crashed = FakeCluster()
    crashed.put_finetunejob(ftj())
    crashed.crash_on = crash_on
    with pytest.raises(Crash):
        run(crashed)
    run(crashed, seconds=1)
    run(crashed, seconds=2)
    assert crashed.children() == clean.children() == CHILDREN
    creates = [call for call in crashed.calls if call[0] == "create" and call[1] != "Event"]
    assert len([c for c in creates if c[1] == "Job"]) <= 2  # at most retried, never duplicated
    for key in clean.objects:
        if key[0] != "FineTuneJob":
            clean_obj = {k: v for k, v in clean.objects[key].items() if k != "metadata"}
            crashed_obj = {k: v for k, v in crashed.objects[key].items() if k != "metadata"}
            assert crashed_obj == clean_obj
    assert crashed.finetunejob()["status"]["phase"] == clean.finetunejob()["status"]["phase"]


def test_fresh_object_skips_the_reads(fake: FakeCluster) -> None:
    """On kopf's create cause the body is fresh: no GET of the job, children created directly."""
    obj = ftj()
    fake.put_finetunejob(obj)
    reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=JustCreated(obj))
    assert fake.calls == [
        ("create", "ConfigMap"),
        ("create", "Service"),
        ("create", "Job"),
        ("patch", "FineTuneJob/status"),
        ("event", "Event"),
    ]
    fake.calls.clear()
    reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=JustCreated(obj))  # a retried create
    assert fake.children() == CHILDREN


def test_stored_status_equals_the_derived_one_after_fields_disappear(fake: FakeCluster) -> None:
    """Merge patches must remove nested keys too (progress.etaSeconds goes away on success)."""
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    run(fake, progress=FakeProgress(progress_report()))
    assert "etaSeconds" in fake.finetunejob()["status"]["progress"]
    job_runs(fake, succeeded=1, conditions=[condition("Complete")])
    outcome = run(fake, seconds=30)
    assert fake.finetunejob()["status"] == outcome.status
    assert "etaSeconds" not in fake.finetunejob()["status"]["progress"]
    fake.calls.clear()
    run(fake, seconds=60)
    assert fake.writes() == []


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        pytest.param({"a": 1}, {"a": 1}, {}, id="same"),
        pytest.param({"a": 1, "b": 2}, {"a": 1}, {"b": None}, id="removed"),
        pytest.param({"p": {"x": 1, "y": 2}}, {"p": {"x": 1}}, {"p": {"y": None}}, id="nested-removed"),
        pytest.param({"l": [1, 2]}, {"l": [1]}, {"l": [1]}, id="list-replaced"),
        pytest.param({}, {"p": {"x": 1}}, {"p": {"x": 1}}, id="added"),
    ],
)
def test_merge_patch(old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]) -> None:
    assert merge_patch(old, new) == patch


def test_job_event_refreshes_status_without_touching_children(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    job_runs(fake, pod(), active=1)
    observed = copy.deepcopy(fake.objects[("Job", "team-a", "demo")])
    fake.calls.clear()
    outcome = reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=BatchJobChanged(observed))
    assert outcome.phase == "Running"
    assert fake.calls == [
        ("get", "FineTuneJob"),
        ("list", "Pod"),
        ("patch", "FineTuneJob/status"),
        ("event", "Event"),
    ]


def test_job_event_with_the_cached_job_object_reads_nothing(fake: FakeCluster) -> None:
    """The glue passes the FineTuneJob as last seen: no GET, and the write is conditional."""
    fake.put_finetunejob(ftj())
    cached = run(fake).object
    assert cached is not None and cached["metadata"]["resourceVersion"]
    job_runs(fake, pod(), active=1)
    observed = copy.deepcopy(fake.objects[("Job", "team-a", "demo")])
    fake.calls.clear()
    outcome = reconcile(
        fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=BatchJobChanged(observed, cached=cached)
    )
    assert outcome.phase == "Running"
    assert fake.calls == [("list", "Pod"), ("patch", "FineTuneJob/status"), ("event", "Event")]
    assert outcome.object is not None
    assert outcome.object["metadata"]["resourceVersion"] == fake.finetunejob()["metadata"]["resourceVersion"]


def test_a_stale_cached_job_object_is_read_again_before_anything_is_written(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    stale = run(fake).object
    assert stale is not None
    stored = fake.finetunejob()
    stored["metadata"]["generation"] = 2  # the user changed the spec meanwhile
    stored["spec"]["hyperparameters"]["maxSteps"] = 50
    fake._bump(stored)
    job_runs(fake, pod(), active=1)
    observed = copy.deepcopy(fake.objects[("Job", "team-a", "demo")])
    fake.calls.clear()
    outcome = reconcile(
        fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=BatchJobChanged(observed, cached=stale)
    )
    assert fake.calls == [
        ("list", "Pod"),
        ("patch", "FineTuneJob/status"),  # refused: resourceVersion changed
        ("get", "FineTuneJob"),
        ("list", "Pod"),
        ("patch", "FineTuneJob/status"),
        ("event", "Event"),
    ]
    assert fake.finetunejob()["status"]["observedGeneration"] == 2
    assert outcome.status["observedGeneration"] == 2


def test_a_cycle_that_syncs_children_reads_the_spec(fake: FakeCluster) -> None:
    """Without a Job event the cycle syncs children from the spec: it always reads the spec (a
    cached copy can be passed only with a Job event, `BatchJobChanged`)."""
    fake.put_finetunejob(ftj())
    run(fake)
    fake.calls.clear()
    reconcile(fake, "team-a", "demo", settings=SETTINGS, now=NOW, known=ReadEverything())
    assert fake.calls[0] == ("get", "FineTuneJob")


# ---------------------------------------------------------------------------------------------
# what the API server refuses, what does not exist, results that outlive the Job


REFUSALS = [
    pytest.param(
        ApiError(
            "create",
            "Job",
            422,
            "Unprocessable Entity",
            'Job.batch "demo" is invalid: spec.template.spec.nodeSelector: Invalid value: "x/y/z"',
        ),
        "spec.template.spec.nodeSelector",
        id="422-node-selector",
    ),
    pytest.param(
        ApiError(
            "create",
            "Job",
            422,
            "Unprocessable Entity",
            'Job.batch "demo" is invalid: spec.template.spec.tolerations[0].key: Invalid value',
        ),
        "tolerations[0].key",
        id="422-toleration",
    ),
    pytest.param(
        ApiError("create", "Job", 400, "Bad Request", "json: cannot unmarshal string into Go struct field"),
        "cannot unmarshal",
        id="400-bad-request",
    ),
]


@pytest.mark.parametrize(("error", "detail"), REFUSALS)
def test_a_child_the_api_server_refuses_fails_the_job_once(
    fake: FakeCluster, error: ApiError, detail: str
) -> None:
    """Never a retry loop: Failed/InvalidSpec with the API server's own message."""
    fake.put_finetunejob(ftj())
    fake.refuse[("create", "Job")] = error
    outcome = run(fake)
    assert (outcome.phase, outcome.status["reason"]) == ("Failed", "InvalidSpec")
    assert (
        "the API server refused the Job: " in outcome.status["message"]
        and detail in outcome.status["message"]
    )
    assert fake.events[-1][0] == "Warning"
    fake.calls.clear()
    run(fake, seconds=60)
    assert fake.writes() == [], "the same refusal is not retried nor rewritten"


@pytest.mark.parametrize(
    ("verb", "kind", "status", "message"),
    [
        pytest.param(
            "patch",
            "ConfigMap",
            422,
            'ConfigMap "demo-config" is invalid: []: Too long: must have at most 1048576 bytes',
            id="patch-422-configmap-too-long",
        ),
        pytest.param(
            "patch", "ConfigMap", 413, "Request entity too large: limit is 3145728", id="patch-413-configmap"
        ),
        pytest.param(
            "patch", "ConfigMap", 400, "error decoding patch: invalid character", id="patch-400-configmap"
        ),
        pytest.param(
            "create",
            "ConfigMap",
            413,
            "Request entity too large: limit is 3145728",
            id="create-413-configmap",
        ),
        pytest.param("create", "Job", 413, "Request entity too large: limit is 3145728", id="create-413-job"),
    ],
)
def test_a_child_refused_on_create_or_patch_fails_the_job_once(
    fake: FakeCluster, verb: str, kind: str, status: int, message: str
) -> None:
    """A patch of an existing child (the ConfigMap of a Pending job whose spec changed) and a
    body too large (413) are refused for what they are, like a 422 on create: Failed/InvalidSpec
    with the API server's message, never a retry loop; fixing the spec recovers."""
    fake.put_finetunejob(ftj())
    if verb == "patch":
        assert run(fake).phase == "Pending"
        set_spec(fake, hyperparameters={"learningRate": 0.001, "maxSteps": 7})
    fake.refuse[(verb, kind)] = ApiError(verb, kind, status, "refused", message)
    outcome = run(fake, seconds=30)
    assert (outcome.phase, outcome.status["reason"]) == ("Failed", "InvalidSpec")
    assert f"the API server refused the {kind}: {message}" in outcome.status["message"]
    assert fake.events[-1][0] == "Warning"
    fake.calls.clear()
    run(fake, seconds=90)
    assert fake.writes() == [], "the same refusal is not retried nor rewritten"
    del fake.refuse[(verb, kind)]
    set_spec(fake, hyperparameters={"learningRate": 0.002, "maxSteps": 7})
    recovered = run(fake, seconds=120)
    assert recovered.phase == "Pending" and recovered.status["reason"] != "InvalidSpec"
    assert ("ConfigMap", "demo-config") in fake.children() and ("Job", "demo") in fake.children()


def test_a_refused_job_recovers_when_the_spec_is_fixed(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    fake.refuse[("create", "Job")] = ApiError("create", "Job", 422, "Unprocessable Entity", "invalid")
    run(fake)
    del fake.refuse[("create", "Job")]
    set_spec(fake, resources={"nodes": 1})
    assert run(fake).phase == "Pending"
    assert ("Job", "demo") in fake.children()


def test_a_forbidden_child_stalls_and_is_retried(fake: FakeCluster) -> None:
    """403 (a ResourceQuota, an admission policy): outside the spec, so Pending + Stalled."""
    fake.put_finetunejob(ftj())
    fake.refuse[("create", "Job")] = ApiError(
        "create", "Job", 403, "Forbidden", 'jobs.batch "demo" is forbidden: exceeded quota: team-quota'
    )
    outcome = run(fake)
    assert (outcome.phase, outcome.status["reason"]) == ("Pending", "CreateForbidden")
    assert "exceeded quota: team-quota" in outcome.status["message"]
    stalled = {c["type"]: c["status"] for c in outcome.status["conditions"]}
    assert stalled["Stalled"] == "True"
    del fake.refuse[("create", "Job")]
    assert run(fake, seconds=30).status["reason"] == "WaitingForPods"


def test_transient_api_errors_still_propagate(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    fake.refuse[("create", "Job")] = ApiError(
        "create", "Job", 503, "Service Unavailable", "etcd leader changed"
    )
    with pytest.raises(ApiError):
        run(fake)


@pytest.mark.parametrize(
    ("resources", "reason", "fragment", "fix"),
    [
        pytest.param(
            {"serviceAccountName": "trainer"},
            "ServiceAccountNotFound",
            "spec.resources.serviceAccountName: ServiceAccount 'trainer' does not exist in namespace 'team-a'",
            ("ServiceAccount", "team-a", "trainer"),
            id="service-account",
        ),
        pytest.param(
            {"priorityClassName": "batch-high"},
            "PriorityClassNotFound",
            "spec.resources.priorityClassName: PriorityClass 'batch-high' does not exist",
            ("PriorityClass", "", "batch-high"),
            id="priority-class",
        ),
        pytest.param(
            {"serviceAccountName": "trainer", "priorityClassName": "batch-high"},
            "ServiceAccountNotFound",
            "ServiceAccount 'trainer'",
            ("ServiceAccount", "team-a", "trainer"),
            id="both-service-account-first",
        ),
    ],
)
def test_missing_references_stall_with_the_field_named(
    fake: FakeCluster, resources: dict[str, Any], reason: str, fragment: str, fix: tuple[str, str, str]
) -> None:
    fake.put_finetunejob(ftj(resources=resources))
    outcome = run(fake)
    assert (outcome.phase, outcome.status["reason"]) == ("Pending", reason)
    assert fragment in outcome.status["message"]
    assert ("Job", "demo") not in fake.children(), "no Job whose pods cannot be created"
    assert {c["type"]: c["status"] for c in outcome.status["conditions"]}["Stalled"] == "True"
    fake.objects[fix] = {"metadata": {"name": fix[2]}}
    fake.objects[("ServiceAccount", "team-a", "trainer")] = {"metadata": {"name": "trainer"}}
    fake.objects[("PriorityClass", "", "batch-high")] = {"metadata": {"name": "batch-high"}}
    assert run(fake, seconds=30).status["reason"] == "WaitingForPods"
    assert ("Job", "demo") in fake.children()


@pytest.mark.parametrize("ttl", [0, 1, 3600])
def test_ttl_is_set_only_after_the_result_is_recorded(fake: FakeCluster, ttl: int) -> None:
    fake.put_finetunejob(ftj(runPolicy={"ttlSecondsAfterFinished": ttl}))
    run(fake)
    assert "ttlSecondsAfterFinished" not in fake.objects[("Job", "team-a", "demo")]["spec"]
    job_runs(fake, pod(0, "Running"))
    run(fake)
    assert "ttlSecondsAfterFinished" not in fake.objects[("Job", "team-a", "demo")]["spec"], "running"
    summary = '{"exitCode": 0, "step": 100, "totalSteps": 100, "finalUri": "s3://runs/x/final/"}'
    job_runs(
        fake,
        pod(0, "Succeeded", exit_code=0, message=summary),
        succeeded=1,
        conditions=[condition("Complete")],
    )
    fake.calls.clear()
    outcome = run(fake)
    assert outcome.phase == "Succeeded" and "final model in s3://runs/x/final/" in outcome.status["message"]
    status_write = fake.calls.index(("patch", "FineTuneJob/status"))
    job_patch = fake.calls.index(("patch", "Job"))
    assert status_write < job_patch, "the TTL starts only once the result is in the status"
    assert fake.objects[("Job", "team-a", "demo")]["spec"]["ttlSecondsAfterFinished"] == ttl
    # the TTL controller deletes the Job and its pods: the result stays, nothing is re-created
    del fake.objects[("Job", "team-a", "demo")]
    fake.pods = []
    fake.calls.clear()
    run(fake, seconds=ttl + 1)
    assert fake.writes() == []
    assert fake.finetunejob()["status"]["phase"] == "Succeeded"


def test_a_job_that_finished_while_the_operator_was_away_gets_its_start_time(fake: FakeCluster) -> None:
    """Created, then the operator is down while the pods run and finish."""
    fake.put_finetunejob(ftj())
    run(fake)
    assert "startTime" not in fake.finetunejob()["status"]
    job_runs(fake, pod(0, "Succeeded", exit_code=0), succeeded=1, conditions=[condition("Complete")])
    status = run(fake, seconds=3600).status
    assert status["phase"] == "Succeeded"
    assert status["startTime"] == "2026-11-29T06:00:01Z", "the Job's own start, not the operator's clock"


@pytest.mark.parametrize(
    "job_conditions",
    [
        pytest.param([], id="replacement-pod-running"),
        pytest.param([condition("Failed", "BackoffLimitExceeded", "too many")], id="retries-used-up"),
    ],
)
def test_killed_for_memory_fails_at_once_says_what_to_change_and_stops_the_job(
    fake: FakeCluster, job_conditions: list[dict[str, Any]]
) -> None:
    """OOMKilled (the runtime's reason) is not retried: the Job controller has already started a
    replacement pod, which the operator stops by suspending the Job."""
    fake.put_finetunejob(ftj(runPolicy={"backoffLimit": 3}))
    run(fake)
    failed = pod(0, "Failed", exit_code=137, reason="OOMKilled")
    if job_conditions:
        job_runs(fake, failed, failed=1, conditions=job_conditions)
    else:
        job_runs(fake, failed, pod(0, "Running"), failed=1, active=1)
    outcome = run(fake)
    assert (outcome.phase, outcome.status["reason"]) == ("Failed", "OOMKilled")
    message = outcome.status["message"]
    for advice in (
        "out of memory",
        "hyperparameters.microBatchSize",
        "gradientCheckpointing",
        "resources.memory",
    ):
        assert advice in message
    job = fake.objects[("Job", "team-a", "demo")]
    assert bool(job["spec"].get("suspend")) is (not job_conditions), (
        "an unfinished Job is suspended, a failed one left"
    )
    again = run(fake, seconds=60)
    assert (again.phase, again.status["reason"]) == ("Failed", "OOMKilled"), "terminal: it stays"
    assert not again.patched and not again.created


@pytest.mark.parametrize(
    "terminated",
    [
        pytest.param({"exit_code": 137, "reason": "Error"}, id="sigkill-after-grace-period"),
        pytest.param(
            {"exit_code": 137, "reason": "ContainerStatusUnknown"}, id="container-lost-by-a-restarted-node"
        ),
    ],
)
def test_exit_137_without_oomkilled_is_retried(fake: FakeCluster, terminated: dict[str, Any]) -> None:
    """137 is SIGKILL from anyone; only the OOMKilled reason means memory."""
    fake.put_finetunejob(ftj(runPolicy={"backoffLimit": 3}))
    run(fake)
    job_runs(fake, pod(0, "Failed", **terminated), pod(0, "Running"), failed=1, active=1)
    outcome = run(fake)
    assert outcome.phase == "Running" and outcome.status["reason"] != "OOMKilled"
    assert not fake.objects[("Job", "team-a", "demo")]["spec"].get("suspend")


def test_a_preempted_pod_killed_with_137_is_not_called_out_of_memory(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj())
    run(fake)
    evicted = pod(0, "Failed", exit_code=137, reason="Error")
    evicted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    job_runs(fake, evicted, failed=1, conditions=[condition("Failed", "BackoffLimitExceeded", "too many")])
    assert run(fake).status["reason"] == "BackoffLimitExceeded"


def _applied(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    """What `kubectl apply` (client-side) and Argo CD leave on the object."""
    manifest = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {"name": "demo"},
        "spec": spec,
    }
    obj["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(manifest)
    }


@pytest.mark.parametrize(
    ("typos", "named"),
    [
        pytest.param(
            {"hyperparameters": {"learningrate": 0.1}}, ["spec.hyperparameters.learningrate"], id="lr-typo"
        ),
        pytest.param(
            {"storage": {"accessKey": "AKIAEXAMPLE"}}, ["spec.storage.accessKey"], id="inline-credential"
        ),
        pytest.param(
            {"lora": {"rank": 4, "targets": ["q"]}, "epoch": 2},
            ["spec.epoch", "spec.lora.targets"],
            id="two-at-once",
        ),
    ],
)
def test_fields_a_lenient_client_lost_are_reported(
    fake: FakeCluster, typos: dict[str, Any], named: list[str]
) -> None:
    """A non-strict client's unknown fields are pruned by the API server: the job runs without
    them, and says so in an UnknownFields condition and a Warning event (names, never values)."""
    obj = ftj()
    applied = copy.deepcopy(obj["spec"])
    for key, value in typos.items():
        applied[key] = {**applied.get(key, {}), **value} if isinstance(value, dict) else value
    _applied(obj, applied)
    fake.put_finetunejob(obj)
    outcome = run(fake)
    cond = next(c for c in outcome.status["conditions"] if c["type"] == "UnknownFields")
    assert cond["status"] == "True"
    for path in named:
        assert path in cond["message"]
    assert "AKIAEXAMPLE" not in json.dumps(outcome.status) and "AKIAEXAMPLE" not in json.dumps(fake.events)
    warnings = [e for e in fake.events if e[1] == "UnknownFields"]
    assert len(warnings) == 1 and warnings[0][0] == "Warning"
    assert outcome.phase == "Pending", "the job still runs"
    fake.calls.clear()
    run(fake, seconds=30)
    assert fake.writes() == [], "reported once"
    # the user fixes the manifest and applies again
    fixed = fake.finetunejob()
    _applied(fixed, obj["spec"])
    fixed["metadata"]["generation"] += 1
    assert all(c["type"] != "UnknownFields" for c in run(fake, seconds=60).status["conditions"])
