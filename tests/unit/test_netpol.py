"""The NetworkPolicy evaluator (finetune_dev.netpol) on its own: each rule of the
networking.k8s.io/v1 semantics, on hand-written policies."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_dev.netpol import Endpoint, allowed, selector_matches

NAMESPACES = {
    "team-a": {"kubernetes.io/metadata.name": "team-a", "tier": "training"},
    "team-b": {"kubernetes.io/metadata.name": "team-b"},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
}
TRAINER = Endpoint("team-a", {"app": "trainer", "job": "x"}, "10.0.0.1", {"progress": 9090}, "x-0")
PEER = Endpoint("team-a", {"app": "trainer", "job": "x"}, "10.0.0.2", name="x-1")
OTHER_JOB = Endpoint("team-a", {"app": "trainer", "job": "y"}, "10.0.0.3", name="y-0")
STRANGER = Endpoint("team-b", {"app": "trainer", "job": "x"}, "10.0.1.1", name="b-0")
PROMETHEUS = Endpoint("monitoring", {"app": "prometheus"}, "10.0.2.1", name="prom-0")


def policy(namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"job": "x"}}, **spec},
    }


def test_no_policy_means_not_isolated() -> None:
    assert allowed([], NAMESPACES, STRANGER, TRAINER, 1234)


def test_a_selecting_policy_without_rules_denies_all_ingress() -> None:
    policies = [policy(policyTypes=["Ingress"])]
    assert not allowed(policies, NAMESPACES, PEER, TRAINER, 9090)
    # a pod the policy does not select stays open
    assert allowed(policies, NAMESPACES, TRAINER, OTHER_JOB, 9090)


def test_policy_types_default_to_ingress_and_egress_only_with_egress_rules() -> None:
    ingress_only = [policy()]  # no policyTypes, no egress: Ingress
    assert not allowed(ingress_only, NAMESPACES, PEER, TRAINER, 80)
    assert allowed(ingress_only, NAMESPACES, TRAINER, OTHER_JOB, 80), "egress not isolated"
    with_egress = [policy(egress=[{"to": [{"podSelector": {"matchLabels": {"job": "x"}}}]}])]
    assert not allowed(with_egress, NAMESPACES, TRAINER, OTHER_JOB, 80), "egress isolated by its rules"
    assert not allowed(with_egress, NAMESPACES, TRAINER, PEER, 80), "and ingress too (default types)"


@pytest.mark.parametrize(
    ("peer", "source", "expected"),
    [
        pytest.param({"podSelector": {"matchLabels": {"job": "x"}}}, PEER, True, id="pod-selector-same-namespace"),
        pytest.param({"podSelector": {"matchLabels": {"job": "x"}}}, STRANGER, False, id="pod-selector-other-namespace"),
        pytest.param({"podSelector": {}}, OTHER_JOB, True, id="empty-pod-selector-all-of-namespace"),
        pytest.param({"namespaceSelector": {}}, PROMETHEUS, True, id="empty-namespace-selector-everyone"),
        pytest.param(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            PROMETHEUS, True, id="namespace-selector-alone",
        ),
        pytest.param(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
             "podSelector": {"matchLabels": {"app": "grafana"}}},
            PROMETHEUS, False, id="both-selectors-and",
        ),
        pytest.param({"ipBlock": {"cidr": "10.0.2.0/24"}}, PROMETHEUS, True, id="ip-block"),
        pytest.param({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}, PROMETHEUS, False, id="ip-block-except"),
    ],
)  # fmt: skip
def test_peers(peer: dict[str, Any], source: Endpoint, expected: bool) -> None:
    policies = [policy(ingress=[{"from": [peer]}])]
    assert allowed(policies, NAMESPACES, source, TRAINER, 80) is expected


@pytest.mark.parametrize(
    ("ports", "port", "protocol", "expected"),
    [
        pytest.param([{"port": 9090}], 9090, "TCP", True, id="number-default-tcp"),
        pytest.param([{"port": 9090}], 9090, "UDP", False, id="other-protocol"),
        pytest.param([{"port": 9090}], 9091, "TCP", False, id="other-port"),
        pytest.param([{"port": "progress"}], 9090, "TCP", True, id="named-port-of-destination"),
        pytest.param([{"port": "metrics"}], 9090, "TCP", False, id="unknown-named-port"),
        pytest.param([{"port": 29000, "endPort": 29999}], 29500, "TCP", True, id="range"),
        pytest.param([{"protocol": "TCP"}], 40123, "TCP", True, id="protocol-only-every-port"),
        pytest.param([], 40123, "TCP", True, id="no-ports-every-port"),
    ],
)
def test_ports(ports: list[dict[str, Any]], port: int, protocol: str, expected: bool) -> None:
    policies = [policy(ingress=[{"from": [{"podSelector": {}}], "ports": ports}])]
    assert allowed(policies, NAMESPACES, PEER, TRAINER, port, protocol) is expected


def test_policies_add_up_and_a_rule_needs_peer_and_port() -> None:
    policies = [
        policy(ingress=[{"from": [{"podSelector": {"matchLabels": {"job": "x"}}}]}]),
        policy(ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                         "ports": [{"port": 9090}]}]),
    ]  # fmt: skip
    assert allowed(policies, NAMESPACES, PEER, TRAINER, 40123)
    assert allowed(policies, NAMESPACES, PROMETHEUS, TRAINER, 9090)
    assert not allowed(policies, NAMESPACES, PROMETHEUS, TRAINER, 29500)
    assert not allowed(policies, NAMESPACES, OTHER_JOB, TRAINER, 9090)


def test_policies_of_another_namespace_do_not_select() -> None:
    assert allowed([policy(namespace="team-b")], NAMESPACES, OTHER_JOB, TRAINER, 80)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param({"matchExpressions": [{"key": "job", "operator": "In", "values": ["x", "z"]}]}, True, id="in"),
        pytest.param({"matchExpressions": [{"key": "job", "operator": "NotIn", "values": ["x"]}]}, False, id="not-in"),
        pytest.param({"matchExpressions": [{"key": "absent", "operator": "NotIn", "values": ["x"]}]}, True, id="not-in-absent"),
        pytest.param({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True, id="exists"),
        pytest.param({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False, id="does-not-exist"),
        pytest.param({"matchLabels": {"job": "x"}, "matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, False, id="all-must-hold"),
        pytest.param({}, True, id="empty-matches-all"),
    ],
)  # fmt: skip
def test_label_selectors(selector: dict[str, Any], expected: bool) -> None:
    assert selector_matches(selector, {"app": "trainer", "job": "x"}) is expected


def test_endpoint_from_a_pod_reads_labels_ip_and_named_ports() -> None:
    pod = {
        "metadata": {"name": "x-0", "namespace": "team-a", "labels": {"job": "x"}},
        "spec": {"containers": [{"ports": [{"name": "progress", "containerPort": 9090}]}]},
        "status": {"podIP": "127.0.0.9"},
    }
    assert Endpoint.from_pod(pod) == Endpoint("team-a", {"job": "x"}, "127.0.0.9", {"progress": 9090}, "x-0")
