"""The operator's Prometheus metrics (prometheus-client), served by `controller.Controller` on startup.

- `finetune_operator_jobs{phase}` — FineTuneJobs this operator knows, by phase.
- `finetune_operator_job_phase{namespace,finetunejob,phase}` — 1 for each job's current phase
  (one series per job; the chart's alerts and dashboard variables use it, its ServiceMonitor
  honours these labels).
- `finetune_operator_reconciles_total{trigger,result}` and
  `finetune_operator_reconcile_duration_seconds{trigger}` — reconcile cycles.
- `finetune_operator_errors_total{kind}` — api_<status>, progress_unreachable, invalid_spec,
  unexpected.
- `finetune_operator_api_requests_total{verb,kind}` — requests to the API server.
- `finetune_operator_status_writes_total` — status patches (one per cycle at most).

Updated by `reconcile` and `k8s`. No decisions here.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from finetune_operator.api import Phase

JOBS = Gauge("finetune_operator_jobs", "FineTuneJobs known to the operator, by phase", ["phase"])
RECONCILES = Counter("finetune_operator_reconciles_total", "Reconcile cycles", ["trigger", "result"])
RECONCILE_DURATION = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Duration of one reconcile cycle",
    ["trigger"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ERRORS = Counter("finetune_operator_errors_total", "Errors by kind", ["kind"])
API_REQUESTS = Counter("finetune_operator_api_requests_total", "Kubernetes API requests", ["verb", "kind"])
STATUS_WRITES = Counter("finetune_operator_status_writes_total", "FineTuneJob status patches")
JOB_PHASE = Gauge(
    "finetune_operator_job_phase",
    "1 for the current phase of each FineTuneJob",
    ["namespace", "finetunejob", "phase"],
)
# Known error kinds start at 0, so a rate over them is 0 rather than no data.
for _kind in ("progress_unreachable", "invalid_spec", "unexpected", "event"):
    ERRORS.labels(kind=_kind)


class PhaseTracker:
    """Phase of every known job, exported as the `finetune_operator_jobs` gauge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        for phase in Phase:
            JOBS.labels(phase=phase.value).set(0)

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            before = self._phases.get((namespace, name))
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            if before is not None and before != phase:
                JOB_PHASE.remove(namespace, name, before)
            if phase is not None:
                JOB_PHASE.labels(namespace=namespace, finetunejob=name, phase=phase).set(1)
            counts = {p.value: 0 for p in Phase}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
        for phase_name, count in counts.items():
            JOBS.labels(phase=phase_name).set(count)


PHASES = PhaseTracker()
