"""The operator's RBAC rules (pure data): the one list the Helm chart and the tests use.

`python -m finetune_operator.rbac [--name NAME]` prints the ClusterRole as YAML. Each rule
says why it exists; nothing broader. Deliberately absent: Secrets (a missing credentials Secret
is detected from the pod's CreateContainerConfigError, not by reading Secrets), Pods
create/delete (the Job controller owns pods), delete on anything (children are removed by
the garbage collector through ownerReferences), and kopf's peering resources (standalone).

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from finetune_operator.api import GROUP, PLURAL

# (apiGroup, resources, verbs, why)
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = [
    (
        GROUP,
        (PLURAL,),
        ("get", "list", "watch", "patch"),
        "watch jobs; kopf keeps its diff-base in an annotation",
    ),
    (GROUP, (f"{PLURAL}/status",), ("get", "patch"), "write status"),
    (GROUP, (f"{PLURAL}/finalizers",), ("update",), "children set blockOwnerDeletion on their owner"),
    (
        "batch",
        ("jobs",),
        ("get", "list", "watch", "create", "patch"),
        "the training Job; watch it for changes",
    ),
    ("", ("configmaps", "services"), ("get", "create", "patch"), "trainer config and rendezvous Service"),
    ("", ("pods",), ("list",), "read exit codes, termination messages and rank 0's IP"),
    ("", ("events",), ("create",), "events on phase changes"),
    ("", ("serviceaccounts",), ("get",), "say so when spec.resources.serviceAccountName does not exist"),
    (
        "scheduling.k8s.io",
        ("priorityclasses",),
        ("get",),
        "say so when spec.resources.priorityClassName does not exist",
    ),
]


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [group], "resources": list(resources), "verbs": list(verbs)}
            for group, resources, verbs, _ in RULES
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the operator's ClusterRole.")
    parser.add_argument("--name", default="finetune-operator")
    args = parser.parse_args(argv)
    sys.stdout.write(yaml.safe_dump(cluster_role(args.name), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
