"""Operator benchmark: apply N suspended FineTuneJobs (no pods run) and measure the operator.

    python bench/operator_bench.py [--jobs 1000] [--concurrency 100] [--rate JOBS_PER_S]

Needs a running cluster (`finetune-dev up`; KUBECONFIG from `finetune-dev env`) with the CRD
applied or appliable. Starts the operator itself (`python -m finetune_operator`, a separate
process, so its memory is its own) and reports:

- apply → children created latency (the Job, created last, appears in a watch), p50/p99;
- time from the last apply until every job has a status phase;
- the operator's peak RSS (VmHWM);
- API requests per job: the operator's own (its metrics, by verb) and writes to FineTuneJobs
  (watch MODIFIED events: status patches and kopf's annotation patches);
- the same latencies for a reference measured first in the same run: the operator's reconcile
  called inline right after each apply (no watch, no queue, no worker limit), i.e. what the API
  server allows on this machine, and the operator's ratios to it.

Targets (issue 3): p99 < 1 s with 100 jobs in flight, all statuses within 60 s of the last
apply, RSS < 150 MB. Not a timed test: run it by hand; it prints a JSON summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "smollm2-135m-instruct"},
            "dataset": {"train": ["file:///bench/train.jsonl"]},
            "hyperparameters": {"maxSteps": 10, "batchSize": 4},
            "suspend": True,
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(finetune_operator_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


class Watcher(threading.Thread):
    """Records when each Job first appears and when each FineTuneJob first has a status."""

    def __init__(self, api: client.ApiClient, namespace: str, kind: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace, self.kind = api, namespace, kind
        self.first: dict[str, float] = {}
        self.modified: dict[str, int] = {}
        self.stop = threading.Event()
        self.started = threading.Event()

    def run(self) -> None:
        w = watch.Watch()
        if self.kind == "jobs":
            fn: Any = client.BatchV1Api(self.api).list_namespaced_job
            args: tuple[Any, ...] = (self.namespace,)
        else:
            fn = client.CustomObjectsApi(self.api).list_namespaced_custom_object
            args = (GROUP, VERSION, self.namespace, PLURAL)
        self.started.set()
        while not self.stop.is_set():
            try:
                self._stream(w, fn, args)
            except client.ApiException:  # e.g. 504 "too large resource version": start over
                w = watch.Watch()

    def _stream(self, w: watch.Watch, fn: Any, args: tuple[Any, ...]) -> None:
        for event in w.stream(fn, *args, timeout_seconds=5, _request_timeout=10):
            obj = event["object"]
            name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
            now = time.monotonic()
            if self.kind == "jobs":
                self.first.setdefault(name, now)
            else:
                if event["type"] == "MODIFIED":
                    self.modified[name] = self.modified.get(name, 0) + 1
                if (obj.get("status") or {}).get("phase"):
                    self.first.setdefault(name, now)
            if self.stop.is_set():
                return


def measure(
    api: client.ApiClient,
    namespace: str,
    args: argparse.Namespace,
    apply_one: Callable[[str], None],
) -> dict[str, Any]:
    """Apply args.jobs FineTuneJobs through `apply_one` with args.concurrency in flight (paced
    at args.rate per second if given); returns latencies seen by watches."""
    jobs, ftjs = Watcher(api, namespace, "jobs"), Watcher(api, namespace, "ftj")
    jobs.start()
    ftjs.start()
    jobs.started.wait()
    ftjs.started.wait()
    time.sleep(1)
    applied: dict[str, float] = {}
    started = time.monotonic()

    def create(i: int) -> None:
        if args.rate:
            time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
        name = f"bench-{i:05d}"
        t = time.monotonic()
        apply_one(name)
        applied[name] = t

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(create, range(args.jobs)))
    last_apply = max(applied.values())
    deadline = time.monotonic() + args.timeout
    while (len(jobs.first) < args.jobs or len(ftjs.first) < args.jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # let trailing writes land before counting
    jobs.stop.set()
    ftjs.stop.set()
    latencies = [jobs.first[n] - applied[n] for n in applied if n in jobs.first]
    status_times = [ftjs.first[n] for n in applied if n in ftjs.first]
    return {
        "apply_seconds": round(last_apply - started, 2),
        "children_latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "children_latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "children_latency_max_s": round(max(latencies), 3) if latencies else None,
        "jobs_with_children": len(latencies),
        "jobs_with_status": len(status_times),
        "all_status_after_last_apply_s": round(max(status_times) - last_apply, 2) if status_times else None,
        # The whole run: fair between the operator and the reference, whose applies are slower
        # because each applying thread reconciles too.
        "all_status_after_first_apply_s": round(max(status_times) - started, 2) if status_times else None,
        "finetunejob_modifications_per_job": round(sum(ftjs.modified.values()) / args.jobs, 2),
    }


def reference(api: client.ApiClient, kubectl: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The floor: the operator's own reconcile (same builders, same API calls, concurrent
    creates), called by the thread that applied the job, right after the apply — no watch, no
    queue, no worker limit. What is left between this and the operator is kopf and queueing."""
    from finetune_operator.k8s import KubeCluster
    from finetune_operator.reconcile import reconcile
    from finetune_operator.settings import Settings

    namespace = f"bench-ref-{int(time.time())}"
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True, capture_output=True)
    settings = Settings(runs_uri="file:///tmp/finetune-bench-runs/")
    cluster = KubeCluster(api, parallelism=args.concurrency)
    custom = client.CustomObjectsApi(api)

    def apply_one(name: str) -> None:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(name))
        reconcile(
            cluster,
            namespace,
            name,
            settings=settings,
            now=datetime.datetime.now(datetime.UTC),
            trigger="reference",
            fresh=created,
        )

    try:
        return measure(api, namespace, args, apply_one)
    finally:
        cluster.close()
        # Deleting thousands of objects loads the API server for a while: finish it before the
        # operator's run starts, or that run measures the garbage collector too.
        started = time.monotonic()
        subprocess.run(
            [*kubectl, "delete", "namespace", namespace, "--wait=true", "--timeout=900s"], capture_output=True
        )
        print(f"reference namespace deleted in {time.monotonic() - started:.0f}s", file=sys.stderr)


def wait_for_quiet_namespaces(kubectl: list[str]) -> None:
    """Wait until no earlier benchmark namespace is still being deleted (see `reference`)."""
    while True:
        listed = subprocess.run(
            [*kubectl, "get", "namespaces", "-o", "json"], check=True, capture_output=True, text=True
        ).stdout
        terminating = [
            item["metadata"]["name"]
            for item in json.loads(listed)["items"]
            if item["metadata"]["name"].startswith("bench-") and item["status"].get("phase") == "Terminating"
        ]
        if not terminating:
            return
        print(f"waiting for namespaces being deleted: {', '.join(terminating)}", file=sys.stderr)
        time.sleep(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100, help="creates in flight")
    parser.add_argument("--rate", type=float, default=0, help="pace the applies (jobs/s); 0: a burst")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference run")
    parser.add_argument("--keep", action="store_true", help="keep the namespace afterwards")
    args = parser.parse_args()

    kubectl = ["kubectl", f"--kubeconfig={args.kubeconfig}"]
    subprocess.run(
        [*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(CRD)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}"],
        check=True,
        capture_output=True,
    )
    wait_for_quiet_namespaces(kubectl)
    api = config.new_client_from_config(config_file=args.kubeconfig)
    api.configuration.connection_pool_maxsize = 2 * args.concurrency
    floor = None if args.no_reference else reference(api, kubectl, args)

    namespace = f"bench-{int(time.time())}"
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True, capture_output=True)
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": args.kubeconfig,
        "FINETUNE_RUNS_URI": "file:///tmp/finetune-bench-runs/",
        "FINETUNE_METRICS_PORT": str(port),
        "FINETUNE_METRICS_ADDR": "127.0.0.1",
        "FINETUNE_LIVENESS_ENDPOINT": "",
        "FINETUNE_NAMESPACES": namespace,
    }
    log = open(f"/tmp/{namespace}-operator.log", "w")  # noqa: SIM115 (closed at the end)
    operator = subprocess.Popen(
        [sys.executable, "-m", "finetune_operator"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    custom = client.CustomObjectsApi(api)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(metrics_url)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"operator did not start; see {log.name}") from None
                time.sleep(0.5)
        time.sleep(2)  # let kopf's watches start
        rss_idle = peak_rss_mb(operator.pid)
        cpu_idle = cpu_seconds(operator.pid)
        before = scrape(metrics_url)

        def apply_one(name: str) -> None:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(name))

        measured = measure(api, namespace, args, apply_one)
        after = scrape(metrics_url)
        requests = {
            key: (after.get(key, 0) - before.get(key, 0)) / args.jobs
            for key in after
            if key.startswith("finetune_operator_api_requests_total")
        }
        writes = sum(v for k, v in requests.items() if 'verb="create"' in k or 'verb="patch"' in k)
        summary: dict[str, Any] = {
            "jobs": args.jobs,
            "concurrency": args.concurrency,
            "rate": args.rate or "burst",
            "workers": int(os.environ.get("FINETUNE_MAX_WORKERS", "0")) or "default",
            **measured,
            "operator_rss_idle_mb": round(rss_idle, 1),
            "operator_peak_rss_mb": round(peak_rss_mb(operator.pid), 1),
            "operator_cpu_ms_per_job": round(1000 * (cpu_seconds(operator.pid) - cpu_idle) / args.jobs, 1),
            "operator_requests_per_job": {
                k.split("{", 1)[1].rstrip("}"): round(v, 2) for k, v in requests.items()
            },
            "operator_writes_per_job": round(writes, 2),
            "status_writes_per_job": round(
                (
                    after.get("finetune_operator_status_writes_total", 0)
                    - before.get("finetune_operator_status_writes_total", 0)
                )
                / args.jobs,
                2,
            ),
        }
        for trigger in ("create", "job-event", "resume", "update", "timer"):
            key = f'{{trigger="{trigger}"}}'
            count = after.get(f"finetune_operator_reconcile_duration_seconds_count{key}", 0) - before.get(
                f"finetune_operator_reconcile_duration_seconds_count{key}", 0
            )
            total = after.get(f"finetune_operator_reconcile_duration_seconds_sum{key}", 0) - before.get(
                f"finetune_operator_reconcile_duration_seconds_sum{key}", 0
            )
            if count:
                summary[f"reconciles_{trigger}"] = int(count)
                summary[f"reconcile_mean_ms_{trigger}"] = round(1000 * total / count, 1)
        if floor is not None:
            summary["reference"] = floor
            summary["ratio_vs_reference"] = {
                key: round(measured[key] / floor[key], 2) if floor.get(key) else None
                for key in (
                    "children_latency_p50_s",
                    "children_latency_p99_s",
                    "all_status_after_first_apply_s",
                )
            }
        print(json.dumps(summary, indent=2))
        return 0
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
        if not args.keep:
            subprocess.run([*kubectl, "delete", "namespace", namespace, "--wait=false"], capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
