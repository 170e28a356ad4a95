"""kube-score (built from its Go module, finetune_dev.binaries) on the chart's manifests and on
the training pods the operator creates: every finding is one of the deliberate choices that
docs/helm.md documents ("kube-score"), and each of those is still there (no stale exception).

Needs the built binaries (helm, kube-score), not a running cluster.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev import binaries
from finetune_operator import builders
from finetune_operator.settings import Settings
from tests.operator.factories import parsed

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"
# Deliberate, documented in docs/helm.md: (kind, check id, kube-score's summary).
DELIBERATE = {
    # Images are pinned by version; Always would pull a multi-GB trainer image for every pod.
    ("Deployment", "container-image-pull-policy", "ImagePullPolicy is not set to Always"),
    ("Job", "container-image-pull-policy", "ImagePullPolicy is not set to Always"),
    # Egress is open: object storage, the API server, a model hub live at addresses the chart
    # cannot know. Ingress is restricted (the same check's ingress half passes).
    ("Deployment", "pod-networkpolicy", "The pod does not have a matching egress NetworkPolicy"),
    ("Job", "pod-networkpolicy", "The pod does not have a matching egress NetworkPolicy"),
    # One operator replica: two active kopf operators would race (Recreate for the same reason).
    ("Deployment", "deployment-replicas", "Deployment few replicas"),
    ("Deployment", "deployment-strategy", "Deployment update strategy"),
}
# No CPU limits (they throttle training and the operator's bursts); requests are set.
FLAGS = ("--ignore-container-cpu-limit",)


def kube_score(manifests: str) -> set[tuple[str, str, str]]:
    result = subprocess.run(
        [str(binaries.binary("kube-score")), "score", "-o", "json", *FLAGS, "-"],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    findings = set()
    for obj in json.loads(result.stdout):
        for check in obj["checks"]:
            if check["grade"] < 10 and not check["skipped"]:
                for comment in check["comments"] or [{"summary": ""}]:
                    findings.add((obj["type_meta"]["kind"], check["check"]["id"], comment["summary"]))
    return findings


def chart_manifests(*values: str) -> str:
    result = subprocess.run(
        [str(binaries.binary("helm")), "template", "release", str(CHART), "--namespace", "finetune-system",
         "--kube-version=1.37.2", *values],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def trainer_manifests(settings: Settings, **spec: Any) -> str:
    return yaml.safe_dump_all(builders.build_children(parsed(**spec), settings))


# What the chart passes the operator (templates/deployment.yaml) with the default values.
CHART_SETTINGS = Settings(
    trainer_image="ghcr.io/finetune-operator/trainer:0.1.0",
    runs_uri="s3://finetune-runs/",
    network_policy=True,
    operator_namespace="finetune-system",
    operator_pod_labels={
        "app.kubernetes.io/name": "finetune-operator",
        "app.kubernetes.io/instance": "release",
        "app.kubernetes.io/component": "operator",
    },
    metrics_scraper={
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    },
)


@pytest.mark.parametrize(
    "spec",
    [
        # resources.cpu and memory have no defaults (the operator cannot guess them): set here,
        # as docs/helm.md advises.
        pytest.param({"resources": {"cpu": "4", "memory": "16Gi"}}, id="one-pod"),
        pytest.param(
            {"resources": {"nodes": 2, "processesPerNode": 4, "gpus": 4, "cpu": "16", "memory": "64Gi"},
             "hyperparameters": {"maxSteps": 100, "batchSize": 64}},
            id="two-nodes-four-gpus",
        ),
    ],
)  # fmt: skip
def test_training_pods_pass_kube_score_but_for_the_documented_choices(spec: dict[str, Any]) -> None:
    # The chart's manifests go along: kube-score checks that a NetworkPolicy selects the pods.
    findings = kube_score(trainer_manifests(CHART_SETTINGS, **spec))
    job_findings = {f for f in findings if f[0] == "Job"}
    assert job_findings == {f for f in DELIBERATE if f[0] == "Job"}, findings - DELIBERATE


def test_chart_passes_kube_score_but_for_the_documented_choices() -> None:
    findings = kube_score(chart_manifests())
    assert findings == {f for f in DELIBERATE if f[0] == "Deployment"}, findings - DELIBERATE


def test_without_network_policies_kube_score_notices() -> None:
    """The check is live: with the chart's NetworkPolicy off, the operator's pod is flagged."""
    findings = kube_score(chart_manifests("--set", "networkPolicy.enabled=false"))
    assert ("Deployment", "pod-networkpolicy", "The pod does not have a matching NetworkPolicy") in findings
