"""A smoke Job on the local cluster: proves pods run on the process node end to end.

Run by ``make demo`` until the FineTuneJob demo exists: applies a batch/v1 Job whose pod reads a
ConfigMap volume and a Secret env var, waits for it, and prints the pod's exit code and
termination message.
"""

from __future__ import annotations

import json
import sys
import time

from finetune_dev.cli import cluster_from_env

NAMESPACE = "finetune-smoke"

MANIFESTS = [
    {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "smoke"},
        "data": {"message": "hello from the process node"},
    },
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "smoke"},
        "stringData": {"token": "not-a-real-secret"},
    },
]

SCRIPT = (
    "import os, pathlib; msg = pathlib.Path('/etc/smoke/message').read_text(); "
    "print(msg, 'token length', len(os.environ['TOKEN'])); "
    "pathlib.Path('/dev/termination-log').write_text(msg)"
)


def main() -> int:
    cluster = cluster_from_env()
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.kubectl("delete", "job", "smoke", "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "smoke"},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "smoke",
                            "image": "python:3.11-slim",
                            "command": [sys.executable, "-c", SCRIPT],
                            "env": [
                                {
                                    "name": "TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": "smoke", "key": "token"}},
                                }
                            ],
                            "volumeMounts": [{"name": "smoke", "mountPath": "/etc/smoke"}],
                        }
                    ],
                    "volumes": [{"name": "smoke", "configMap": {"name": "smoke"}}],
                }
            },
        },
    }
    for manifest in [*MANIFESTS, job]:
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = json.loads(cluster.kubectl("get", "job", "smoke", "-n", NAMESPACE, "-o", "json").stdout)[
            "status"
        ]
        if status.get("succeeded") or status.get("failed"):
            break
        time.sleep(0.5)
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", "job-name=smoke", "-o", "json").stdout
    )["items"]
    for pod in pods:
        statuses = pod["status"].get("containerStatuses") or [{"state": {}}]
        terminated = statuses[0]["state"].get("terminated", {})
        print(
            f"pod {pod['metadata']['name']}: phase {pod['status']['phase']}, exit code {terminated.get('exitCode')}, "
            f"termination message {terminated.get('message')!r}"
        )
    ok = bool(pods) and all(p["status"]["phase"] == "Succeeded" for p in pods)
    print("smoke job succeeded" if ok else "smoke job FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
