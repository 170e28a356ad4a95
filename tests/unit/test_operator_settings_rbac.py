"""Operator settings from the environment, and the RBAC rules the chart ships (pure)."""

from __future__ import annotations

import pytest

from finetune_operator import rbac
from finetune_operator.settings import DEFAULT_TRAINER_COMMAND, Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.trainer_command == DEFAULT_TRAINER_COMMAND
    assert (settings.progress_port, settings.master_port, settings.poll_interval_seconds) == (
        9090,
        29500,
        10.0,
    )
    assert settings.runs_uri is None


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        pytest.param(
            {"FINETUNE_TRAINER_COMMAND": "finetune-trainer --verbose"},
            "trainer_command",
            ("finetune-trainer", "--verbose"),
            id="command-shell-words",
        ),
        pytest.param(
            {"FINETUNE_TRAINER_COMMAND": '["python", "-m", "x y"]'},
            "trainer_command",
            ("python", "-m", "x y"),
            id="command-json",
        ),
        pytest.param({"FINETUNE_RUNS_URI": "s3://runs/"}, "runs_uri", "s3://runs/", id="runs-uri"),
        pytest.param(
            {"FINETUNE_POLL_INTERVAL_SECONDS": "2.5"}, "poll_interval_seconds", 2.5, id="poll-interval"
        ),
        pytest.param(
            {"FINETUNE_TRAINER_EXTRA_ENV": '{"HF_HUB_OFFLINE": "1"}'},
            "extra_env",
            {"HF_HUB_OFFLINE": "1"},
            id="extra-env",
        ),
        pytest.param({"FINETUNE_CREDENTIALS_SECRET": "s3"}, "credentials_secret", "s3", id="default-secret"),
        pytest.param({"FINETUNE_NETWORK_POLICY": "1"}, "network_policy", True, id="network-policy"),
        pytest.param(
            {"FINETUNE_OPERATOR_POD_LABELS": '{"app": "op"}'},
            "operator_pod_labels",
            {"app": "op"},
            id="operator-labels",
        ),
        pytest.param(
            {"FINETUNE_METRICS_SCRAPER": '{"podSelector": {"matchLabels": {"app": "prom"}}}'},
            "metrics_scraper",
            {"podSelector": {"matchLabels": {"app": "prom"}}},
            id="scraper",
        ),
        pytest.param({"FINETUNE_METRICS_SCRAPER": "{}"}, "metrics_scraper", None, id="no-scraper"),
        pytest.param({"FINETUNE_MAX_WORKERS": "3"}, "queue_limit", 24, id="worker-limit-follows-workers"),
        pytest.param({"FINETUNE_WORKER_LIMIT": "5"}, "queue_limit", 5, id="worker-limit"),
        pytest.param({"FINETUNE_METRICS_PORT": "0"}, "metrics_port", 0, id="no-metrics-server"),
        pytest.param({"FINETUNE_METRICS_ADDR": "127.0.0.1"}, "metrics_addr", "127.0.0.1", id="metrics-addr"),
        pytest.param({"FINETUNE_NAMESPACES": "a,,b"}, "namespaces", ("a", "b"), id="namespaces"),
        pytest.param({"FINETUNE_LIVENESS_ENDPOINT": ""}, "liveness_endpoint", "", id="no-liveness"),
        pytest.param({"FINETUNE_LOG_VERBOSE": "1"}, "log_verbose", True, id="verbose"),
    ],
)
def test_from_env(env: dict[str, str], attr: str, expected: object) -> None:
    assert getattr(Settings.from_env(env), attr) == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param(
            {"FINETUNE_STORAGE_ENDPOINT": "https://AKIAEXAMPLE:s3cr3t-value@minio.example:9000"},
            "FINETUNE_STORAGE_ENDPOINT (Helm: storage.endpoint) must be http(s)://<host>",
            id="endpoint-with-credentials",
        ),
        pytest.param(
            {"FINETUNE_STORAGE_ENDPOINT": "http://user@minio:9000/"},
            "FINETUNE_STORAGE_ENDPOINT",
            id="endpoint-with-user",
        ),
        pytest.param(
            {"FINETUNE_STORAGE_ENDPOINT": "minio:9000"}, "FINETUNE_STORAGE_ENDPOINT", id="no-scheme"
        ),
        pytest.param(
            {"FINETUNE_RUNS_URI": "file://relative/runs/"},
            "FINETUNE_RUNS_URI (Helm: storage.runsUri) must be a folder ending in /",
            id="relative-runs-folder",
        ),
        pytest.param({"FINETUNE_RUNS_URI": "s3://runs"}, "FINETUNE_RUNS_URI", id="runs-not-a-folder"),
        pytest.param({"FINETUNE_RUNS_URI": "s3:///runs/"}, "FINETUNE_RUNS_URI", id="runs-without-bucket"),
        pytest.param(
            {"FINETUNE_DATASETS_URI": "s3://data sets/"},
            "FINETUNE_DATASETS_URI (Helm: storage.datasetsUri)",
            id="datasets-with-space",
        ),
    ],
)
def test_storage_defaults_obey_the_spec_rules_and_never_echo_the_value(
    env: dict[str, str], named: str
) -> None:
    """The operator's defaults reach every job's ConfigMap: an endpoint with credentials in it, or
    a relative or bucket-less folder, stops the operator at start, naming the variable and the
    Helm value, without repeating the value (it may hold a password)."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert named in str(refused.value)
    (value,) = env.values()
    assert value not in str(refused.value) and "s3cr3t" not in str(refused.value)


def test_rbac_is_minimal() -> None:
    role = rbac.cluster_role()
    verbs = {
        (group, resource): set(verbs) for group, resources, verbs, _ in rbac.RULES for resource in resources
    }
    # delete only on Jobs: a multi-node job's failed attempt is deleted to restart its pods together
    assert all(
        "delete" not in v and "deletecollection" not in v and "*" not in v
        for key, v in verbs.items()
        if key != ("batch", "jobs")
    )
    assert ("", "secrets") not in verbs
    assert verbs[("", "pods")] == {"list"}
    assert verbs[("batch", "jobs")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert verbs[("networking.k8s.io", "networkpolicies")] == {"get", "create", "patch"}
    assert all(rule["apiGroups"] != ["*"] and rule["resources"] != ["*"] for rule in role["rules"])
    assert all(why for *_, why in rbac.RULES), "every rule says why"
