"""Restart safety and the operator's identity, on the real cluster.

The operator is stopped at chosen points of a reconcile without test hooks in production code:
it runs under an identity that lacks exactly one permission, so its cycle fails at that API
call (after creating the children before it, or before writing status); then it is stopped and
a correctly-permitted operator takes over. Exactly one set of children must exist afterwards,
the status must converge, and nothing the trainer reported may be lost.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import rbac
from tests.integration.operator_env import (
    SERVICE_ACCOUNT,
    SYSTEM_NAMESPACE,
    apply,
    assert_no_other_operator,
    children,
    identity_kubeconfig,
    manifest,
    running_operator,
    status,
    wait_phase,
)
from tests.kube import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster]

AS_OPERATOR = f"--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{SERVICE_ACCOUNT}"


def _role_without(resource: str, verb: str) -> dict[str, Any]:
    role = copy.deepcopy(rbac.cluster_role())
    for rule in role["rules"]:
        if resource in rule["resources"]:
            if len(rule["resources"]) > 1:
                rule["resources"].remove(resource)
                role["rules"].append(
                    {**rule, "resources": [resource], "verbs": [v for v in rule["verbs"] if v != verb]}
                )
            else:
                rule["verbs"].remove(verb)
    return role


def _all_children(cluster: ClusterHandle, namespace: str) -> list[str]:
    out = cluster.kubectl(
        "get",
        "configmaps,services,jobs",
        "-n",
        namespace,
        "-l",
        "app.kubernetes.io/managed-by=finetune-operator",
        "-o",
        "name",
    ).stdout
    return sorted(line for line in out.splitlines() if line)


def _without_status_writes(cluster: ClusterHandle, operator_dir: Path) -> Path:
    """The kubeconfig of an operator identity that may do everything but write a status: its
    cycle creates the children, then fails."""
    return identity_kubeconfig(
        cluster, "finetune-operator-no-status", _role_without("finetunejobs/status", "patch"), operator_dir
    )


def _can_i(cluster: ClusterHandle, verb: str, resource: str) -> Any:
    name, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    return cluster.kubectl("auth", "can-i", verb, name, *extra, "-A", AS_OPERATOR, check=False)


@pytest.mark.parametrize(
    ("allowed", "denied"),
    [
        pytest.param(
            [],
            [
                ("get", "secrets"),
                ("list", "secrets"),
                ("create", "pods"),
                ("delete", "pods"),
                ("delete", "services"),
                ("list", "serviceaccounts"),
                ("create", "serviceaccounts/token"),
                ("delete", "configmaps"),
                ("create", "finetunejobs.finetune.dev"),
                ("delete", "finetunejobs.finetune.dev"),
                ("create", "roles.rbac.authorization.k8s.io"),
                ("create", "leases.coordination.k8s.io"),
            ],
            id="denied",
        ),
        pytest.param(
            [
                ("watch", "finetunejobs.finetune.dev"),
                ("patch", "finetunejobs.finetune.dev/status"),
                ("create", "jobs.batch"),
                ("delete", "jobs.batch"),  # a gang restart replaces a multi-node job's Job
                ("watch", "jobs.batch"),
                ("create", "configmaps"),
                ("create", "services"),
                ("list", "pods"),
                ("create", "events"),
                ("get", "serviceaccounts"),
                ("get", "priorityclasses.scheduling.k8s.io"),
            ],
            [],
            id="allowed",
        ),
    ],
)
def test_operator_identity_is_no_wider_than_needed(
    cluster: ClusterHandle,
    operator_kubeconfig: Path,
    allowed: list[tuple[str, str]],
    denied: list[tuple[str, str]],
) -> None:
    for verb, resource in allowed:
        result = _can_i(cluster, verb, resource)
        assert result.stdout.strip() == "yes", f"{verb} {resource}: {result.stdout} {result.stderr}"
    for verb, resource in denied:
        result = _can_i(cluster, verb, resource)
        assert result.stdout.strip() == "no", f"operator may {verb} {resource}"


def test_restart_between_creating_children(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    assert_no_other_operator(cluster)
    limited = identity_kubeconfig(
        cluster, "finetune-operator-no-jobs", _role_without("jobs", "create"), operator_dir
    )
    runs = operator_dir / "runs-restart"
    with running_operator(limited, runs):
        apply(cluster, namespace, manifest("split", "ok"))
        wait_for(
            lambda: _all_children(cluster, namespace) == ["configmap/split-config", "service/split"],
            timeout=30,
            what="ConfigMap and Service only",
        )
        time.sleep(1)
    assert _all_children(cluster, namespace) == ["configmap/split-config", "service/split"]
    with running_operator(operator_kubeconfig, runs):
        done = wait_phase(cluster, namespace, "split", "Succeeded", timeout=120)
    assert _all_children(cluster, namespace) == ["configmap/split-config", "job.batch/split", "service/split"]
    assert done["progress"]["steps"] == "20/20"


def test_restart_during_status_update(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    assert_no_other_operator(cluster)
    limited = _without_status_writes(cluster, operator_dir)
    runs = operator_dir / "runs-restart"
    with running_operator(limited, runs):
        apply(cluster, namespace, manifest("nostatus", "slow", suspend=True))
        wait_for(lambda: len(_all_children(cluster, namespace)) == 3, timeout=30, what="the children")
        time.sleep(1)
    assert status(cluster, namespace, "nostatus") == {}
    job_uid = json.loads(cluster.kubectl("get", "job", "nostatus", "-n", namespace, "-o", "json").stdout)[
        "metadata"
    ]["uid"]
    with running_operator(operator_kubeconfig, runs):
        wait_phase(cluster, namespace, "nostatus", "Suspended", timeout=30)
    after = json.loads(cluster.kubectl("get", "job", "nostatus", "-n", namespace, "-o", "json").stdout)[
        "metadata"
    ]["uid"]
    assert after == job_uid, "the Job was not re-created"
    assert len(_all_children(cluster, namespace)) == 3


def test_job_finishing_while_operator_is_down_loses_nothing(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    assert_no_other_operator(cluster)
    runs = operator_dir / "runs-restart"
    with running_operator(operator_kubeconfig, runs):
        apply(cluster, namespace, manifest("offline", "ok", hyperparameters={"maxSteps": 40, "batchSize": 4}))
        wait_phase(cluster, namespace, "offline", "Running", timeout=90)
    cluster.kubectl("wait", "--for=condition=Complete", "job/offline", "-n", namespace, "--timeout=120s")
    assert status(cluster, namespace, "offline")["phase"] == "Running"
    with running_operator(operator_kubeconfig, runs):
        done = wait_phase(cluster, namespace, "offline", "Succeeded", timeout=60)
    assert done["progress"]["steps"] == "40/40"
    assert done["latestEvaluation"]["step"] == 40, "results came from the termination message"
    assert done["checkpoints"][-1]["uri"].endswith("step-000040/")
    assert children(cluster, namespace, "offline") == [
        "configmap/offline-config",
        "job.batch/offline",
        "service/offline",
    ]


def test_job_started_and_finished_while_operator_is_down_gets_its_start_time(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    """The operator created the children and died before any status write: the Job ran and
    finished without it. The result still carries startTime (the Job's own), so the finished
    job's spec is fixed like any other's."""
    assert_no_other_operator(cluster)
    limited = _without_status_writes(cluster, operator_dir)
    runs = operator_dir / "runs-restart"
    with running_operator(limited, runs):
        apply(cluster, namespace, manifest("unseen", "ok"))
        wait_for(lambda: len(_all_children(cluster, namespace)) == 3, timeout=30, what="the children")
    cluster.kubectl("wait", "--for=condition=Complete", "job/unseen", "-n", namespace, "--timeout=120s")
    assert status(cluster, namespace, "unseen") == {}, "no status was ever written"
    job = json.loads(cluster.kubectl("get", "job", "unseen", "-n", namespace, "-o", "json").stdout)
    with running_operator(operator_kubeconfig, runs):
        done = wait_phase(cluster, namespace, "unseen", "Succeeded", timeout=60)
    assert done["startTime"] == job["status"]["startTime"]
    assert done["progress"]["steps"] == "20/20" and done["latestEvaluation"]["step"] == 20
    refused = cluster.kubectl(
        "patch",
        "ftj",
        "unseen",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"hyperparameters": {"learningRate": 0.5}}}),
        check=False,
    )
    assert refused.returncode != 0 and "spec.hyperparameters is immutable" in refused.stderr, refused.stderr


def test_job_deleted_by_hand_before_its_result_is_read_resumes_and_trains_nothing_twice(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    """The Job finished while the operator was down, then someone deleted it (and its pods,
    with the termination message): the operator, back, cannot know it finished, re-creates it,
    and the trainer resumes from the run's newest checkpoint — the last step's — so no step is
    trained twice and the job ends Succeeded with its start time and checkpoints."""
    assert_no_other_operator(cluster)
    runs = operator_dir / "runs-deleted-job"
    with running_operator(operator_kubeconfig, runs):
        apply(cluster, namespace, manifest("byhand", "ok", hyperparameters={"maxSteps": 40, "batchSize": 4}))
        running = wait_phase(cluster, namespace, "byhand", "Running", timeout=90)
    cluster.kubectl("wait", "--for=condition=Complete", "job/byhand", "-n", namespace, "--timeout=120s")
    cluster.kubectl("delete", "job", "byhand", "-n", namespace, "--cascade=foreground", "--wait=true")
    assert status(cluster, namespace, "byhand")["phase"] == "Running", "the operator did not see the end"
    with running_operator(operator_kubeconfig, runs):
        done = wait_phase(cluster, namespace, "byhand", "Succeeded", timeout=90)
    assert done["startTime"] == running["startTime"]
    assert done["progress"]["steps"] == "40/40"
    assert done["checkpoints"][-1]["uri"].endswith("step-000040/")
    starts = Path(done["runUri"].removeprefix("file://")) / "standin-starts-rank0"
    assert starts.read_text() == "0\n40\n", "the second Job resumed at the last step: nothing trained twice"


# ---------------------------------------------------------------------------------------------
# control-plane faults: the API server (and etcd) and the process node restarted mid-job


def _restart(cluster: ClusterHandle, *names: str, down_seconds: float = 3) -> None:
    """Stop the named components (in order), keep them down a while, start them in reverse order."""
    by_name = {component.name: component for component in cluster.cluster._components()}
    components = [by_name[name] for name in names]
    for component in components:
        component.stop(cluster.cluster)
    time.sleep(down_seconds)
    for component in reversed(components):
        process = component.start(cluster.cluster)
        component.wait_healthy(cluster.cluster, process)
    wait_for(
        lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
        timeout=120,
        what="the API server ready",
    )


def _job_uid(cluster: ClusterHandle, namespace: str, name: str) -> str:
    return str(
        json.loads(cluster.kubectl("get", "job", name, "-n", namespace, "-o", "json").stdout)["metadata"][
            "uid"
        ]
    )


@pytest.mark.parametrize(
    "components",
    [
        pytest.param(("kube-apiserver",), id="api-server"),
        pytest.param(("kube-apiserver", "etcd"), id="api-server-and-etcd"),
    ],
)
def test_control_plane_restarted_mid_job(
    cluster: ClusterHandle,
    namespace: str,
    operator_dir: Path,
    operator_kubeconfig: Path,
    components: tuple[str, ...],
) -> None:
    """The operator reconnects (kopf re-watches), the status converges, one Job, one run."""
    assert_no_other_operator(cluster)
    name = "cp-restart"
    with running_operator(operator_kubeconfig, operator_dir / "runs-cp") as process:
        apply(cluster, namespace, manifest(name, "slow", hyperparameters={"maxSteps": 12, "batchSize": 4}))
        running = wait_phase(cluster, namespace, name, "Running", timeout=90)
        job_uid = _job_uid(cluster, namespace, name)
        _restart(cluster, *components)
        done = wait_phase(cluster, namespace, name, "Succeeded", timeout=180)
        metrics = process.metrics()
    assert done["progress"]["steps"] == "12/12" and done["latestEvaluation"]["step"] == 12
    assert done["startTime"] == running["startTime"], "the start is not forgotten"
    assert _job_uid(cluster, namespace, name) == job_uid, "the Job was not re-created"
    assert children(cluster, namespace, name) == [
        f"configmap/{name}-config",
        f"job.batch/{name}",
        f"service/{name}",
    ]
    starts = (Path(done["runUri"].removeprefix("file://")) / "standin-starts-rank0").read_text()
    assert starts == "0\n", "the trainer ran once, undisturbed by the control plane"
    assert "finetune_operator_reconciles_total" in metrics


def test_process_node_restarted_while_pods_run(
    cluster: ClusterHandle, namespace: str, operator_dir: Path, operator_kubeconfig: Path
) -> None:
    """Whatever the node does with the pods it ran, the job ends with the whole result: no
    checkpoint lost, no step trained twice past the newest checkpoint, one Job."""
    assert_no_other_operator(cluster)
    name = "node-restart"
    obj = manifest(
        name,
        "slow",
        hyperparameters={"maxSteps": 12, "batchSize": 4},
        runPolicy={"backoffLimit": 3, "terminationGracePeriodSeconds": 30},
        checkpoints={"everySteps": 2},
    )
    with running_operator(operator_kubeconfig, operator_dir / "runs-node"):
        apply(cluster, namespace, obj)
        wait_for(
            lambda: (status(cluster, namespace, name).get("progress") or {}).get("step", 0) >= 3,
            timeout=120,
            what="a few steps",
        )
        job_uid = _job_uid(cluster, namespace, name)
        _restart(cluster, "process-node")
        done = wait_phase(cluster, namespace, name, "Succeeded", "Failed", timeout=240)
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["progress"]["steps"] == "12/12"
    assert _job_uid(cluster, namespace, name) == job_uid
    starts = [
        int(s)
        for s in (Path(done["runUri"].removeprefix("file://")) / "standin-starts-rank0").read_text().split()
    ]
    assert starts[0] == 0 and all(later >= 2 for later in starts[1:]), (
        f"a restart resumes a checkpoint: {starts}"
    )
    assert [c["step"] for c in done["checkpoints"]][-1] == 12
