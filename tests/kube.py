"""Helpers for tests that talk to the real local cluster: a handle with kubectl/helm/clients,
polling with a named timeout, and small manifest builders for Jobs and Pods.

Imported by conftest fixtures and integration/e2e tests; holds no fixtures itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_dev import binaries
from finetune_dev.cluster import Cluster


@dataclass
class ClusterHandle:
    """What tests use of a running cluster."""

    cluster: Cluster

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def env(self) -> dict[str, str]:
        env = self.cluster.env()
        env.pop("FINETUNE_DEV_BIN")
        return env

    @property
    def s3_endpoint(self) -> str:
        return self.cluster.s3_endpoint

    def process_env(self) -> dict[str, str]:
        """os.environ plus the cluster's variables and kubectl/helm on PATH, for subprocesses."""
        return {**os.environ, **self.env, "PATH": f"{self.cluster.bin_dir}:{os.environ['PATH']}"}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binaries.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binaries.binary("helm")), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.process_env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def s3_client(self) -> Any:
        return self.cluster.s3_client()


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def python_container(script: str, *, name: str = "main", **extra: Any) -> dict[str, Any]:
    """A container that runs ``script`` with the project's Python (the image is ignored locally)."""
    return {
        "name": name,
        "image": "python:3.11-slim",
        "command": [sys.executable, "-c", script],
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        **extra,
    }


def job_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    template_spec = spec.pop("template_spec", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"restartPolicy": "Never", "containers": containers, **template_spec},
            },
        },
    }


def apply(cluster: ClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get(cluster: ClusterHandle, namespace: str, *what: str) -> Any:
    return json.loads(cluster.kubectl("get", "-n", namespace, *what, "-o", "json").stdout)


def job_condition(cluster: ClusterHandle, namespace: str, job: str) -> dict[str, Any] | None:
    """The Job's terminal condition (Complete or Failed, status True), if it has one."""
    conditions = get(cluster, namespace, "job", job).get("status", {}).get("conditions") or []
    for condition in conditions:
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return dict(condition)
    return None


def wait_job_finished(
    cluster: ClusterHandle, namespace: str, job: str, timeout: float = 120
) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: job_condition(cluster, namespace, job), timeout=timeout, what=f"job {job} to finish"
    )
    return result


def job_pods(cluster: ClusterHandle, namespace: str, job: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = get(cluster, namespace, "pods", "-l", f"job-name={job}")["items"]
    return pods
