"""What the API server refuses, what does not exist, what a lenient client loses, results that
outlive their Job, run folders that belong to one object, and secrets that never leak — the
operator on the real local cluster (KopfRunner, RBAC-limited identity) with the stand-in trainer.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.integration.operator_env import (
    OperatorProcess,
    apply,
    children,
    conditions,
    events,
    get_ftj,
    manifest,
    status,
    wait_phase,
)
from tests.kube import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("operator")]

# A label-key prefix of 5 DNS labels: each label fits the CRD's pattern, together they pass 253
# characters, which only the Pod API checks (a 422 when the Job is created).
LONG_PREFIX = ".".join(["a" * 60] * 5)


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        pytest.param(
            {"nodeSelector": {f"{LONG_PREFIX}/gpu": "a100"}}, "nodeSelector", id="node-selector-prefix"
        ),
        pytest.param(
            {"tolerations": [{"key": f"{LONG_PREFIX}/gpu", "operator": "Exists"}]},
            "tolerations",
            id="toleration-prefix",
        ),
    ],
)
def test_a_job_the_api_server_refuses_fails_with_its_message(
    cluster: ClusterHandle, namespace: str, resources: dict[str, Any], fragment: str
) -> None:
    apply(cluster, namespace, manifest("refused", "ok", resources=resources))
    current = wait_phase(cluster, namespace, "refused", "Failed", timeout=60)
    assert current["reason"] == "InvalidSpec"
    assert "the API server refused the Job" in current["message"] and fragment in current["message"]
    assert conditions(current)["Stalled"] == ("True", "InvalidSpec")
    assert "job.batch/refused" not in children(cluster, namespace, "refused")
    warnings = [e for e in events(cluster, namespace, "refused") if e["type"] == "Warning"]
    assert len(warnings) == 1, "reported once, not a retry loop"


def _wait_reason(cluster: ClusterHandle, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        current = status(cluster, namespace, name)
        return current if current.get("reason") == reason else None

    return dict(wait_for(seen, timeout=60, what=f"{name}: {reason}"))


def test_missing_service_account_is_named_then_the_job_runs(cluster: ClusterHandle, namespace: str) -> None:
    apply(cluster, namespace, manifest("nosa", "ok", resources={"serviceAccountName": "trainer"}))
    current = _wait_reason(cluster, namespace, "nosa", "ServiceAccountNotFound")
    assert current["phase"] == "Pending" and conditions(current)["Stalled"][0] == "True"
    assert "spec.resources.serviceAccountName: ServiceAccount 'trainer' does not exist" in current["message"]
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    done = wait_phase(cluster, namespace, "nosa", "Succeeded", timeout=120)
    assert done["progress"]["steps"] == "20/20"


def test_missing_priority_class_is_named_then_the_job_runs(cluster: ClusterHandle, namespace: str) -> None:
    name = f"fault-test-{namespace}"[:60]
    apply(cluster, namespace, manifest("nopc", "ok", resources={"priorityClassName": name}))
    current = _wait_reason(cluster, namespace, "nopc", "PriorityClassNotFound")
    assert f"spec.resources.priorityClassName: PriorityClass '{name}' does not exist" in current["message"]
    cluster.kubectl("create", "priorityclass", name, "--value=10")
    try:
        wait_phase(cluster, namespace, "nopc", "Succeeded", timeout=120)
    finally:
        cluster.kubectl("delete", "priorityclass", name, "--wait=false")


def test_ttl_zero_keeps_the_result_and_never_trains_twice(cluster: ClusterHandle, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        manifest(
            "ttl0",
            "ok",
            runPolicy={"backoffLimit": 0, "terminationGracePeriodSeconds": 30, "ttlSecondsAfterFinished": 0},
        ),
    )
    done = wait_phase(cluster, namespace, "ttl0", "Succeeded", timeout=120)
    wait_for(lambda: "job.batch/ttl0" not in children(cluster, namespace, "ttl0"), timeout=60, what="the TTL")
    assert "final model in" in done["message"], "the termination summary was read before the Job went"
    assert done["latestEvaluation"]["step"] == 20 and done["startTime"]
    run_dir = Path(done["runUri"].removeprefix("file://"))
    # a while later: still one run, the Job not re-created, the status unchanged
    for _ in range(5):
        apply(
            cluster,
            namespace,
            manifest(
                "ttl0",
                "ok",
                runPolicy={
                    "backoffLimit": 0,
                    "terminationGracePeriodSeconds": 30,
                    "ttlSecondsAfterFinished": 0,
                },
            ),
        )
    wait_for(lambda: status(cluster, namespace, "ttl0") == done, timeout=10, what="a stable status")
    assert "job.batch/ttl0" not in children(cluster, namespace, "ttl0")
    assert (run_dir / "standin-starts-rank0").read_text() == "0\n", "trained exactly once"


def test_a_recreated_job_starts_in_a_run_folder_of_its_own(cluster: ClusterHandle, namespace: str) -> None:
    apply(cluster, namespace, manifest("again", "ok"))
    first = wait_phase(cluster, namespace, "again", "Succeeded", timeout=120)
    cluster.kubectl("delete", "ftj", "again", "-n", namespace, "--wait=true")
    apply(cluster, namespace, manifest("again", "ok", hyperparameters={"maxSteps": 10, "batchSize": 4}))
    second = wait_phase(cluster, namespace, "again", "Succeeded", timeout=120)
    assert first["runUri"] != second["runUri"]
    uid = get_ftj(cluster, namespace, "again")["metadata"]["uid"]
    assert second["runUri"].endswith(f"/{namespace}/again/{uid}/")
    starts = Path(second["runUri"].removeprefix("file://")) / "standin-starts-rank0"
    assert starts.read_text() == "0\n", "started from step 0, not from the old object's step-20 checkpoint"
    assert [c["step"] for c in second["checkpoints"]][-1] == 10


def test_a_new_object_continues_an_old_run_only_when_its_spec_names_the_folder(
    cluster: ClusterHandle, namespace: str
) -> None:
    """The documented opt-in: checkpoints.outputUri set to the old object's status.runUri makes a
    new FineTuneJob (another name, another uid) resume from that run's newest checkpoint."""
    apply(cluster, namespace, manifest("before", "ok"))
    old = wait_phase(cluster, namespace, "before", "Succeeded", timeout=120)
    cluster.kubectl("delete", "ftj", "before", "-n", namespace, "--wait=true")
    apply(
        cluster,
        namespace,
        manifest(
            "after",
            "ok",
            hyperparameters={"maxSteps": 30, "batchSize": 4},
            checkpoints={"everySteps": 5, "outputUri": old["runUri"]},
        ),
    )
    new = wait_phase(cluster, namespace, "after", "Succeeded", timeout=120)
    assert new["runUri"] == old["runUri"]
    starts = Path(old["runUri"].removeprefix("file://")) / "standin-starts-rank0"
    assert starts.read_text() == "0\n20\n", "the new object resumed at the old run's step 20"
    assert new["progress"]["steps"] == "30/30"
    assert [c["step"] for c in new["checkpoints"]][-1] == 30


def test_unknown_fields_of_a_lenient_client_are_reported(cluster: ClusterHandle, namespace: str) -> None:
    obj = manifest("typo", "ok")
    obj["spec"]["hyperparameters"]["learningrate"] = 0.1
    obj["spec"]["storage"] = {"accessKey": "AKIA-NOT-A-SECRET"}
    cluster.kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(obj))
    current = wait_phase(cluster, namespace, "typo", "Running", "Succeeded", timeout=120)
    condition = next(c for c in current["conditions"] if c["type"] == "UnknownFields")
    assert condition["status"] == "True"
    assert (
        "spec.hyperparameters.learningrate" in condition["message"]
        and "spec.storage.accessKey" in condition["message"]
    )
    assert "AKIA-NOT-A-SECRET" not in json.dumps(current)
    warnings = [e for e in events(cluster, namespace, "typo") if e["reason"] == "UnknownFields"]
    assert warnings and warnings[0]["type"] == "Warning"


def test_a_plain_api_client_is_warned_of_each_dropped_field(
    cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    """A client that asks for no field validation (a plain POST, as API libraries send it) gets
    the API server's default, Warn: a warning naming each unknown field, which it can show; the
    object is created without them. What docs/api.md promises such clients."""
    obj = manifest("plain", "ok")
    obj["spec"]["hyperparameters"]["learningrate"] = 0.1
    obj["spec"]["evaluation"]["everystep"] = 3
    body = tmp_path / "plain.json"
    body.write_text(json.dumps(obj))
    created = cluster.kubectl(
        "create", "--raw", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs", "-f", str(body)
    )
    assert 'unknown field "spec.hyperparameters.learningrate"' in created.stderr, created.stderr
    assert 'unknown field "spec.evaluation.everystep"' in created.stderr, created.stderr
    spec = get_ftj(cluster, namespace, "plain")["spec"]
    assert "learningrate" not in spec["hyperparameters"] and "everystep" not in spec["evaluation"]


def test_no_credential_leaks_across_a_full_run(
    cluster: ClusterHandle, namespace: str, operator: OperatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Scan everything a user, a log collector or another tenant could read: the spec, the
    ConfigMap, the status, events, pod specs, logs and termination messages, the operator's log
    (it runs in this process: its records are captured while the job runs)."""
    caplog.set_level(logging.DEBUG)
    access, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={access}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
    )
    apply(cluster, namespace, manifest("secure", "ok", storage={"credentialsSecret": {"name": "s3-creds"}}))
    wait_phase(cluster, namespace, "secure", "Succeeded", timeout=120)
    texts = [
        cluster.kubectl("get", "ftj,configmaps,services,jobs,pods", "-n", namespace, "-o", "yaml").stdout,
        cluster.kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout,
        caplog.text,
    ]
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "finetune.dev/job-name=secure", "-o", "json"
        ).stdout
    )["items"]
    assert pods, "the run's pods are there to scan"
    for pod in pods:
        texts.append(cluster.kubectl("logs", pod["metadata"]["name"], "-n", namespace, check=False).stdout)
        spec = pod["spec"]
        assert spec.get("automountServiceAccountToken") is False
        mounts = [m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts") or []]
        assert not any("serviceaccount" in path for path in mounts), "no API token in a training pod"
        assert not any("projected" in volume for volume in spec.get("volumes") or []), "no token volume"
    encoded = [base64.b64encode(value.encode()).decode() for value in (access, secret)]
    for text in texts:
        for value in (access, secret, *encoded):
            assert value not in text, "a credential (or its base64) outside its Secret"


def test_killed_for_memory_fails_at_once_saying_what_to_change(
    cluster: ClusterHandle, namespace: str
) -> None:
    """The stand-in allocates past resources.memory; the process node kills it as a memory
    cgroup would (OOMKilled). Not retried, although backoffLimit allows 3: the Job is stopped."""
    apply(
        cluster,
        namespace,
        manifest(
            "oom", "oom", resources={"memory": "400Mi"},
            runPolicy={"backoffLimit": 3, "terminationGracePeriodSeconds": 30},
        ),
    )  # fmt: skip
    current = wait_phase(cluster, namespace, "oom", "Failed", timeout=120)
    assert current["reason"] == "OOMKilled" and current["exitCode"] == 137
    assert "ran out of memory" in current["message"] and "microBatchSize" in current["message"]
    job = json.loads(cluster.kubectl("get", "job", "oom", "-n", namespace, "-o", "json").stdout)
    assert job["spec"].get("suspend") is True, "the Job's replacement pod is stopped"
    wait_for(
        lambda: (job := json.loads(cluster.kubectl("get", "job", "oom", "-n", namespace, "-o", "json").stdout))
        and not (job.get("status") or {}).get("active"),
        timeout=60, what="no pod of the OOMKilled job still running",
    )  # fmt: skip
    failed = json.loads(cluster.kubectl("get", "job", "oom", "-n", namespace, "-o", "json").stdout)["status"]
    assert (failed.get("failed") or 0) <= 2, (
        "the OOMKilled pod (and the replacement stopped), not backoffLimit's 4"
    )
