"""Run the real Prometheus server (binaries.PROMETHEUS) against the local cluster.

`scrape_config` turns a Prometheus Operator ServiceMonitor or PodMonitor (as the Helm chart
renders it) into the scrape configuration the Prometheus Operator would generate for it:
Kubernetes service discovery, a `keep` on each of the selector's labels and on the endpoint's
port name, the target labels it adds (namespace, service, pod, container, job, endpoint) and the
monitor's own relabelings. Only what the chart uses is translated; anything else raises, so a new
field in the chart cannot be silently ignored. `rule_groups` reads a PrometheusRule's groups.

`running` starts Prometheus with such a configuration on a loopback port and yields a client of
its HTTP API (`query`, `targets`, `rules`, `label_values`). Used by tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from finetune_dev import binaries

_ENDPOINT_FIELDS = {"port", "path", "interval", "honorLabels", "relabelings"}
_SELECTOR_FIELDS = {"matchLabels"}


class UnsupportedMonitor(ValueError):
    """The monitor uses a field this translation does not know (so it would be ignored)."""


def _sanitize(label: str) -> str:
    """Kubernetes label name -> Prometheus meta label suffix, as service discovery writes it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def _relabel(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A Prometheus Operator RelabelConfig (camelCase) as Prometheus's relabel_config."""
    return {_snake(k): v for k, v in rule.items()}


def _check_fields(what: str, obj: Mapping[str, Any], known: set[str]) -> None:
    unknown = set(obj) - known
    if unknown:
        raise UnsupportedMonitor(f"{what}: fields {sorted(unknown)} are not translated")


def scrape_config(
    monitor: Mapping[str, Any], *, namespace: str, kubeconfig: Path, interval: str | None = None
) -> list[dict[str, Any]]:
    """The scrape configs (one per endpoint) for a ServiceMonitor or PodMonitor in `namespace`.

    `interval` overrides the monitor's interval (tests scrape every second)."""
    kind = monitor["kind"]
    name = monitor["metadata"]["name"]
    spec = monitor["spec"]
    if kind == "ServiceMonitor":
        role, meta, endpoints_key, port_label = (
            "endpointslice",
            "service",
            "endpoints",
            "__meta_kubernetes_endpointslice_port_name",
        )
    elif kind == "PodMonitor":
        role, meta, endpoints_key, port_label = (
            "pod",
            "pod",
            "podMetricsEndpoints",
            "__meta_kubernetes_pod_container_port_name",
        )
    else:
        raise UnsupportedMonitor(f"{kind} is not a ServiceMonitor or PodMonitor")
    _check_fields(f"{kind} {name} spec", spec, {"selector", "namespaceSelector", endpoints_key})
    selector = spec.get("selector") or {}
    _check_fields(f"{kind} {name} spec.selector", selector, _SELECTOR_FIELDS)
    namespace_selector = spec.get("namespaceSelector") or {}
    _check_fields(f"{kind} {name} spec.namespaceSelector", namespace_selector, {"any", "matchNames"})
    sd: dict[str, Any] = {"role": role, "kubeconfig_file": str(kubeconfig)}
    if not namespace_selector.get("any"):
        sd["namespaces"] = {"names": list(namespace_selector.get("matchNames") or [namespace])}

    configs = []
    for index, endpoint in enumerate(spec[endpoints_key]):
        _check_fields(f"{kind} {name} spec.{endpoints_key}[{index}]", endpoint, _ENDPOINT_FIELDS)
        relabel: list[dict[str, Any]] = []
        if kind == "PodMonitor":  # as the Prometheus Operator does: finished pods are no targets
            relabel.append(
                {
                    "source_labels": ["__meta_kubernetes_pod_phase"],
                    "regex": "(Failed|Succeeded)",
                    "action": "drop",
                }
            )
        for key, value in (selector.get("matchLabels") or {}).items():
            relabel.append(
                {
                    "source_labels": [
                        f"__meta_kubernetes_{meta}_label_{_sanitize(key)}",
                        f"__meta_kubernetes_{meta}_labelpresent_{_sanitize(key)}",
                    ],
                    "regex": f"({re.escape(str(value))});true",
                    "action": "keep",
                }
            )
        relabel.append(
            {"source_labels": [port_label], "regex": re.escape(endpoint["port"]), "action": "keep"}
        )
        relabel += [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        ]
        if kind == "ServiceMonitor":
            relabel += [
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
            ]
        else:
            relabel.append({"target_label": "job", "replacement": f"{namespace}/{name}"})
        relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
        relabel += [_relabel(r) for r in endpoint.get("relabelings") or []]
        configs.append(
            {
                "job_name": f"{_snake(kind).replace('_', '')}/{namespace}/{name}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": interval or endpoint.get("interval", "30s"),
                "kubernetes_sd_configs": [sd],
                "relabel_configs": relabel,
            }
        )
    return configs


def rule_groups(prometheus_rule: Mapping[str, Any]) -> dict[str, Any]:
    """A PrometheusRule's spec as a Prometheus rule file (`groups:`)."""
    return {"groups": prometheus_rule["spec"]["groups"]}


class PrometheusAPI:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result's series (each with `metric` and `value`)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr}: a {data['resultType']}, not a vector")
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/targets", state="active")["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.get(f"/api/v1/label/{label}/values", **{"match[]": match}))


@contextmanager
def running(
    scrape_configs: list[dict[str, Any]],
    *,
    port: int,
    rule_files: Sequence[Path] = (),
    evaluation_interval: str = "1s",
) -> Iterator[PrometheusAPI]:
    """Prometheus on 127.0.0.1:`port` with these scrape configs and rule files, until the block ends."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": evaluation_interval},
        "scrape_configs": scrape_configs,
        "rule_files": [str(p) for p in rule_files],
    }
    with tempfile.TemporaryDirectory(prefix="finetune-prometheus-") as directory:
        config_file = Path(directory) / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        log = (Path(directory) / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                str(binaries.binary("prometheus")),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        api = PrometheusAPI(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"prometheus exited {process.returncode}:\n{Path(log.name).read_text()[-4000:]}"
                    )
                try:
                    with urllib.request.urlopen(f"{api.url}/-/ready", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"prometheus not ready in 60 s:\n{Path(log.name).read_text()[-4000:]}"
                        ) from None
                    time.sleep(0.2)
            yield api
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (built with Prometheus)."""
    return subprocess.run([str(binaries.binary("promtool")), *args], capture_output=True, text=True)
