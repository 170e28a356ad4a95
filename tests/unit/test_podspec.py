"""The process node's pure rules: env resolution, volumes, /etc/hosts, restarts and phases."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from finetune_dev import podshim, podspec
from finetune_dev.podspec import HostEntry, PodSpecError

OBJECTS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("ConfigMap", "ns", "cfg"): {
        "data": {"mode": "fast", "path": "/data"},
        "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()},
    },
    ("Secret", "ns", "creds"): {
        "data": {"user": base64.b64encode(b"alice").decode(), "pass": base64.b64encode(b"pw").decode()}
    },
}


def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, namespace, name))


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p-0",
            "namespace": "ns",
            "uid": "u1",
            "labels": {"app": "x"},
            "annotations": {"a": "b"},
        },
        "spec": {"nodeName": "process-node", "serviceAccountName": "sa", **spec},
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return podspec.container_env(
        pod(),
        container,
        lookup=lookup,
        pod_ip="127.0.0.10",
        host_ip="127.0.0.1",
        service_env={"KUBERNETES_SERVICE_HOST": "127.0.0.1"},
    )


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        pytest.param({"name": "V", "value": "plain"}, "plain", id="literal"),
        pytest.param(
            {"name": "V", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, "127.0.0.10", id="pod-ip"
        ),
        pytest.param(
            {"name": "V", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}, "x", id="label"
        ),
        pytest.param(
            {"name": "V", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
            "alice",
            id="secret-key",
        ),
        pytest.param(
            {"name": "V", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            "fast",
            id="configmap-key",
        ),
        pytest.param(
            {"name": "V", "value": "$(KUBERNETES_SERVICE_HOST):$$(x)"},
            "127.0.0.1:$(x)",
            id="expansion-and-escape",
        ),
        pytest.param({"name": "V", "value": "$(UNDEFINED)"}, "$(UNDEFINED)", id="unknown-var-kept"),
    ],
)
def test_env_values_resolve_like_the_kubelet(item: dict[str, Any], expected: str) -> None:
    assert env_of({"name": "c", "env": [item]})["V"] == expected


def test_env_overrides_env_from_and_prefixes_apply() -> None:
    env = env_of(
        {
            "name": "c",
            "envFrom": [
                {"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                {"secretRef": {"name": "creds"}},
            ],
            "env": [{"name": "user", "value": "bob"}],
        }
    )
    assert env["CFG_mode"] == "fast"
    assert env["user"] == "bob"
    assert env["pass"] == "pw"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        pytest.param(
            {"name": "V", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}},
            'secret "missing" not found',
            id="missing-secret",
        ),
        pytest.param(
            {"name": "V", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}},
            "couldn't find key nope",
            id="missing-key",
        ),
    ],
)
def test_missing_references_are_reported_with_the_name(item: dict[str, Any], message: str) -> None:
    with pytest.raises(PodSpecError, match=message) as info:
        env_of({"name": "c", "env": [item]})
    assert info.value.reason == "CreateContainerConfigError"


def test_optional_missing_reference_is_skipped() -> None:
    env = env_of(
        {
            "name": "c",
            "env": [
                {
                    "name": "V",
                    "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": True}},
                }
            ],
        }
    )
    assert "V" not in env


def test_command_and_args_are_joined_and_expanded() -> None:
    assert podspec.command_line(
        {"name": "c", "command": ["run"], "args": ["--ip=$(IP)"]}, {"IP": "127.0.0.10"}
    ) == ["run", "--ip=127.0.0.10"]


def test_a_container_without_command_is_refused_with_the_reason() -> None:
    with pytest.raises(PodSpecError, match="command or args must be set"):
        podspec.command_line({"name": "c"}, {})


def _volume(volume: dict[str, Any]) -> podspec.VolumeFiles:
    return podspec.volume_files(
        pod(),
        volume,
        lookup=lookup,
        token=lambda exp, aud: f"token-{exp}-{aud}",
        pod_ip="127.0.0.10",
        host_ip="127.0.0.1",
    )


def test_configmap_volume_with_items_and_binary_data() -> None:
    assert _volume({"name": "v", "configMap": {"name": "cfg"}}).files == {
        "mode": b"fast",
        "path": b"/data",
        "blob": b"\x00\x01",
    }
    assert _volume(
        {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "mode", "path": "sub/m.txt"}]}}
    ).files == {"sub/m.txt": b"fast"}


def test_projected_service_account_volume_has_token_ca_and_namespace() -> None:
    files = _volume(
        {
            "name": "kube-api-access",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "ca.crt"}]}},
                    {
                        "downwardAPI": {
                            "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                        }
                    },
                ]
            },
        }
    ).files
    assert files == {"token": b"token-3607-None", "ca.crt": b"fast", "namespace": b"ns"}


def test_unsupported_volume_type_names_the_supported_ones() -> None:
    with pytest.raises(PodSpecError, match=r"persistentVolumeClaim.*supported: configMap"):
        _volume({"name": "data", "persistentVolumeClaim": {"claimName": "x"}})


def test_hosts_file_resolves_peers_behind_a_headless_service_only() -> None:
    me = HostEntry("ns", "127.0.0.10", "job-0", "workers")
    peer = HostEntry("ns", "127.0.0.11", "job-1", "workers")
    stranger = HostEntry("other", "127.0.0.12", "job-0", "workers")
    no_service = HostEntry("ns", "127.0.0.13", "solo", "nosvc")
    text = podspec.hosts_file(me, [me, peer, stranger, no_service], {("ns", "workers"), ("other", "workers")})
    lines = text.splitlines()
    assert (
        "127.0.0.10\tjob-0.workers.ns.svc.cluster.local\tjob-0.workers.ns.svc\tjob-0.workers\tjob-0" in lines
    )
    assert "127.0.0.11\tjob-1.workers.ns.svc.cluster.local\tjob-1.workers.ns.svc\tjob-1.workers" in lines
    # Another namespace's pod is reachable only by its fully qualified name.
    assert "127.0.0.12\tjob-0.workers.other.svc.cluster.local\tjob-0.workers.other.svc" in lines
    assert "127.0.0.13" not in text


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [
        pytest.param("Never", 1, False, id="never"),
        pytest.param("OnFailure", 1, True, id="onfailure-failed"),
        pytest.param("OnFailure", 0, False, id="onfailure-succeeded"),
        pytest.param("Always", 0, True, id="always"),
    ],
)
def test_restart_policy(policy: str, code: int, restart: bool) -> None:
    assert podspec.should_restart(policy, code) is restart


def test_phase_is_succeeded_only_when_every_container_exited_zero() -> None:
    assert podspec.terminal_phase([0, 0]) == "Succeeded"
    assert podspec.terminal_phase([0, 3]) == "Failed"


def test_hostname_defaults_to_the_pod_name() -> None:
    assert podspec.pod_hostname(pod()) == ("p-0", "")
    assert podspec.pod_hostname(pod(hostname="h", subdomain="s")) == ("h", "s")


@pytest.mark.parametrize(
    ("search_path", "targets", "expected"),
    [
        pytest.param(
            "/tmp/ci/.venv/bin:/usr/bin",
            ["/tmp", "/etc/cfg"],
            [("/tmp/ci/.venv/bin", "/tmp")],
            id="checkout-under-tmp",
        ),
        pytest.param("/root/ci/.venv/bin:/usr/bin", ["/tmp"], [], id="checkout-elsewhere"),
        pytest.param("/tmpfoo/bin", ["/tmp"], [], id="prefix-is-not-a-parent"),
        pytest.param("/data/bin", ["/data/"], [("/data/bin", "/data/")], id="trailing-slash"),
    ],
)
def test_a_volume_hiding_the_nodes_python_environment_is_named(
    search_path: str, targets: list[str], expected: list[tuple[str, str]]
) -> None:
    assert podshim.hidden_paths(search_path, targets) == expected


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        pytest.param("400Mi", 400 * 2**20, id="binary"),
        pytest.param("6Gi", 6 * 2**30, id="gibibytes"),
        pytest.param("1.5G", 1_500_000_000, id="decimal-fraction"),
        pytest.param("134217728", 2**27, id="bytes"),
        pytest.param("1e9", 10**9, id="exponent"),
    ],
)
def test_memory_limit_in_bytes(quantity: str, expected: int) -> None:
    assert podspec.memory_limit_bytes({"resources": {"limits": {"memory": quantity}}}) == expected


def test_no_memory_limit_and_a_bad_one() -> None:
    assert podspec.memory_limit_bytes({"resources": {"requests": {"memory": "1Gi"}}}) is None
    with pytest.raises(podspec.PodSpecError, match=r"resources.limits.memory: '12 apples' is not a quantity"):
        podspec.memory_limit_bytes({"resources": {"limits": {"memory": "12 apples"}}})
