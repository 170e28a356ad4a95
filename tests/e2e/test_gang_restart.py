"""A multi-node job is one unit: rank 1's training process killed mid-training restarts both
pods from the newest checkpoint, and the job ends as an uninterrupted twin does.

The chart's operator and the real trainer, two 2-pod FineTuneJobs on the same data trained side
by side (each rank 0 listens on the rendezvous port 29500, as in pods of their own): `steady`
runs through, `killed` loses rank 1's worker (SIGKILL) after its first checkpoint. Both must end
Succeeded with the same final evaluation (the trainer resume test's tolerance, from the run
folders' metrics.jsonl at full precision); `killed` counts one restart, and its cause — rank 1's
pod and why — is in an event, the Restarting condition and `status.lastFailure`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import binaries, demo
from tests.kube import ClusterHandle, get, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _model(tmp_path: Path) -> Path:
    """A small Llama (about a million parameters): cheap steps, yet slow enough on two cores to
    kill one mid-run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.trainer.factories import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
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
            "resources": {"nodes": 2, "cpu": "500m", "memory": "2Gi", "ephemeralStorage": "2Gi"},
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


class StatusWatch:
    """Every status a FineTuneJob goes through (`kubectl get --watch`: each write is an event),
    so a short-lived state such as Restarting is never missed between two polls."""

    def __init__(self, cluster: ClusterHandle, name: str) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [str(binaries.binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "get", "finetunejob", name,
             "-n", demo.DEMO_NAMESPACE, "--watch", "--output-watch-events", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.process.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                continue
            buffer = buffer.lstrip()[end:]
            self.statuses.append((event.get("object") or {}).get("status") or {})

    def stop(self) -> list[dict[str, Any]]:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.thread.join(timeout=10)
        return self.statuses


@pytest.mark.timeout(2400)
def test_killing_rank_1_restarts_both_pods_and_ends_as_uninterrupted(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
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
    watch = StatusWatch(cluster, killed)

    # After the first checkpoint of `killed` is complete: SIGKILL rank 1's training process.
    manifest = f"{_run_prefix(cluster, killed)}checkpoints/step-000010/manifest.json"

    def checkpointed() -> bool:
        for name in (steady, killed):  # a job that failed, or `killed` ending, fails at once
            current = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name).get("status") or {}
            ended = ("Failed", "Cancelled") if name == steady else demo.TERMINAL
            assert current.get("phase") not in ended, (name, current.get("phase"), current.get("message"))
        return bool(s3.list_objects_v2(Bucket="finetune-runs", Prefix=manifest).get("KeyCount"))

    wait_for(checkpointed, timeout=900, interval=0.2, what=f"{killed}'s first checkpoint")
    pid = wait_for(lambda: _rank1_worker(killed), timeout=60, what="rank 1's training process")
    os.kill(pid, signal.SIGKILL)

    def finished() -> bool:
        phases = [
            get(cluster, demo.DEMO_NAMESPACE, "finetunejob", n).get("status", {}).get("phase")
            for n in (steady, killed)
        ]
        return all(phase in demo.TERMINAL for phase in phases)

    wait_for(finished, timeout=1500, interval=1, what="both FineTuneJobs to finish")
    seen = watch.stop()

    status = {n: get(cluster, demo.DEMO_NAMESPACE, "finetunejob", n)["status"] for n in (steady, killed)}
    assert status[steady]["phase"] == "Succeeded", status[steady].get("message")
    assert status[killed]["phase"] == "Succeeded", status[killed].get("message")
    assert status[killed]["restarts"] == 1
    assert not status[steady].get("restarts")
    resumed, uninterrupted = _final_eval(cluster, killed), _final_eval(cluster, steady)
    assert resumed["step"] == uninterrupted["step"] == 40
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], abs=1e-6)
    assert resumed["accuracy"] == pytest.approx(uninterrupted["accuracy"], abs=1e-6)

    # The restart as a user reads it: the cause (rank 1's pod and why) in the status, in the
    # Reconciling condition while it restarted, and in the events.
    cause = status[killed]["lastFailure"]
    assert (cause["attempt"], cause["rank"], cause["reason"]) == (0, 1, "WorkerFailed"), cause
    assert cause["pod"].startswith(f"{killed}-1-"), cause
    assert cause["message"] == (
        f"pod {cause['pod']} (rank 1): exit code 1 (WorkerFailed): training process of global rank 1 "
        "died (killed by SIGKILL)"
    ), cause
    restarting = [
        c for s in seen if s.get("reason") == "Restarting"
        for c in s.get("conditions") or [] if c["type"] == "Reconciling"
    ]  # fmt: skip
    assert restarting, [s.get("reason") for s in seen]
    assert (restarting[0]["status"], restarting[0]["reason"]) == ("True", "Restarting")
    assert "restart 1 of runPolicy.backoffLimit 2" in restarting[0]["message"]
    assert restarting[0]["message"].endswith(f"after {cause['message']}"), restarting[0]["message"]
    events = _events(cluster, killed)
    failed = [m for kind, reason, m in events if (kind, reason) == ("Warning", "PodFailed")]
    assert failed == [cause["message"]], events
    assert [r for _, r, _ in events].count("Restarting") == 1, events
    job = get(cluster, demo.DEMO_NAMESPACE, "job", killed)
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "1", "the second attempt's Job"
    pods = get(cluster, demo.DEMO_NAMESPACE, "pods", "-l", f"finetune.dev/job-name={killed}")["items"]
    assert sorted(p["status"]["phase"] for p in pods) == ["Succeeded", "Succeeded"], "only its pods remain"
