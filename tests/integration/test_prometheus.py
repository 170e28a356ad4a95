"""The chart's monitoring, with the real Prometheus server (binaries.PROMETHEUS) on the local cluster.

The chart is rendered with its ServiceMonitor, PodMonitor, PrometheusRule and dashboard enabled;
Prometheus gets exactly the scrape configuration the Prometheus Operator would generate from the
rendered monitors (finetune_dev.prometheus.scrape_config: Kubernetes service discovery against
the local API server, keeping what their selectors and ports select) and the PrometheusRule's
rules. The operator runs in-process, its metrics Service is the chart's (its address in an
EndpointSlice, as there is no operator pod); the trainer is metrics_trainer.py, which serves the
real trainer's exporter (finetune_trainer.telemetry) from a trainer pod the operator created.
A wrong selector, port name or relabelling in the chart leaves a panel without data and fails here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev import prometheus
from tests.integration.operator_env import (
    OperatorProcess,
    apply,
    assert_no_other_operator,
    free_port,
    manifest,
    running_operator,
    wait_phase,
)
from tests.kube import ClusterHandle, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
DASHBOARD = CHART / "dashboards" / "finetune-operator.json"
METRICS_TRAINER = Path(__file__).with_name("metrics_trainer.py")
OPERATOR_ADDRESS = "192.0.2.10"  # TEST-NET-1: never routed; rewritten to 127.0.0.1 when scraped


def to_loopback(config: dict[str, Any]) -> dict[str, Any]:
    """`config` scraping OPERATOR_ADDRESS at 127.0.0.1 (after the chart's selection, before the scrape)."""
    rewrite = {
        "source_labels": ["__address__"],
        "regex": re.escape(OPERATOR_ADDRESS) + r":(\d+)",
        "target_label": "__address__",
        "replacement": "127.0.0.1:$1",
    }
    return {**config, "relabel_configs": [*config["relabel_configs"], rewrite]}


pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def metrics_operator(
    cluster: ClusterHandle, operator_kubeconfig: Path, operator_dir: Path
) -> Iterator[OperatorProcess]:
    """The in-process operator, with metrics_trainer.py as the trainer command."""
    assert_no_other_operator(cluster)
    runs = operator_dir / "runs"
    runs.mkdir(exist_ok=True)
    with running_operator(operator_kubeconfig, runs, trainer=METRICS_TRAINER) as process:
        yield process


def render_monitoring(cluster: ClusterHandle, namespace: str) -> dict[str, dict[str, Any]]:
    """The chart's monitoring objects, by kind, rendered for a release watching `namespace`."""
    out = cluster.helm(
        "template",
        "release",
        str(CHART),
        "--kube-version=1.37.2",
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    wanted = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    found = {d["kind"]: d for d in docs if d["kind"] in wanted}
    assert set(found) == wanted, f"the chart rendered {sorted(found)} of {sorted(wanted)}"
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")]
    found["Service"] = service
    [dashboard] = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    assert json.loads(dashboard["data"]["finetune-operator.json"]) == json.loads(DASHBOARD.read_text())
    return found


def publish_operator_service(
    cluster: ClusterHandle, namespace: str, service: dict[str, Any], port: int
) -> None:
    """The chart's metrics Service, pointing at the in-process operator's 127.0.0.1:`port`.

    Without an operator pod its selector would match nothing, so the Service goes without a
    selector and an EndpointSlice carries the address, as the EndpointSlice controller would
    write it for the operator's pod (same service-name label, same port name). The API server
    refuses loopback addresses in EndpointSlices, so the slice holds OPERATOR_ADDRESS (a
    documentation address) and the scrape rewrites it to 127.0.0.1 (`to_loopback`)."""
    service = json.loads(json.dumps(service))
    service["metadata"]["namespace"] = namespace
    del service["spec"]["selector"]
    [service_port] = service["spec"]["ports"]
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": service["metadata"]["name"] + "-operator",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service["metadata"]["name"],
                "endpointslice.kubernetes.io/managed-by": "finetune-tests",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [OPERATOR_ADDRESS], "conditions": {"ready": True}}],
        "ports": [{"name": service_port["name"], "port": port, "protocol": "TCP"}],
    }
    apply(cluster, namespace, service)
    apply(cluster, namespace, endpoint_slice)


def dashboard_queries(namespace: str, job: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, with the variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "job"} <= variables
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # As Grafana substitutes a single value: as is (Kubernetes names need no regex escape).
            expr = target["expr"].replace("$namespace", namespace).replace("$job", job)
            assert "$" not in expr, f"panel {panel['title']!r} uses a variable this test does not set: {expr}"
            queries.append((panel["title"], expr))
    return queries


def panel_data(api: prometheus.PrometheusAPI, expr: str, namespace: str, job: str) -> list[dict[str, Any]]:
    """The panel's series with a finite value; those of the job if the panel is per job."""
    series = [s for s in api.query(expr) if math.isfinite(float(s["value"][1]))]
    return [
        s
        for s in series
        if s["metric"].get("finetunejob", job) == job and s["metric"].get("namespace", namespace) == namespace
    ]


def test_prometheus_scrapes_operator_and_trainer_and_every_dashboard_panel_has_data(
    cluster: ClusterHandle, namespace: str, metrics_operator: OperatorProcess, tmp_path: Path
) -> None:
    objects = render_monitoring(cluster, namespace)
    operator_port = int(metrics_operator.metrics_url.rsplit(":", 1)[1].split("/")[0])
    publish_operator_service(cluster, namespace, objects["Service"], operator_port)

    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus.rule_groups(objects["PrometheusRule"])))
    checked = prometheus.promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    scrape_configs = [
        to_loopback(config)
        for kind in ("ServiceMonitor", "PodMonitor")
        for config in prometheus.scrape_config(
            objects[kind], namespace=namespace, kubeconfig=cluster.kubeconfig, interval="1s"
        )
    ]
    job = "monitored"
    apply(
        cluster,
        namespace,
        manifest(
            job,
            hyperparameters={"maxSteps": 100000, "batchSize": 4},
            evaluation={"everySteps": 2},
            checkpoints={"everySteps": 2},
            resources={"nodes": 2},
        ),
    )
    wait_phase(cluster, namespace, job, "Running", timeout=120)

    with prometheus.running(scrape_configs, port=free_port(), rule_files=[rules]) as api:

        def targets_up() -> list[dict[str, Any]] | None:
            up = [t for t in api.targets() if t["health"] == "up"]
            kinds = {t["scrapePool"].split("/")[0] for t in up}
            return up if kinds == {"servicemonitor", "podmonitor"} else None

        up = wait_for(targets_up, timeout=60, what="the operator's and the trainer's targets up")
        trainer_targets = [t for t in up if t["scrapePool"].startswith("podmonitor/")]
        # Only rank 0 serves /metrics: rank 1's pod is selected by labels but dropped by the index.
        assert [t["labels"]["finetunejob"] for t in trainer_targets] == [job]
        assert trainer_targets[0]["labels"]["namespace"] == namespace

        # The dashboard's variables list the namespace and the job.
        assert namespace in api.label_values("namespace", "finetune_operator_job_phase")
        assert job in api.label_values(
            "finetunejob", f'finetune_operator_job_phase{{namespace="{namespace}"}}'
        )

        queries = dashboard_queries(namespace, job)
        assert len(queries) >= 10
        missing: dict[str, str] = {}

        def every_panel_has_data() -> bool:
            missing.clear()
            for title, expr in queries:
                if not panel_data(api, expr, namespace, job):
                    missing[title] = expr
            return not missing

        wait_for(
            every_panel_has_data,
            timeout=90,
            what=f"data in every dashboard panel; none in {missing}",
            interval=1,
        )
        phases = {
            s["metric"]["phase"]: float(s["value"][1])
            for s in api.query(dict(queries)["FineTuneJobs by phase"])
        }
        assert phases.get("Running") == 1.0, phases
        [step] = api.query(dict(queries)["Training step"])
        assert float(step["value"][1]) >= 2

        # Every alert rule is loaded and evaluates without error; none fires for a healthy job (the
        # no-progress one may be pending: a new series has no change yet, and it waits 30m).
        def rules_evaluated() -> list[dict[str, Any]] | None:
            loaded = api.rules()
            never = "0001-01-01T00:00:00Z"
            return loaded if loaded and all(r.get("lastEvaluation", never) != never for r in loaded) else None

        loaded = wait_for(rules_evaluated, timeout=30, what="the PrometheusRule's rules evaluated")
        assert {r["name"] for r in loaded} == {
            r["alert"] for g in objects["PrometheusRule"]["spec"]["groups"] for r in g["rules"]
        }
        assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
        # The operator's metrics are the test process's: jobs of other tests (some Failed) are in
        # them too, and may rightly fire. None fires for this namespace's healthy job.
        firing_here = [
            (r["name"], a["labels"])
            for r in loaded
            for a in r.get("alerts") or []
            if a.get("state") == "firing" and a.get("labels", {}).get("namespace") == namespace
        ]
        assert firing_here == []


def _alert(job: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "namespace": "team-a", "finetunejob": job},
        "exp_annotations": {"summary": summary, "description": description},
    }


def test_the_chart_alerts_fire_when_a_user_needs_them_and_resolve(
    cluster: ClusterHandle, tmp_path: Path
) -> None:
    """`promtool test rules` on the rendered PrometheusRule (default thresholds: 30m, 15m)."""
    objects = render_monitoring(cluster, "team-a")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus.rule_groups(objects["PrometheusRule"])))
    stuck = "Its rank-0 trainer is up but finetune_step has not moved (stuck collective, stalled data source, or a long evaluation)."
    upload = "The trainer restarts from its newest uploaded checkpoint; check the storage endpoint, bucket and credentials Secret."
    failed_summary = "FineTuneJob team-a/broken failed"
    failed_description = "kubectl describe ftj -n team-a broken shows the reason and message."
    labels = 'namespace="team-a",pod="{0}-0",finetunejob="{0}"'
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # One failed upload at minute 2, none after: alerts for the 15m window only.
                    {
                        "series": f"finetune_checkpoint_upload_failures_total{{{labels.format('uploads')}}}",
                        "values": "0 0 1x60",
                    },
                    {"series": f"finetune_step{{{labels.format('uploads')}}}", "values": "0+1x62"},
                    {"series": f"finetune_step{{{labels.format('stuck')}}}", "values": "5x62"},
                    {
                        "series": 'finetune_operator_job_phase{namespace="team-a",finetunejob="broken",phase="Failed"}',
                        "values": "1x62",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "FineTuneCheckpointUploadsFailing",
                        "exp_alerts": [
                            _alert(
                                "uploads",
                                "FineTuneJob team-a/uploads failed to upload a checkpoint in the last 15m",
                                upload,
                            )
                        ],
                    },
                    {"eval_time": "40m", "alertname": "FineTuneCheckpointUploadsFailing", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "FineTuneJobNoProgress", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "FineTuneJobNoProgress",
                        "exp_alerts": [
                            _alert(
                                "stuck",
                                "FineTuneJob team-a/stuck has made no optimizer step for 30m",
                                stuck,
                            )
                        ],
                    },
                    {
                        "eval_time": "1m",
                        "alertname": "FineTuneJobFailed",
                        "exp_alerts": [_alert("broken", failed_summary, failed_description)],
                    },
                ],
            }
        ],
    }
    unit = tmp_path / "alerts.test.yaml"
    unit.write_text(yaml.safe_dump(tests))

    result = prometheus.promtool("test", "rules", str(unit))

    assert result.returncode == 0, result.stdout + result.stderr
