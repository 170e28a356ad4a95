"""`make demo`'s path, and a two-node job, from kubectl apply to checkpoints in S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from finetune_dev import demo
from tests.gitops_health import health, kstatus
from tests.kube import ClusterHandle, get, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _objects(cluster: ClusterHandle, bucket: str, prefix: str) -> dict[str, int]:
    s3 = cluster.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.timeout(3600)  # the demo itself may take 2,400 s (its --timeout below)
def test_demo_fine_tunes_smollm2_end_to_end(cluster: ClusterHandle) -> None:
    env = {**os.environ, "FINETUNE_DEV_STATE": str(cluster.cluster.root), "FINETUNE_DEV_PORT_BASE": str(cluster.cluster.ports.base)}

    result = subprocess.run(
        [sys.executable, "-m", "finetune_dev.demo", "--fresh", "--timeout", "2400"],
        capture_output=True, text=True, env=env, timeout=3000,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Evaluation (step 0 = zero-shot)" in result.stdout
    job = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", "smollm2-market-reports")
    status = job["status"]
    assert status["phase"] == "Succeeded"
    evaluations = status["evaluations"]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 30
    assert evaluations[-1]["loss"] < evaluations[0]["loss"] - 0.1, "fine-tuning must lower the eval loss clearly"
    assert evaluations[-1]["perplexity"] < evaluations[0]["perplexity"]
    # Checkpoints are in S3, each completed by its manifest; the final export too.
    run = status["runUri"]
    # the run folder belongs to this object: <namespace>/<name>/<uid>/
    prefix = f"{demo.DEMO_NAMESPACE}/smollm2-market-reports/{job['metadata']['uid']}/"
    assert run == f"s3://finetune-runs/{prefix}"
    objects = _objects(cluster, "finetune-runs", prefix)
    assert f"{prefix}checkpoints/step-000030/manifest.json" in objects
    assert any(k.startswith(f"{prefix}final/") and k.endswith(".safetensors") for k in objects)
    assert f"{prefix}run.json" in objects and f"{prefix}metrics.jsonl" in objects
    assert [c["step"] for c in status["checkpoints"]][-1] == 30
    # GitOps tools read the same status: Argo CD's health check calls it Healthy, Flux's kstatus Current.
    assert health(job) == ("Healthy", status["message"])
    assert kstatus(job) == [("Current", "Resource is Ready")]
    # The printer columns show the outcome.
    table = cluster.kubectl("get", "ftj", "-n", demo.DEMO_NAMESPACE).stdout
    assert "Succeeded" in table and "30/30" in table


@pytest.mark.timeout(1800)
def test_two_node_job_with_the_catalog_model_trains_across_two_pods(cluster: ClusterHandle) -> None:
    """The catalog's own model (a GGUF file): each pod imports it in full into its own cache,
    whatever its rank (rank 1 used to find only the tokenizer there)."""
    demo.install_operator(cluster.cluster)
    s3 = cluster.s3_client()
    for bucket in ("finetune-datasets", "finetune-runs"):
        demo._ensure_bucket(s3, bucket)
    demo._upload_dir(s3, demo.DATASET, "finetune-datasets", "market-reports/")
    name = f"two-nodes-{uuid.uuid4().hex[:6]}"
    manifest: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": demo.DEMO_NAMESPACE},
        "spec": {
            "model": {"name": "smollm2-135m-instruct"},
            "dataset": {
                "train": ["s3://finetune-datasets/market-reports/train.jsonl"],
                "eval": ["s3://finetune-datasets/market-reports/eval.jsonl"],
                "format": "text",
            },
            "hyperparameters": {"maxSteps": 4, "batchSize": 4, "microBatchSize": 2, "sequenceLength": 64},
            "evaluation": {"everySteps": 2, "maxBatches": 2, "baselines": []},
            "checkpoints": {"everySteps": 2, "keepLast": 1},
            "resources": {"nodes": 2, "cpu": "1", "memory": "2Gi"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    status = wait_for(
        lambda: (s := get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name).get("status", {})).get("phase") in demo.TERMINAL and s,
        timeout=1800,
        what=f"the two-node FineTuneJob {name} to finish",
    )

    assert status["phase"] == "Succeeded", status.get("message")
    assert [e["step"] for e in status["evaluations"]] == [0, 2, 4]
    pods = get(cluster, demo.DEMO_NAMESPACE, "pods", "-l", f"batch.kubernetes.io/job-name={status['jobName']}")["items"]
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert not status.get("restarts"), "both pods ran through on the first attempt"
    # Pods ran as the trainer image's user with a read-only root filesystem and bounded disk.
    spec = pods[0]["spec"]
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"]: v for v in spec["volumes"]}["cache"]["emptyDir"]["sizeLimit"] == "7Gi"
