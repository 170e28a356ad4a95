"""Running the installed `kubectl-finetune` against the test cluster (tests/integration/test_cli*.py).

`cli(...)` runs the console script with the cluster's KUBECONFIG and S3 variables (and .venv/bin
on PATH, so `kubectl finetune` finds the plugin); `set_status` writes a FineTuneJob's status
through the status subresource, as the operator would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.kube import ClusterHandle

BIN = Path(sys.executable).parent
CLI = BIN / "kubectl-finetune"


def cli_env(cluster: ClusterHandle, datasets_uri: str | None = None, **extra: str) -> dict[str, str]:
    env = cluster.process_env()
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env.pop("FINETUNE_DATASETS_URI", None)
    if datasets_uri:
        env["FINETUNE_DATASETS_URI"] = datasets_uri
    env.update(extra)
    return env


def cli(
    cluster: ClusterHandle,
    namespace: str,
    *args: str,
    datasets_uri: str | None = None,
    input: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(CLI), f"--namespace={namespace}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        env=env or cli_env(cluster, datasets_uri),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kubectl finetune {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def cli_json(cluster: ClusterHandle, namespace: str, *args: str, **kwargs: Any) -> Any:
    return json.loads(cli(cluster, namespace, *args, "-o", "json", **kwargs).stdout)


def get_ftj(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout))


def experiment_file(tmp_path: Path, name: str, **spec: Any) -> Path:
    body = {
        "model": {"name": "pythia-70m"},
        "dataset": {"train": ["s3://data/train.jsonl"]},
        "hyperparameters": {"maxSteps": 10, "batchSize": 2},
        **spec,
    }
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def set_status(cluster: ClusterHandle, namespace: str, name: str, status: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch",
        "ftj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
