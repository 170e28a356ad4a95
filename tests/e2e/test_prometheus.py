"""Monitoring as a user of the Prometheus Operator gets it, with the real Prometheus server.

The chart is installed with its ServiceMonitor, PodMonitor and PrometheusRule against the
Prometheus Operator's own CRDs (from its pinned Go module's source); a real trainer trains a tiny
model from S3. Prometheus (built from its Go module) discovers the operator and the trainer with
Kubernetes service discovery against the local API server, selected exactly as the chart's
monitors say (tests/prometheus_env.py translates them), scrapes both, and evaluates the chart's
rules. Every query of the Grafana dashboard, with its namespace and job variables set to the
running job, returns data; the variables' own queries list the job.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import binaries, demo
from tests.e2e.test_demo import _tiny_model
from tests.integration.operator_env import SYSTEM_NAMESPACE, free_port, identity_kubeconfig
from tests.kube import ClusterHandle, get, wait_for
from tests.prometheus_env import PROMETHEUS_RBAC, rule_file, running_prometheus, scrape_configs

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "finetune-operator" / "dashboards" / "finetune-operator.json"
PROMETHEUS_OPERATOR = binaries.Component(
    name="prometheus-operator",
    module="github.com/prometheus-operator/prometheus-operator",
    version="v0.85.0",
    binaries={},
)
MONITOR_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")


def _install_chart_with_monitoring(cluster: ClusterHandle) -> None:
    crds = binaries.module_source(PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    for plural in MONITOR_CRDS:
        cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(crds / f"monitoring.coreos.com_{plural}.yaml"),
        )
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=60s"
        )
    demo.install_operator(cluster.cluster)
    cluster.helm(
        "upgrade", "finetune-operator", str(demo.CHART), "-n", demo.OPERATOR_NAMESPACE, "--reuse-values",
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.interval=2s",
        "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.interval=2s",
        "--set", "metrics.prometheusRule.enabled=true",
        "--wait", "--timeout", "180s",
    )  # fmt: skip


def _monitoring_objects(cluster: ClusterHandle) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chart's monitors and rule as the API server stores them."""
    monitors = []
    for plural in ("servicemonitors", "podmonitors"):
        monitors += get(cluster, demo.OPERATOR_NAMESPACE, f"{plural}.monitoring.coreos.com")["items"]
    [rule] = get(cluster, demo.OPERATOR_NAMESPACE, "prometheusrules.monitoring.coreos.com")["items"]
    return monitors, rule


def _start_job(cluster: ClusterHandle, tmp_path: Path) -> str:
    s3 = cluster.s3_client()
    for bucket in ("finetune-models", "finetune-datasets", "finetune-runs"):
        demo._ensure_bucket(s3, bucket)
    key = f"tiny-llama-{uuid.uuid4().hex[:6]}/"
    demo._upload_dir(s3, _tiny_model(tmp_path), "finetune-models", key)
    demo._upload_dir(s3, demo.DATASET, "finetune-datasets", "market-reports/")
    name = f"scraped-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": demo.DEMO_NAMESPACE},
        "spec": {
            "model": {"uri": f"s3://finetune-models/{key}"},
            "dataset": {
                "train": ["s3://finetune-datasets/market-reports/train.jsonl"],
                "eval": ["s3://finetune-datasets/market-reports/eval.jsonl"],
                "format": "text",
            },
            # Long enough to be scraped while it runs; cancelled at the end.
            "hyperparameters": {
                "maxSteps": 100000,
                "batchSize": 4,
                "microBatchSize": 2,
                "sequenceLength": 64,
            },
            "evaluation": {"everySteps": 100, "maxBatches": 1},
            "checkpoints": {"everySteps": 100, "keepLast": 1},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    return name


def _dashboard_queries(namespace: str, job: str) -> dict[str, str]:
    """Each panel's PromQL with the dashboard's variables set, as Grafana sends it."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$namespace": re.escape(namespace), "$job": re.escape(job)}
    out = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            out[f"{panel['title']} ({target['refId']})"] = expr
    return out


def test_prometheus_scrapes_operator_and_trainer_and_every_panel_has_data(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    _install_chart_with_monitoring(cluster)
    monitors, rule = _monitoring_objects(cluster)
    assert sorted(m["kind"] for m in monitors) == ["PodMonitor", "ServiceMonitor"]
    kubeconfig = identity_kubeconfig(cluster, "prometheus-test", PROMETHEUS_RBAC, tmp_path)
    name = _start_job(cluster, tmp_path)
    namespace = demo.DEMO_NAMESPACE
    try:
        with running_prometheus(
            tmp_path,
            scrape_configs(monitors, kubeconfig),
            [rule_file(rule, tmp_path / "rules.yaml")],
            free_port(),
        ) as prometheus:
            # Discovery finds exactly the operator (through its Service) and rank 0 of the job.
            def scraped() -> list[dict[str, Any]] | None:
                up = [t for t in prometheus.targets() if t["health"] == "up"]
                jobs = {t["labels"].get("finetunejob") for t in up}
                return (
                    up if any(t["labels"]["job"].endswith("-metrics") for t in up) and name in jobs else None
                )

            up = wait_for(
                scraped,
                timeout=300,
                what=f"Prometheus to scrape the operator and {name}'s trainer",
                interval=2,
            )
            trainer = [t for t in up if t["labels"].get("finetunejob") == name]
            assert [t["labels"]["pod"].startswith(f"{name}-0-") for t in trainer] == [True]
            assert trainer[0]["labels"]["namespace"] == namespace

            queries = _dashboard_queries(namespace, name)
            missing: dict[str, str] = {}

            def every_panel_has_data() -> bool:
                missing.clear()
                missing.update({title: expr for title, expr in queries.items() if not prometheus.query(expr)})
                return not missing

            wait_for(
                every_panel_has_data,
                timeout=600,
                what=f"data in every panel (missing: {missing})",
                interval=5,
            )
            job_phase = prometheus.query(f'finetune_operator_job_phase{{finetunejob="{name}"}}')
            assert {r["metric"]["namespace"] for r in job_phase} == {namespace}, (
                "honorLabels keeps the job's namespace"
            )
            assert {r["metric"]["phase"] for r in job_phase} == {"Running"}
            assert namespace in prometheus.label_values("namespace", "finetune_operator_job_phase")
            assert name in prometheus.label_values(
                "finetunejob", f'finetune_operator_job_phase{{namespace="{namespace}"}}'
            )

            # The chart's rules load and evaluate without error; none fires for a healthy job.
            rules = prometheus.rules()
            assert {r["name"] for r in rules} == {
                "FineTuneJobFailed",
                "FineTuneJobNoProgress",
                "FineTuneCheckpointUploadsFailing",
            }
            wait_for(
                lambda: all(r.get("lastEvaluation", "").startswith("2") for r in prometheus.rules()),
                timeout=30,
                what="rules evaluated",
            )
            assert all(r["health"] == "ok" for r in prometheus.rules()), prometheus.rules()
            firing = [
                a
                for r in prometheus.rules()
                for a in r.get("alerts", [])
                if a["labels"].get("finetunejob") == name
            ]
            assert firing == []
    finally:
        cluster.kubectl(
            "patch",
            "ftj",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"spec":{"cancel":true}}',
            check=False,
        )
        cluster.kubectl(
            "delete", "clusterrolebinding,clusterrole", "prometheus-test", "--ignore-not-found", check=False
        )
        cluster.kubectl(
            "delete",
            "serviceaccount",
            "prometheus-test",
            "-n",
            SYSTEM_NAMESPACE,
            "--ignore-not-found",
            check=False,
        )
