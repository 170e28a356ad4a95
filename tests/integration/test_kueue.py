"""FineTuneJobs queued with the real Kueue controller manager (tests/integration/kueue_env.py).

A ClusterQueue with quota for one job's pod and a LocalQueue: jobs run one at a time, the
others wait with Kueue's reason and message in their status; the operator never overrides the
suspend flag Kueue owns; a user's spec.suspend and spec.cancel still work on a queued or an
admitted job (they deactivate the Workload); a job preempted for a higher-priority one saves a
checkpoint and later resumes from it. The stand-in trainer (standin_trainer.py) trains.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.kueue_env import Kueue
from tests.integration.operator_env import (
    OperatorProcess,
    apply,
    manifest,
    status,
    wait_phase,
)
from tests.kube import ClusterHandle, wait_for

pytestmark = pytest.mark.cluster

# One job's pod: the ClusterQueue's whole quota.
POD_CPU, POD_MEMORY = "500m", "256Mi"
LOW, HIGH = "finetune-test-low", "finetune-test-high"


def _apply_all(cluster: ClusterHandle, namespace: str | None, *objects: dict[str, Any]) -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    cluster.kubectl(*args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


@pytest.fixture
def local_queue(cluster: ClusterHandle, namespace: str, kueue: Kueue) -> Iterator[str]:
    """A ClusterQueue (quota: one job's pod; lower priorities are preempted) for `namespace`, and
    its LocalQueue; the name of the LocalQueue."""
    suffix = uuid.uuid4().hex[:6]
    flavor, cluster_queue = f"default-{suffix}", f"cq-{suffix}"
    # cpu and memory fit one pod; ephemeral-storage (if the pods request it) is not the limit.
    quota = [
        {"name": "cpu", "nominalQuota": POD_CPU},
        {"name": "memory", "nominalQuota": POD_MEMORY},
        {"name": "ephemeral-storage", "nominalQuota": "1Ti"},
    ]
    _apply_all(
        cluster,
        None,
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "ephemeral-storage"],
                        "flavors": [{"name": flavor, "resources": quota}],
                    }
                ],
            },
        },
        *(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name},
                "value": value,
            }
            for name, value in ((LOW, 100), (HIGH, 1000))
        ),
    )
    _apply_all(
        cluster,
        namespace,
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "team-queue"},
            "spec": {"clusterQueue": cluster_queue},
        },
    )
    wait_for(
        lambda: _active_condition(cluster, "clusterqueue", cluster_queue, None),
        timeout=60,
        what=f"ClusterQueue {cluster_queue} to be active",
    )
    yield "team-queue"
    cluster.kubectl("delete", "localqueue", "team-queue", "-n", namespace, "--ignore-not-found", check=False)
    cluster.kubectl(
        "delete", "clusterqueue", cluster_queue, "--ignore-not-found", "--wait=false", check=False
    )
    cluster.kubectl("delete", "resourceflavor", flavor, "--ignore-not-found", "--wait=false", check=False)


def _active_condition(cluster: ClusterHandle, kind: str, name: str, namespace: str | None) -> bool:
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    obj = json.loads(cluster.kubectl(*args).stdout)
    return any(
        c["type"] == "Active" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


def queued_job(
    name: str, queue: str, *, steps: int, priority: str = LOW, scenario: str = "slow"
) -> dict[str, Any]:
    return manifest(
        name,
        scenario,
        hyperparameters={"maxSteps": steps, "batchSize": 4},
        checkpoints={"everySteps": 2},
        # baselines: [] works around main's CRD, whose CEL rules read evaluation.baselines unguarded.
        evaluation={"everySteps": 10, "baselines": []},
        resources={"queueName": queue, "cpu": POD_CPU, "memory": POD_MEMORY, "priorityClassName": priority},
    )


def batch_job(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "job", name, "-n", namespace, "-o", "json").stdout))


def workload(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    uid = batch_job(cluster, namespace, name)["metadata"]["uid"]
    items = json.loads(
        cluster.kubectl(
            "get",
            "workloads.kueue.x-k8s.io",
            "-n",
            namespace,
            "-l",
            f"kueue.x-k8s.io/job-uid={uid}",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert len(items) == 1, items
    return dict(items[0])


def running_pods(cluster: ClusterHandle, namespace: str) -> set[str]:
    """FineTuneJobs with a pod that is not finished."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    return {
        p["metadata"]["labels"]["finetune.dev/job-name"]
        for p in pods
        if p["status"].get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp")
    }


def run_dir(cluster: ClusterHandle, namespace: str, name: str) -> Path:
    """The job's file:// run folder (where the stand-in trainer records its checkpoints and starts)."""
    return Path(str(status(cluster, namespace, name)["runUri"]).removeprefix("file://"))


def patch_spec(cluster: ClusterHandle, namespace: str, name: str, **spec: Any) -> None:
    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def wait_reason(
    cluster: ClusterHandle, namespace: str, name: str, reason: str, timeout: float = 60
) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (s := status(cluster, namespace, name)).get("reason") == reason and s,
        timeout=timeout,
        what=f"{name} to have reason {reason} (now {status(cluster, namespace, name).get('reason')})",
    )
    return result


def timer_cycles(operator: OperatorProcess) -> float:
    total = 0.0
    for line in operator.metrics().splitlines():
        if line.startswith("finetune_operator_reconciles_total{") and 'trigger="timer"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_jobs_run_in_turn_and_suspend_and_cancel_still_work(
    cluster: ClusterHandle,
    namespace: str,
    operator: OperatorProcess,
    local_queue: str,
) -> None:
    apply(cluster, namespace, queued_job("first", local_queue, steps=100))  # cancelled below
    first = wait_phase(cluster, namespace, "first", "Running", timeout=90)
    assert first["reason"] == "Training"
    for name in ("second", "third"):
        apply(cluster, namespace, queued_job(name, local_queue, steps=4))
    for name in ("second", "third"):
        waiting = wait_reason(cluster, namespace, name, "Queued")
        assert waiting["phase"] == "Pending"
        assert "queued in LocalQueue team-queue (Kueue: Pending: " in waiting["message"]
        # Kueue's own words once it has considered the Workload (first it says it has not yet):
        # it could not reserve quota for the pod set.
        verdict = wait_for(
            lambda name=name: "insufficient" in (m := str(status(cluster, namespace, name).get("message"))) and m,
            timeout=60, what=f"{name}: Kueue's quota verdict in the status",
        )  # fmt: skip
        assert "quota" in verdict and status(cluster, namespace, name)["reason"] == "Queued", verdict
        assert batch_job(cluster, namespace, name)["spec"]["suspend"] is True

    # The operator's full cycles (a timer polls Pending jobs) leave Kueue's suspend flag alone:
    # the queued Jobs stay suspended, podless, and the admitted one is never re-suspended.
    before = timer_cycles(operator)
    wait_for(lambda: timer_cycles(operator) >= before + 4, timeout=30, what="four operator timer cycles")
    assert batch_job(cluster, namespace, "first")["spec"]["suspend"] is False
    assert running_pods(cluster, namespace) == {"first"}

    # A user's suspend on a queued job: its Workload is deactivated, it never starts.
    patch_spec(cluster, namespace, "third", suspend=True)
    wait_phase(cluster, namespace, "third", "Suspended")
    wait_for(
        lambda: workload(cluster, namespace, "third")["spec"]["active"] is False,
        timeout=30,
        what="deactivated",
    )

    # A user's cancel on the admitted job: it stops, its quota goes to the next in the queue.
    patch_spec(cluster, namespace, "first", cancel=True)
    assert wait_phase(cluster, namespace, "first", "Cancelled", timeout=90)["reason"] == "Cancelled"
    wait_phase(cluster, namespace, "second", "Running", timeout=90)
    assert running_pods(cluster, namespace) == {"second"}
    # A user's suspend on an admitted job: it saves a checkpoint and frees the quota.
    wait_for(
        lambda: (status(cluster, namespace, "second").get("progress") or {}).get("step", 0) >= 1,
        timeout=60,
        what="second to train a step",
    )
    patch_spec(cluster, namespace, "second", suspend=True)
    wait_for(
        lambda: (
            status(cluster, namespace, "second").get("reason") == "Suspended"
            and not running_pods(cluster, namespace)
        ),
        timeout=90,
        what="second to be suspended with no pods",
    )
    assert status(cluster, namespace, "third")["phase"] == "Suspended", (
        "a suspended job must not start on free quota"
    )

    # Resumed, the two run in turn again, each from its own checkpoint.
    patch_spec(cluster, namespace, "third", suspend=False)
    wait_phase(cluster, namespace, "third", "Running", timeout=90)
    patch_spec(cluster, namespace, "second", suspend=False)
    seen: set[frozenset[str]] = set()

    def both_done() -> bool:
        seen.add(frozenset(running_pods(cluster, namespace)))
        return all(status(cluster, namespace, n).get("phase") == "Succeeded" for n in ("second", "third"))

    wait_for(both_done, timeout=180, what="second and third to succeed", interval=0.5)
    assert all(len(running) <= 1 for running in seen), f"jobs ran concurrently beyond the quota: {seen}"
    starts = (run_dir(cluster, namespace, "second") / "standin-starts-rank0").read_text().split()
    assert len(starts) == 2 and int(starts[1]) >= 1, f"second resumed from its checkpoint: {starts}"


def test_a_preempted_job_checkpoints_and_resumes_from_that_checkpoint(
    cluster: ClusterHandle,
    namespace: str,
    operator: OperatorProcess,
    local_queue: str,
) -> None:
    apply(cluster, namespace, queued_job("low", local_queue, steps=10, priority=LOW))
    wait_for(
        lambda: (status(cluster, namespace, "low").get("progress") or {}).get("step", 0) >= 3,
        timeout=120,
        what="the low-priority job to train 3 steps",
    )
    apply(cluster, namespace, queued_job("high", local_queue, steps=3, priority=HIGH))

    preempted = wait_reason(cluster, namespace, "low", "Preempted", timeout=60)
    assert preempted["phase"] == "Pending"
    assert "Preempted to accommodate a workload" in preempted["message"], preempted["message"]
    wait_phase(cluster, namespace, "high", "Running", timeout=90)
    low_dir = run_dir(cluster, namespace, "low")
    saved_at_preemption = int((low_dir / "standin-checkpoint").read_text())
    assert saved_at_preemption >= 3, "the preempted job saved a checkpoint on SIGTERM"
    assert running_pods(cluster, namespace) == {"high"}

    wait_phase(cluster, namespace, "high", "Succeeded", timeout=90)
    done = wait_phase(cluster, namespace, "low", "Succeeded", timeout=120)
    assert done["progress"]["step"] == 10
    starts = [int(s) for s in (low_dir / "standin-starts-rank0").read_text().split()]
    assert starts == [0, saved_at_preemption], "the preempted job resumed from the checkpoint it saved"
    events = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=low,involvedObject.kind=FineTuneJob",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert "Preempted" in {e["reason"] for e in events}, "the preemption is an event on the FineTuneJob"
