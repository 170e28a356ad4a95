"""Security by default, as tests (pure): the chart's RBAC has no wildcard and is exactly the
operator's rules; training pods get no Kubernetes API token; credentials reach pods only as
Secret references, never as values in a spec, a ConfigMap or an env value. The run-time scan
(spec, ConfigMap, status, events, logs, termination messages of a whole run) is
tests/integration/test_operator_faults.py::test_no_credential_leaks_across_a_full_run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune_operator import builders, rbac
from finetune_operator.settings import Settings
from tests.operator.factories import SETTINGS, parsed

CHART = Path(__file__).resolve().parents[2] / "helm" / "finetune-operator"


def test_operator_rbac_has_no_wildcard() -> None:
    for group, resources, verbs, why in rbac.RULES:
        assert "*" not in (group, *resources, *verbs), f"wildcard in the rule for {why!r}"
        assert why, "every rule says why it exists"


def test_chart_rbac_is_the_operators_rules_without_wildcards() -> None:
    shipped = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
    assert shipped == rbac.cluster_role()["rules"], "run make generate"
    for path in (CHART / "templates").glob("*.yaml"):
        text = path.read_text()
        if "rbac.authorization.k8s.io" in text:
            assert "'*'" not in text and '"*"' not in text and "- '*'" not in text, path.name


def test_no_write_rights_beyond_the_children() -> None:
    writes = {
        (g, r)
        for g, resources, verbs, _ in rbac.RULES
        for r in resources
        if {"create", "patch", "update", "delete"} & set(verbs)
    }
    assert ("", "secrets") not in {(g, r) for g, resources, _, _ in rbac.RULES for r in resources}
    assert ("", "pods") not in writes
    deletes = {(g, r) for g, resources, verbs, _ in rbac.RULES for r in resources if "delete" in verbs}
    # the one delete: a gang restart replaces a multi-node job's batch Job (docs/operator.md)
    assert deletes == {("batch", "jobs")}, deletes


@pytest.mark.parametrize(
    "storage",
    [
        pytest.param({"credentialsSecret": {"name": "s3-creds"}}, id="spec-secret"),
        pytest.param({}, id="operator-default-secret"),
    ],
)
def test_pods_get_credentials_only_by_reference_and_no_api_token(storage: dict[str, object]) -> None:
    settings = Settings(**{**SETTINGS.__dict__, "credentials_secret": "cluster-s3"})
    job = parsed(storage=storage)
    children = builders.build_children(job, settings)
    pod = children[2]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not any("projected" in volume for volume in pod["volumes"])
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"]
    config = children[0]["data"]["config.yaml"]
    assert "AWS_" not in config and "secret" not in config.lower()
    assert "AWS_SECRET" not in json.dumps(children[1])
