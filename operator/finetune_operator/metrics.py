"""The operator's Prometheus metrics (prometheus-client), served by `handlers` on startup.

- `finetune_operator_jobs{phase}` — FineTuneJobs this operator knows, by phase.
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


class PhaseTracker:
    """Phase of every known job, exported as the `finetune_operator_jobs` gauge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}
        for phase in Phase:
            JOBS.labels(phase=phase.value).set(0)

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            counts = {p.value: 0 for p in Phase}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
        for phase_name, count in counts.items():
            JOBS.labels(phase=phase_name).set(count)


PHASES = PhaseTracker()
