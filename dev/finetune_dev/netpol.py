"""Kubernetes NetworkPolicy semantics, evaluated (pure): may pod A reach pod B on port P?

The local cluster has no CNI that enforces NetworkPolicies, so the tests evaluate the policies
the chart and the operator create against the real pods with this function instead
(tests/integration/test_network_policy.py). It follows the networking.k8s.io/v1 rules:

- A pod is isolated for ingress (egress) when a policy in its namespace selects it by
  `podSelector` and lists Ingress (Egress) in `policyTypes` — which defaults to Ingress, plus
  Egress when the policy has `egress` rules. A pod no policy isolates admits (sends) anything.
- An isolated pod admits a connection when some selecting policy has a rule whose `from` (`to`
  for egress) matches the other side — absent or empty: everyone — and whose `ports` match —
  absent or empty: every port. Policies add up; nothing denies.
- A peer is `podSelector` alone (pods of the policy's namespace), `namespaceSelector` alone (all
  pods of the matching namespaces), both (the matching pods of the matching namespaces), or an
  `ipBlock` (CIDR minus `except`). An empty selector matches everything.
- A port matches by protocol (default TCP) and number, a range up to `endPort`, or a name,
  looked up in the destination pod's container ports.
- A connection is allowed when the source's egress and the destination's ingress both allow it.

Traffic from the node itself (the kubelet's probes) is not pod traffic and not modelled.
No I/O, no Kubernetes client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Policy = Mapping[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """A pod as the policies see it."""

    namespace: str
    labels: Mapping[str, str]
    ip: str
    # container port names → numbers (for named ports in policies)
    named_ports: Mapping[str, int] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> Endpoint:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        named = {
            port["name"]: int(port["containerPort"])
            for container in spec.get("containers") or []
            for port in container.get("ports") or []
            if port.get("name")
        }
        return cls(
            namespace=meta["namespace"],
            labels=dict(meta.get("labels") or {}),
            ip=str((pod.get("status") or {}).get("podIP") or ""),
            named_ports=named,
            name=meta["name"],
        )


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector: matchLabels all equal and every matchExpression holds."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown label selector operator {operator!r}")
    return True


def policy_types(policy: Policy) -> list[str]:
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


def _selecting(policies: Sequence[Policy], pod: Endpoint, direction: str) -> list[Policy]:
    return [
        p
        for p in policies
        if p["metadata"].get("namespace") == pod.namespace
        and selector_matches((p.get("spec") or {}).get("podSelector", {}), pod.labels)
        and direction in policy_types(p)
    ]


def _peer_matches(
    peer: Mapping[str, Any],
    policy_namespace: str,
    other: Endpoint,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], namespaces.get(other.namespace, {})):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)


def _port_matches(rule_port: Mapping[str, Any], port: int, protocol: str, destination: Endpoint) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True  # every port of that protocol
    wanted = rule_port["port"]
    if isinstance(wanted, str) and not wanted.isdigit():
        return destination.named_ports.get(wanted) == port
    low = int(wanted)
    return low <= port <= int(rule_port.get("endPort", low))


def _admits(
    policies: Sequence[Policy],
    direction: str,
    subject: Endpoint,
    other: Endpoint,
    port: int,
    protocol: str,
    destination: Endpoint,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:
    selecting = _selecting(policies, subject, direction)
    if not selecting:
        return True  # not isolated
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in (policy.get("spec") or {}).get(rules_key) or []:
            peers = rule.get(peers_key) or []
            if peers and not any(
                _peer_matches(peer, policy["metadata"]["namespace"], other, namespaces) for peer in peers
            ):
                continue
            ports = rule.get("ports") or []
            if ports and not any(_port_matches(p, port, protocol, destination) for p in ports):
                continue
            return True
    return False


def allowed(
    policies: Sequence[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether `source` may open a connection to `destination`:`port` (namespaces: name → labels)."""
    return _admits(
        policies, "Egress", source, destination, port, protocol, destination, namespaces
    ) and _admits(policies, "Ingress", destination, source, port, protocol, destination, namespaces)
