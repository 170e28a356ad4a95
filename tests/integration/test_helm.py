"""The Helm chart: lints, renders manifests the real API server accepts, installs an operator
that works under the chart's own ServiceAccount, upgrades and uninstalls cleanly.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.rbac import cluster_role
from tests.kube import ClusterHandle, apply, get, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
KUBE_VERSION = "--kube-version=1.37.2"


def render(cluster: ClusterHandle, *args: str, check: bool = True) -> Any:
    return cluster.helm("template", "release", str(CHART), KUBE_VERSION, *args, check=check)


@pytest.mark.cluster
def test_chart_lints(cluster: ClusterHandle) -> None:
    result = cluster.helm("lint", str(CHART), "--strict")
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_chart_ships_the_generated_crd() -> None:
    assert (CHART / "crds" / "finetune.dev_finetunejobs.yaml").read_text() == (
        ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
    ).read_text(), "copy crds/finetune.dev_finetunejobs.yaml into the chart's crds/ (make generate)"


def test_chart_grants_exactly_the_operators_rbac_rules() -> None:
    chart_rules = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    assert chart_rules == cluster_role()["rules"], (
        "regenerate helm/finetune-operator/files/rbac-rules.yaml (make generate)"
    )


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([], id="defaults"),
        pytest.param(
            [
                "--set",
                "grafanaDashboard.enabled=true",
                "--set",
                "networkPolicy.scraper.podSelector.matchLabels.app=prom",
            ],
            id="dashboard-and-networkpolicy",
        ),
        pytest.param(
            ["--set", "watchNamespaces={NAMESPACE}", "--set", "metrics.enabled=false"], id="namespaced-rbac"
        ),
    ],
)
@pytest.mark.cluster
def test_rendered_manifests_pass_a_server_side_dry_run(
    cluster: ClusterHandle, namespace: str, values: list[str]
) -> None:
    values = [v.replace("NAMESPACE", namespace) for v in values]
    manifests = render(cluster, "--namespace", namespace, *values).stdout

    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=manifests)

    kinds = [line.split()[0].split("/")[0] for line in result.stdout.splitlines()]
    assert "deployment.apps" in kinds
    assert "serviceaccount" in kinds


@pytest.mark.cluster
def test_values_schema_rejects_a_wrong_value_naming_it(cluster: ClusterHandle) -> None:
    result = render(cluster, "--set", "metrics.port=0", check=False)
    assert result.returncode != 0
    assert "metrics.port" in result.stderr or "/metrics/port" in result.stderr
    result = render(cluster, "--set", "image.pullPolicy=Sometimes", check=False)
    assert result.returncode != 0 and "pullPolicy" in result.stderr
    for value, field in [
        ("storage.endpoint=https://AKIAEXAMPLE:s3cr3t@minio:9000", "endpoint"),
        ("storage.runsUri=file://relative/runs/", "runsUri"),
        ("storage.datasetsUri=s3:///datasets/", "datasetsUri"),
    ]:
        result = render(cluster, "--set", value, check=False)
        assert result.returncode != 0 and field in result.stderr, (value, result.stderr)
    assert render(cluster, "--set", "storage.endpoint=http://minio.storage:9000").returncode == 0


def test_dashboard_queries_only_metrics_the_components_export() -> None:
    dashboard = json.loads((CHART / "dashboards" / "finetune-operator.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    sources = (ROOT / "operator/finetune_operator/metrics.py").read_text() + (
        ROOT / "trainer/finetune_trainer/telemetry.py"
    ).read_text()
    queried = set(re.findall(r"finetune_[a-z_]+", exprs))
    assert queried
    for series in queried:
        metric = re.sub(r"_(bucket|sum|count|total)$", "", series)
        assert f'"{metric}' in sources, f"the dashboard queries {series}, which no component exports"


def _deployment(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = get(cluster, namespace, "deployment", name)
    return result


@pytest.mark.cluster
def test_install_runs_the_operator_under_its_service_account_then_upgrade_and_uninstall(
    cluster: ClusterHandle, namespace: str
) -> None:
    release = f"fo-{uuid.uuid4().hex[:6]}"
    name = f"{release}-finetune-operator"
    cluster.helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--wait",
        "--timeout",
        "180s",
    )

    deployment = _deployment(cluster, namespace, name)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    [pod] = [
        p for p in get(cluster, namespace, "pods", "-l", "app.kubernetes.io/component=operator")["items"]
    ]
    assert pod["spec"]["serviceAccountName"] == name
    assert pod["status"]["phase"] == "Running"

    # The operator, with only the chart's rights, reconciles a job: an unknown catalog model is
    # an operator-side check that must end in a Failed status with a reason.
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "unknown-model"},
            "spec": {
                "model": {"name": "no-such-model"},
                "dataset": {"train": ["s3://data/train.jsonl"]},
                "storage": {"runsUri": "s3://runs/"},
            },
        },
    )
    status = wait_for(
        lambda: (
            get(cluster, namespace, "finetunejob", "unknown-model").get("status", {}).get("phase") == "Failed"
            and get(cluster, namespace, "finetunejob", "unknown-model")["status"]
        ),
        timeout=60,
        what="the chart's operator to fail the job with an unknown model",
    )
    assert "no-such-model" in status["message"]

    cluster.helm(
        "upgrade",
        release,
        str(CHART),
        "-n",
        namespace,
        "--reuse-values",
        "--set",
        "pollIntervalSeconds=5",
        "--wait",
        "--timeout",
        "180s",
    )
    env = {
        e["name"]: e.get("value")
        for e in _deployment(cluster, namespace, name)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FINETUNE_POLL_INTERVAL_SECONDS"] == "5"
    assert "REVISION: 2" in cluster.helm("status", release, "-n", namespace).stdout

    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    assert cluster.kubectl("get", "deployment", name, "-n", namespace, check=False).returncode != 0
    assert cluster.kubectl("get", "role", name, "-n", namespace, check=False).returncode != 0
    # Helm never deletes CRDs: FineTuneJobs (and their checkpoints) survive an uninstall.
    assert cluster.kubectl("get", "crd", "finetunejobs.finetune.dev").returncode == 0


@pytest.mark.cluster
def test_pod_monitor_selects_the_rank0_trainer_pods_the_operator_creates(cluster: ClusterHandle) -> None:
    from finetune_operator.builders import COMPLETION_INDEX_ANNOTATION, labels

    docs = yaml.safe_load_all(
        render(
            cluster, "--set", "metrics.podMonitor.enabled=true", "--set", "watchNamespaces={team-a}"
        ).stdout
    )
    [monitor] = [d for d in docs if d and d["kind"] == "PodMonitor"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    trainer_labels = labels("demo", "trainer")
    assert selector.items() <= trainer_labels.items(), (
        "the PodMonitor must match the labels builders put on trainer pods"
    )
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("progress", "/metrics")
    keep, job_label = endpoint["relabelings"]
    # Only rank 0 serves /metrics; the Job controller labels each pod with its index (as well as
    # annotating it with COMPLETION_INDEX_ANNOTATION).
    assert keep["sourceLabels"] == [
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", COMPLETION_INDEX_ANNOTATION)
    ]
    assert job_label["targetLabel"] == "finetunejob"
