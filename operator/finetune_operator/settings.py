"""Operator settings: one frozen value passed into builders and reconcile (pure).

Read once at startup from the environment (`Settings.from_env`, the only place that reads a
FINETUNE_* variable), so tests pass their own `Settings(...)` instead of patching globals.
Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer import contract
from finetune_trainer.config import ABSOLUTE_RUN_URI_PATTERN, ENDPOINT_PATTERN, PATTERN_MESSAGES

# The container command for every pod. The trainer runs directly, so its exit code (3 = invalid
# input) reaches the Job's podFailurePolicy unchanged; with several processes it sees the PET_*
# variables, starts torchrun itself and maps the workers' exit codes back (any 3 → 3, a handled
# SIGTERM → 143), which plain torchrun would flatten to 1 — so invalid input fails the job at once
# there too.
DEFAULT_TRAINER_COMMAND = ("python", "-m", "finetune_trainer")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the operator decides for every job (overridable per job where the spec says so)."""

    trainer_image: str = "localhost/finetune-operator/trainer:0.1.0"
    trainer_command: tuple[str, ...] = DEFAULT_TRAINER_COMMAND
    image_pull_policy: str = "IfNotPresent"
    progress_port: int = contract.DEFAULT_PROGRESS_PORT
    master_port: int = 29500
    # Defaults for spec.storage (a cluster's object store); None: the spec must say.
    runs_uri: str | None = None
    datasets_uri: str | None = None
    storage_endpoint: str | None = None
    credentials_secret: str | None = None
    # How often rank 0's progress endpoint is polled while a job runs.
    poll_interval_seconds: float = 10.0
    progress_timeout_seconds: float = 2.0
    # The trainer image's user and group (Dockerfile: finetune, 10001).
    run_as_user: int = 10001
    run_as_group: int = 10001
    # /dev/shm of pods with more than one process (a memory-backed emptyDir; it counts against
    # the pod's memory limit). NCCL and DataLoader workers exchange tensors through it.
    shm_size: str = "2Gi"
    # The pod's /tmp (the root filesystem is read-only).
    tmp_size: str = "2Gi"
    # Upper bound on one collective operation (all-reduce, barrier) of a multi-process job: a
    # peer that died or hangs fails the others after this long at the latest, and the operator
    # restarts the whole gang. It must cover the longest wait inside a collective, which is a
    # node's local main process downloading or converting the model while the others wait.
    collective_timeout_seconds: int = 600
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # A NetworkPolicy per FineTuneJob (builders.build_network_policy). Off unless configured:
    # the operator must know its own namespace and pod labels to admit itself (the chart does).
    network_policy: bool = False
    operator_namespace: str | None = None
    operator_pod_labels: Mapping[str, str] = field(default_factory=dict)
    # The NetworkPolicy peer (namespaceSelector and/or podSelector) admitted to trainers'
    # metrics port; None: no scraper.
    metrics_scraper: Mapping[str, Any] | None = None

    # How the operator process itself runs (`controller.Controller`, `__main__`).
    # Threads for the (synchronous) handlers; as many again for concurrent creates.
    max_workers: int = 8
    # FineTuneJobs processed at once (further watch events wait in the stream); None: 8 * max_workers.
    worker_limit: int | None = None
    # Prometheus metrics (0: no metrics server).
    metrics_port: int = 8080
    metrics_addr: str = "0.0.0.0"
    # kopf's liveness endpoint (empty: none).
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    # Namespaces to watch; empty: all.
    namespaces: tuple[str, ...] = ()
    log_verbose: bool = False

    @property
    def queue_limit(self) -> int:
        """kopf's worker limit: FineTuneJobs processed at once."""
        return self.worker_limit if self.worker_limit is not None else 8 * self.max_workers

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from FINETUNE_* variables (see docs/operator.md)."""
        kwargs: dict[str, object] = {}
        command = env.get("FINETUNE_TRAINER_COMMAND")
        if command:
            kwargs["trainer_command"] = tuple(
                json.loads(command) if command.lstrip().startswith("[") else shlex.split(command)
            )
        extra = env.get("FINETUNE_TRAINER_EXTRA_ENV")
        if extra:
            kwargs["extra_env"] = dict(json.loads(extra))
        if env.get("FINETUNE_NETWORK_POLICY") in ("1", "true"):
            kwargs["network_policy"] = True
        if env.get("FINETUNE_LOG_VERBOSE") == "1":
            kwargs["log_verbose"] = True
        if env.get("FINETUNE_NAMESPACES"):
            kwargs["namespaces"] = tuple(ns for ns in env["FINETUNE_NAMESPACES"].split(",") if ns)
        if "FINETUNE_LIVENESS_ENDPOINT" in env:  # set and empty: no liveness endpoint
            kwargs["liveness_endpoint"] = env["FINETUNE_LIVENESS_ENDPOINT"]
        if env.get("FINETUNE_OPERATOR_POD_LABELS"):
            kwargs["operator_pod_labels"] = dict(json.loads(env["FINETUNE_OPERATOR_POD_LABELS"]))
        if env.get("FINETUNE_METRICS_SCRAPER"):
            kwargs["metrics_scraper"] = dict(json.loads(env["FINETUNE_METRICS_SCRAPER"])) or None
        strings = {
            "FINETUNE_TRAINER_IMAGE": "trainer_image",
            "FINETUNE_IMAGE_PULL_POLICY": "image_pull_policy",
            "FINETUNE_RUNS_URI": "runs_uri",
            "FINETUNE_DATASETS_URI": "datasets_uri",
            "FINETUNE_STORAGE_ENDPOINT": "storage_endpoint",
            "FINETUNE_CREDENTIALS_SECRET": "credentials_secret",
            "FINETUNE_SHM_SIZE": "shm_size",
            "FINETUNE_TMP_SIZE": "tmp_size",
            "FINETUNE_OPERATOR_NAMESPACE": "operator_namespace",
            "FINETUNE_METRICS_ADDR": "metrics_addr",
        }
        for name, attr in strings.items():
            if env.get(name):
                kwargs[attr] = env[name]
        integers = {
            "FINETUNE_RUN_AS_USER": "run_as_user",
            "FINETUNE_RUN_AS_GROUP": "run_as_group",
            "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS": "collective_timeout_seconds",
            "FINETUNE_MAX_WORKERS": "max_workers",
            "FINETUNE_WORKER_LIMIT": "worker_limit",
            "FINETUNE_METRICS_PORT": "metrics_port",
        }
        for name, attr in integers.items():
            if env.get(name):
                kwargs[attr] = int(env[name])
        numbers = {
            "FINETUNE_POLL_INTERVAL_SECONDS": "poll_interval_seconds",
            "FINETUNE_PROGRESS_TIMEOUT_SECONDS": "progress_timeout_seconds",
        }
        for name, attr in numbers.items():
            if env.get(name):
                kwargs[attr] = float(env[name])
        for name, (pattern, helm_value) in STORAGE_DEFAULTS.items():
            value = env.get(name)
            if value and not re.match(pattern, value):
                # the value itself is not echoed: it may be a URL with a password in it
                raise SettingsError(
                    f"{name} (Helm: {helm_value}) {PATTERN_MESSAGES[pattern]}; the operator does not start with it"
                )
        return cls(**kwargs)  # type: ignore[arg-type]


class SettingsError(ValueError):
    """A FINETUNE_* variable the operator cannot run with; the message names it."""


# The cluster's storage defaults obey the spec's own rules (`storage.*` in the CRD): absolute
# folders, and no credentials in the endpoint — they would reach every job's ConfigMap.
STORAGE_DEFAULTS = {  # variable: (its pattern, the Helm value that sets it)
    "FINETUNE_STORAGE_ENDPOINT": (ENDPOINT_PATTERN, "storage.endpoint"),
    "FINETUNE_RUNS_URI": (ABSOLUTE_RUN_URI_PATTERN, "storage.runsUri"),
    "FINETUNE_DATASETS_URI": (ABSOLUTE_RUN_URI_PATTERN, "storage.datasetsUri"),
}
