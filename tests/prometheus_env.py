"""The real Prometheus server for the monitoring tests (tests/e2e/test_prometheus.py).

`scrape_configs(monitors, kubeconfig)` turns the chart's ServiceMonitor and PodMonitor objects
into Prometheus scrape configs with Kubernetes service discovery, the way the Prometheus
Operator generates them for the fields the chart uses (selector.matchLabels, namespaceSelector,
endpoint port, path, interval, honorLabels, relabelings; the target labels namespace, pod,
service, container, endpoint and job). `rule_file(rule)` writes a PrometheusRule's groups as a
rules file. `running_prometheus` starts the server built by finetune_dev.binaries on a loopback
port and `PrometheusClient` queries its HTTP API. Nothing here is mocked: discovery talks to the
local API server, scrapes go to the pods' own addresses.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_dev import binaries
from tests.kube import wait_for

PROMETHEUS_RBAC = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "rules": [
        {
            "apiGroups": [""],
            "resources": ["pods", "services", "endpoints", "namespaces"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
    ],
}


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _selector_keeps(kind: str, match_labels: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "source_labels": [
                f"__meta_kubernetes_{kind}_label_{_sanitize(key)}",
                f"__meta_kubernetes_{kind}_labelpresent_{_sanitize(key)}",
            ],
            "regex": f"({re.escape(value)});true",
            "action": "keep",
        }
        for key, value in sorted(match_labels.items())
    ]


def _relabelings(items: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    out = []
    for item in items or []:
        rule = {names.get(k, k): v for k, v in item.items()}
        if "action" in rule:
            rule["action"] = str(rule["action"]).lower()
        out.append(rule)
    return out


def _namespaces(monitor: Mapping[str, Any]) -> dict[str, Any]:
    selector = monitor["spec"].get("namespaceSelector") or {}
    if selector.get("any"):
        return {}
    return {"namespaces": {"names": list(selector.get("matchNames") or [monitor["metadata"]["namespace"]])}}


def scrape_configs(monitors: list[Mapping[str, Any]], kubeconfig: Path) -> list[dict[str, Any]]:
    configs = []
    for monitor in monitors:
        kind, meta, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
        endpoints = spec["endpoints"] if kind == "ServiceMonitor" else spec["podMetricsEndpoints"]
        for index, endpoint in enumerate(endpoints):
            job = f"{'serviceMonitor' if kind == 'ServiceMonitor' else 'podMonitor'}/{meta['namespace']}/{meta['name']}/{index}"
            sd = {
                "role": "endpointslice" if kind == "ServiceMonitor" else "pod",
                "kubeconfig_file": str(kubeconfig),
            }
            sd.update(_namespaces(monitor))
            match = (spec.get("selector") or {}).get("matchLabels") or {}
            if kind == "ServiceMonitor":
                relabel = [
                    *_selector_keeps("service", match),
                    {
                        "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                        "regex": endpoint["port"],
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                    {"target_label": "endpoint", "replacement": endpoint["port"]},
                ]
            else:
                relabel = [
                    *_selector_keeps("pod", match),
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": endpoint["port"],
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
                    {"target_label": "endpoint", "replacement": endpoint["port"]},
                ]
            configs.append(
                {
                    "job_name": job,
                    "honor_labels": bool(endpoint.get("honorLabels", False)),
                    "scrape_interval": endpoint.get("interval", "30s"),
                    "metrics_path": endpoint.get("path", "/metrics"),
                    "kubernetes_sd_configs": [sd],
                    "relabel_configs": relabel + _relabelings(endpoint.get("relabelings")),
                }
            )
    return configs


def rule_file(rule: Mapping[str, Any], path: Path) -> Path:
    """A PrometheusRule's groups as a Prometheus rules file."""
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries.binary("promtool")), *args], capture_output=True, text=True, timeout=120
    )


@dataclass(frozen=True)
class PrometheusClient:
    url: str
    log: Path

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", query=expr)
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self._get(f"/api/v1/label/{label}/values", **{"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_prometheus(
    directory: Path, scrape: list[dict[str, Any]], rule_files: list[Path], port: int
) -> Iterator[PrometheusClient]:
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": scrape,
        "rule_files": [str(path) for path in rule_files],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    checked = promtool("check", "config", str(config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = directory / "prometheus.log"
    command = [
        str(binaries.binary("prometheus")),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: process.poll() is None and _ready(url),
            timeout=60,
            what=f"Prometheus to be ready (log {log})",
        )
        yield PrometheusClient(url, log)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()
