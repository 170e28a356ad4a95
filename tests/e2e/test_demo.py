"""`make demo`'s path, and two-node jobs (data parallel and FSDP), from kubectl apply to checkpoints in S3."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import demo
from finetune_operator.api import LABEL_JOB_NAME
from tests.gitops_health import health, kstatus
from tests.kube import ClusterHandle, get, wait_for
from tests.trainer.factories import make_model_dir, make_tokenizer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _objects(cluster: ClusterHandle, bucket: str, prefix: str) -> dict[str, int]:
    s3 = cluster.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.timeout(3600)  # the demo itself may take 2,400 s (its --timeout below)
def test_demo_fine_tunes_smollm2_end_to_end(cluster: ClusterHandle) -> None:
    env = {
        **os.environ,
        "FINETUNE_DEV_STATE": str(cluster.cluster.root),
        "FINETUNE_DEV_PORT_BASE": str(cluster.cluster.ports.base),
    }

    result = subprocess.run(
        [sys.executable, "-m", "finetune_dev.demo", "--fresh", "--timeout", "2400"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3000,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Evaluation (step 0 = zero-shot)" in result.stdout
    job = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", "smollm2-market-reports")
    status = job["status"]
    assert status["phase"] == "Succeeded"
    evaluations = status["evaluations"]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 30
    assert evaluations[-1]["loss"] < evaluations[0]["loss"] - 0.1, (
        "fine-tuning must lower the eval loss clearly"
    )
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
    _assert_no_credentials_outside_their_secret(cluster, "smollm2-market-reports")


def _assert_no_credentials_outside_their_secret(cluster: ClusterHandle, name: str) -> None:
    """The real trainer (boto3 uploads and downloads, its logs, its termination message) and the
    operator's pod: the S3 credentials, as given and base64-encoded, appear nowhere but in their
    Secret — not in a spec, ConfigMap, status, event, pod spec, log or termination message."""
    values = cluster.cluster.s3_credentials()
    texts = [
        cluster.kubectl(
            "get", "ftj,configmaps,services,jobs,pods", "-n", demo.DEMO_NAMESPACE, "-o", "yaml"
        ).stdout,
        cluster.kubectl("get", "events", "-A", "-o", "yaml").stdout,
    ]
    pods = [
        (p["metadata"]["namespace"], p["metadata"]["name"])
        for selector in (f"{LABEL_JOB_NAME}={name}", "app.kubernetes.io/name=finetune-operator")
        for p in json.loads(cluster.kubectl("get", "pods", "-A", "-l", selector, "-o", "json").stdout)[
            "items"
        ]
    ]
    assert len(pods) >= 2, f"the trainer's and the operator's pods are there to scan: {pods}"
    for namespace, pod in pods:
        texts.append(cluster.kubectl("logs", pod, "-n", namespace, "--all-containers", check=False).stdout)
    encoded = [base64.b64encode(value.encode()).decode() for value in values]
    for text in texts:
        for value in (*values, *encoded):
            assert value not in text, "an S3 credential (or its base64) outside its Secret"


def _apply(cluster: ClusterHandle, name: str, spec: dict[str, Any]) -> str:
    """Apply a FineTuneJob in the demo namespace; its name."""
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": demo.DEMO_NAMESPACE},
        "spec": spec,
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    return name


def _finished(cluster: ClusterHandle, name: str, *, timeout: float) -> dict[str, Any]:
    """The FineTuneJob's status once it reached a terminal phase."""
    return dict(wait_for(
        lambda: (s := get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name).get("status", {})).get("phase") in demo.TERMINAL and s,
        timeout=timeout,
        what=f"the FineTuneJob {name} to finish",
    ))  # fmt: skip


def _assert_trained_on_two_pods(cluster: ClusterHandle, status: dict[str, Any]) -> list[dict[str, Any]]:
    """The job succeeded as one gang of two pods (completion indexes 0 and 1), both through on
    the first attempt; returns the pods."""
    assert status["phase"] == "Succeeded", status.get("message")
    pods = get(
        cluster, demo.DEMO_NAMESPACE, "pods", "-l", f"batch.kubernetes.io/job-name={status['jobName']}"
    )["items"]
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == [
        "0",
        "1",
    ]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert not status.get("restarts"), "both pods ran through on the first attempt"
    return list(pods)


def _stage_market_reports(cluster: ClusterHandle) -> None:
    demo.install_operator(cluster.cluster)
    s3 = cluster.s3_client()
    for bucket in ("finetune-models", "finetune-datasets", "finetune-runs"):
        demo._ensure_bucket(s3, bucket)
    demo._upload_dir(s3, demo.DATASET, "finetune-datasets", "market-reports/")


MARKET_REPORTS = {
    "train": ["s3://finetune-datasets/market-reports/train.jsonl"],
    "eval": ["s3://finetune-datasets/market-reports/eval.jsonl"],
    "format": "text",
}


@pytest.mark.timeout(1800)
def test_two_node_job_with_the_catalog_model_trains_across_two_pods(cluster: ClusterHandle) -> None:
    """The catalog's own model (a GGUF file): each pod imports it in full into its own cache,
    whatever its rank (rank 1 used to find only the tokenizer there)."""
    _stage_market_reports(cluster)
    name = _apply(cluster, f"two-nodes-{uuid.uuid4().hex[:6]}", {
        "model": {"name": "smollm2-135m-instruct"},
        "dataset": MARKET_REPORTS,
        "hyperparameters": {"maxSteps": 4, "batchSize": 4, "microBatchSize": 2, "sequenceLength": 64},
        "evaluation": {"everySteps": 2, "maxBatches": 2, "baselines": []},
        "checkpoints": {"everySteps": 2, "keepLast": 1},
        "resources": {"nodes": 2, "cpu": "1", "memory": "2Gi"},
    })  # fmt: skip
    status = _finished(cluster, name, timeout=1800)

    pods = _assert_trained_on_two_pods(cluster, status)
    assert [e["step"] for e in status["evaluations"]] == [0, 2, 4]
    # Pods ran as the trainer image's user with a read-only root filesystem and bounded disk.
    spec = pods[0]["spec"]
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"]: v for v in spec["volumes"]}["cache"]["emptyDir"]["sizeLimit"] == "7Gi"


def _run_prefix(status: dict[str, Any]) -> str:
    run = str(status["runUri"])
    assert run.startswith("s3://finetune-runs/"), run
    return run.removeprefix("s3://finetune-runs/")


def _metrics(cluster: ClusterHandle, status: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records of `kind` (full precision; status rounds its figures)."""
    body = cluster.s3_client().get_object(Bucket="finetune-runs", Key=_run_prefix(status) + "metrics.jsonl")[
        "Body"
    ]
    records = [json.loads(line) for line in body.read().decode().splitlines()]
    return [r for r in records if r["kind"] == kind]


@pytest.mark.timeout(1800)
def test_fsdp_across_two_pods_equals_one_process_and_exports_a_loadable_model(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    """hyperparameters.sharding fsdp over resources.nodes 2 (one process per pod, gloo between
    the pods): the same run as one process with the same global batch — evaluations and training
    losses within the trainer tests' tolerance (tests/trainer/test_distributed.py: 1e-5
    relative) — one DCP checkpoint holding both ranks' shards, and a final/ that
    AutoModelForCausalLM loads. A tiny Llama keeps it cheap."""
    import torch
    from transformers import AutoModelForCausalLM

    _stage_market_reports(cluster)
    s3 = cluster.s3_client()
    tokenizer = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer)
    model_prefix = f"e2e-tiny-llama-{uuid.uuid4().hex[:6]}/"
    model_dir = make_model_dir("llama", tmp_path / "model", tokenizer)
    demo._upload_dir(s3, model_dir, "finetune-models", model_prefix)
    run_id = uuid.uuid4().hex[:6]

    def spec(nodes: int, sharding: str) -> dict[str, Any]:
        return {
            "model": {"uri": f"s3://finetune-models/{model_prefix}"},
            "dataset": MARKET_REPORTS,
            # accumulation 4 on one process, 2 on each of the two pods: the same global batch
            "hyperparameters": {"maxSteps": 4, "batchSize": 4, "microBatchSize": 1, "sequenceLength": 32,
                                "learningRate": 1e-3, "lrScheduler": "constant", "sharding": sharding},
            # the whole eval set: maxBatches counts per process, so it would differ between 1 and 2
            "evaluation": {"everySteps": 2, "logEverySteps": 1, "baselines": []},
            "checkpoints": {"everySteps": 2, "keepLast": 1},
            "resources": {"nodes": nodes, "cpu": "500m", "memory": "2Gi"},
        }  # fmt: skip

    names = [_apply(cluster, f"one-process-{run_id}", spec(1, "data-parallel")),
             _apply(cluster, f"fsdp-two-pods-{run_id}", spec(2, "fsdp"))]  # fmt: skip
    single, fsdp = (_finished(cluster, name, timeout=900) for name in names)

    assert single["phase"] == "Succeeded", single.get("message")
    _assert_trained_on_two_pods(cluster, fsdp)
    # the same run: every evaluation and every logged training loss
    assert [e["step"] for e in fsdp["evaluations"]] == [e["step"] for e in single["evaluations"]] == [0, 2, 4]
    evaluations = {
        name: _metrics(cluster, status, "eval") for name, status in (("single", single), ("fsdp", fsdp))
    }
    for one, two in zip(evaluations["single"], evaluations["fsdp"], strict=True):
        assert (two["step"], two["tokens"]) == (one["step"], one["tokens"])
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), (one, two)
        assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9), (one, two)
    losses = {
        name: _metrics(cluster, status, "train") for name, status in (("single", single), ("fsdp", fsdp))
    }
    assert [r["step"] for r in losses["fsdp"]] == [r["step"] for r in losses["single"]] == [1, 2, 3, 4]
    for one, two in zip(losses["single"], losses["fsdp"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), (one, two)
    pairs = [
        (a["loss"], b["loss"])
        for kind in (evaluations, losses)
        for a, b in zip(kind["single"], kind["fsdp"], strict=True)
    ]
    print(f"final eval loss, one process {evaluations['single'][-1]['loss']!r} vs fsdp on two pods "
          f"{evaluations['fsdp'][-1]['loss']!r}; largest relative difference of any loss "
          f"{max(abs(b - a) / abs(a) for a, b in pairs):.2e}")  # fmt: skip

    # one sharded checkpoint: each pod uploaded its own shard, the manifest lists both, last
    prefix = _run_prefix(fsdp)
    objects = _objects(cluster, "finetune-runs", prefix)
    checkpoint = f"{prefix}checkpoints/step-000004/"
    manifest = json.loads(
        s3.get_object(Bucket="finetune-runs", Key=checkpoint + "manifest.json")["Body"].read()
    )
    assert manifest["format"] == "dcp"
    assert {f["path"] for f in manifest["files"]} == {
        "state/.metadata",
        "state/__0_0.distcp",
        "state/__1_0.distcp",
        "train_state.json",
    }
    for entry in manifest["files"]:
        assert objects[checkpoint + entry["path"]] == entry["size"], entry
    assert not any(k.startswith(checkpoint + ".ranks/") for k in objects), "no per-rank listing left behind"
    assert [c["step"] for c in fsdp["checkpoints"]] == [4]
    train_state = json.loads(
        s3.get_object(Bucket="finetune-runs", Key=checkpoint + "train_state.json")["Body"].read()
    )
    assert (train_state["worldSize"], train_state["sharding"]) == (2, "fsdp")

    # final/ is a plain Hugging Face folder gathered from the shards
    final = tmp_path / "final"
    for key in (k for k in objects if k.startswith(f"{prefix}final/")):
        target = final / key.removeprefix(f"{prefix}final/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("finetune-runs", key, str(target))
    exported = AutoModelForCausalLM.from_pretrained(final)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert exported.num_parameters() == original.num_parameters()
    trained = dict(exported.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in original.named_parameters()), (
        "final/ holds trained weights"
    )
