"""A multi-node job is one unit: rank 1's training process killed mid-training restarts both
pods from the newest checkpoint, and the job ends as an uninterrupted twin does.

The chart's operator and the real trainer, two 2-pod FineTuneJobs on the same data trained side
by side: `steady` runs through, `killed` loses rank 1's worker (SIGKILL) after its first
checkpoint. Both must end Succeeded with the same final evaluation (the resume tests'
tolerance, from the run folders' metrics.jsonl at full precision); `killed` counts one restart,
and its failure and restart are events and conditions a user can read.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import demo
from tests.kube import ClusterHandle, get, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _model(tmp_path: Path) -> Path:
    """A small Llama (a few million parameters): steps slow enough to kill one mid-run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.trainer.factories import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    target = tmp_path / "small-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def _job(name: str, model_key: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": demo.DEMO_NAMESPACE},
        "spec": {
            "model": {"uri": f"s3://finetune-models/{model_key}"},
            "dataset": {
                "train": ["s3://finetune-datasets/market-reports/train.jsonl"],
                "eval": ["s3://finetune-datasets/market-reports/eval.jsonl"],
                "format": "text",
            },
            "hyperparameters": {"maxSteps": 40, "batchSize": 4, "microBatchSize": 2, "sequenceLength": 128,
                                "learningRate": 1e-3, "lrScheduler": "constant"},
            "evaluation": {"everySteps": 20, "maxBatches": 2, "baselines": []},
            "checkpoints": {"everySteps": 10, "keepLast": 2},
            "resources": {"nodes": 2, "cpu": "500m", "memory": "2Gi"},
            "runPolicy": {"backoffLimit": 2, "terminationGracePeriodSeconds": 30},
        },
    }  # fmt: skip


def _rank1_worker(name: str) -> int | None:
    """The pid of the training process of global rank 1 of FineTuneJob `name` (on the process
    node, pods are local processes; torchrun sets RANK in its workers only)."""
    wanted = {f"PET_MASTER_ADDR={name}-0.{name}".encode(), b"RANK=1"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            return int(entry.name)
    return None


def _run_prefix(cluster: ClusterHandle, name: str) -> str:
    """The job's run folder in the finetune-runs bucket: <namespace>/<name>/<uid>/."""
    uid = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name)["metadata"]["uid"]
    return f"{demo.DEMO_NAMESPACE}/{name}/{uid}/"


def _final_eval(cluster: ClusterHandle, name: str) -> dict[str, Any]:
    key = f"{_run_prefix(cluster, name)}metrics.jsonl"
    body = cluster.s3_client().get_object(Bucket="finetune-runs", Key=key)["Body"]
    evals = [r for line in body.read().decode().splitlines() if (r := json.loads(line)).get("kind") == "eval"]
    return evals[-1]


def _events(cluster: ClusterHandle, name: str) -> list[tuple[str, str, str]]:
    items = get(cluster, demo.DEMO_NAMESPACE, "events", "--field-selector",
                f"involvedObject.name={name},involvedObject.kind=FineTuneJob")["items"]  # fmt: skip
    return [(e["type"], e["reason"], e.get("message") or "") for e in items]


def test_killing_rank_1_restarts_both_pods_and_ends_as_uninterrupted(cluster: ClusterHandle, tmp_path: Path) -> None:
    demo.install_operator(cluster.cluster)
    s3 = cluster.s3_client()
    for bucket in ("finetune-models", "finetune-datasets", "finetune-runs"):
        demo._ensure_bucket(s3, bucket)
    key = f"small-llama-{uuid.uuid4().hex[:6]}/"
    demo._upload_dir(s3, _model(tmp_path), "finetune-models", key)
    demo._upload_dir(s3, demo.DATASET, "finetune-datasets", "market-reports/")
    suffix = uuid.uuid4().hex[:5]
    steady, killed = f"steady-{suffix}", f"killed-{suffix}"
    for name in (steady, killed):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(_job(name, key)))

    # After the first checkpoint of `killed` is complete: SIGKILL rank 1's training process.
    manifest = f"{_run_prefix(cluster, killed)}checkpoints/step-000010/manifest.json"
    wait_for(
        lambda: s3.list_objects_v2(Bucket="finetune-runs", Prefix=manifest).get("KeyCount"),
        timeout=900, interval=0.2, what=f"{killed}'s first checkpoint",
    )  # fmt: skip
    pid = wait_for(lambda: _rank1_worker(killed), timeout=60, what="rank 1's training process")
    os.kill(pid, signal.SIGKILL)

    seen: list[tuple[str, str, str]] = []  # (phase, reason, Reconciling's message) of `killed`

    def finished() -> bool:
        statuses = {n: get(cluster, demo.DEMO_NAMESPACE, "finetunejob", n).get("status") or {} for n in (steady, killed)}
        current = statuses[killed]
        reconciling = {c["type"]: c for c in current.get("conditions") or []}.get("Reconciling") or {}
        entry = (str(current.get("phase")), str(current.get("reason")), str(reconciling.get("message") or ""))
        if not seen or seen[-1] != entry:
            seen.append(entry)
        return all(s.get("phase") in demo.TERMINAL for s in statuses.values())

    wait_for(finished, timeout=1500, interval=0.5, what="both FineTuneJobs to finish")

    status = {n: get(cluster, demo.DEMO_NAMESPACE, "finetunejob", n)["status"] for n in (steady, killed)}
    assert status[steady]["phase"] == "Succeeded", status[steady].get("message")
    assert status[killed]["phase"] == "Succeeded", status[killed].get("message")
    assert status[killed]["restarts"] == 1
    assert not status[steady].get("restarts")
    resumed, uninterrupted = _final_eval(cluster, killed), _final_eval(cluster, steady)
    assert resumed["step"] == uninterrupted["step"] == 40
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], abs=1e-6)
    assert resumed["accuracy"] == pytest.approx(uninterrupted["accuracy"], abs=1e-6)

    # The restart as a user reads it: a condition while it happened, events afterwards.
    restarting = [message for phase, reason, message in seen if (phase, reason) == ("Running", "Restarting")]
    assert restarting, seen
    assert f"pod {killed}-1-" in restarting[0] and "killed by SIGKILL" in restarting[0], restarting[0]
    assert "restart 1 of runPolicy.backoffLimit 2" in restarting[0]
    events = _events(cluster, killed)
    failed = [m for kind, reason, m in events if (kind, reason) == ("Warning", "PodFailed")]
    assert len(failed) == 1 and "killed by SIGKILL" in failed[0], events
    assert any(reason == "Restarting" for _, reason, _ in events), events
    job = get(cluster, demo.DEMO_NAMESPACE, "job", killed)
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "1", "the second attempt's Job"
    pods = get(cluster, demo.DEMO_NAMESPACE, "pods", "-l", f"finetune.dev/job-name={killed}")["items"]
    assert sorted(p["status"]["phase"] for p in pods) == ["Succeeded", "Succeeded"], "only its pods remain"
