"""Gang restart on the real control plane (Job controller, garbage collector) with the in-process
operator and the stand-in trainer: deleting one pod of a running 2-pod job restarts both pods
together from the checkpoint, counted once, with the event and condition a user reads — naming
the deleted pod and its rank even after the Job controller has removed it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.operator_env import OperatorProcess, apply, events, manifest, status, wait_phase
from tests.kube import ClusterHandle, get, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("operator")]


def _pods(cluster: ClusterHandle, namespace: str, name: str) -> list[dict[str, Any]]:
    return list(get(cluster, namespace, "pods", "-l", f"finetune.dev/job-name={name}")["items"])


def test_deleting_one_pod_restarts_both_from_the_checkpoint(
    cluster: ClusterHandle, namespace: str, operator: OperatorProcess
) -> None:
    body = manifest("gang", "slow", hyperparameters={"maxSteps": 14, "batchSize": 4},
                    resources={"nodes": 2}, evaluation={"everySteps": 10, "baselines": []}, runPolicy={"backoffLimit": 2, "terminationGracePeriodSeconds": 30})  # fmt: skip
    apply(cluster, namespace, body)
    wait_for(
        lambda: (status(cluster, namespace, "gang").get("progress") or {}).get("step", 0) >= 3,
        timeout=120, what="3 steps",
    )  # fmt: skip
    first_job_uid = get(cluster, namespace, "job", "gang")["metadata"]["uid"]
    [rank1] = [p for p in _pods(cluster, namespace, "gang")
               if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"]  # fmt: skip
    rank1_name = rank1["metadata"]["name"]
    run_dir = Path(status(cluster, namespace, "gang")["runUri"].removeprefix("file://"))
    hold = run_dir / "standin-hold-sigterm"  # the deleted trainer checkpoints until this goes
    hold.touch()

    cluster.kubectl("delete", "pod", rank1_name, "-n", namespace, "--wait=false")

    # While rank 1 is terminating and rank 0 still trains, the operator records the cause.
    recorded = wait_for(
        lambda: status(cluster, namespace, "gang").get("lastFailure"), timeout=60, what="the recorded cause"
    )
    assert recorded == {"attempt": 0, "rank": 1, "pod": rank1_name, "reason": "Deleted",
                        "message": f"pod {rank1_name} (rank 1) was deleted", "time": recorded["time"]}  # fmt: skip
    hold.unlink()  # rank 1 exits; the Job controller fails the attempt, stops rank 0, removes both

    restarting = wait_for(
        lambda: (s := status(cluster, namespace, "gang")).get("reason") == "Restarting" and s,
        timeout=90, what="the restart",
    )  # fmt: skip
    assert restarting["restarts"] == 1
    assert (
        "restarting all 2 pods from the newest checkpoint (restart 1 of runPolicy.backoffLimit 2) "
        f"after pod {rank1_name} (rank 1) was deleted"
    ) in restarting["message"], restarting["message"]
    reconciling = {c["type"]: c for c in restarting["conditions"]}["Reconciling"]
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Restarting")
    assert f"pod {rank1_name} (rank 1) was deleted" in reconciling["message"]

    done = wait_phase(cluster, namespace, "gang", "Succeeded", "Failed", timeout=180)
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["restarts"] == 1
    assert done["lastFailure"] == recorded, "the cause of the restart stays in the status"
    assert get(cluster, namespace, "job", "gang")["metadata"]["uid"] != first_job_uid, "a new attempt's Job"
    for rank in (0, 1):
        starts = (run_dir / f"standin-starts-rank{rank}").read_text().split()
        assert len(starts) == 2 and starts[0] == "0" and int(starts[1]) >= 3, (rank, starts)
    warnings = [
        (e["reason"], e.get("message", ""))
        for e in events(cluster, namespace, "gang")
        if e["type"] == "Warning"
    ]
    assert warnings == [("PodFailed", f"pod {rank1_name} (rank 1) was deleted")], warnings
    assert (
        json.loads(cluster.kubectl("get", "networkpolicies", "-n", namespace, "-o", "json").stdout)["items"]
        == []
    ), "without FINETUNE_NETWORK_POLICY the operator creates no NetworkPolicy"
