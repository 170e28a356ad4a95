"""Which FineTuneJobs need a reconcile cycle, and when (pure, in memory, no API calls).

The controller feeds it every FineTuneJob watch event (`observe`) and every finished cycle
(`reconciled`); it answers `needs_reconcile` for an event (the spec is newer than the status:
a new job, or a spec change) and `due(now)` for the background loop: jobs whose last cycle
failed (retried after `retry_seconds`), and jobs to poll: Running every `poll_seconds` (rank 0's
progress), Pending every `PENDING_FACTOR * poll_seconds` (a pod can get stuck — a missing Secret,
a bad image — without its Job changing, so no Job event would tell; a full cluster can hold many
Pending jobs, hence the slower cadence). This replaces kopf's per-object timers and
handler-progress annotations: no finalizers, no extra writes per job.

Called by `controller`; must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import Phase

Key = tuple[str, str]
PENDING_FACTOR = 3


@dataclass
class _Entry:
    generation: int = 0
    observed_generation: int | None = None
    phase: str | None = None
    failed_at: float | None = None  # monotonic time of the last failed cycle
    polled_at: float = 0.0


class Schedule:
    """Thread-safe: the watch handlers and the background loop use it concurrently."""

    def __init__(self, *, poll_seconds: float, retry_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._jobs: dict[Key, _Entry] = {}

    def observe(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """Record what a watch event says about a FineTuneJob."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        with self._lock:
            entry = self._jobs.setdefault((namespace, name), _Entry())
            entry.generation = int(meta.get("generation") or 0)
            entry.observed_generation = status.get("observedGeneration")
            entry.phase = status.get("phase")

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def needs_reconcile(self, namespace: str, name: str) -> bool:
        """The spec is newer than the last status written (or there is no status yet)."""
        with self._lock:
            entry = self._jobs.get((namespace, name))
            return entry is not None and entry.observed_generation != entry.generation

    def reconciled(
        self,
        namespace: str,
        name: str,
        *,
        ok: bool,
        status: Mapping[str, Any] | None,
        now: float,
        polled: bool,
    ) -> None:
        """Record a finished cycle: a failure is retried; a success updates phase and generation."""
        with self._lock:
            entry = self._jobs.get((namespace, name))
            if entry is None:
                return
            entry.failed_at = None if ok else now
            if polled:
                entry.polled_at = now
            if ok and status:
                entry.observed_generation = status.get("observedGeneration")
                entry.phase = status.get("phase")

    def due(self, now: float) -> list[tuple[str, str, bool]]:
        """(namespace, name, poll progress) of the jobs to reconcile now."""
        out = []
        with self._lock:
            for (namespace, name), entry in self._jobs.items():
                if entry.failed_at is not None and now - entry.failed_at >= self.retry_seconds:
                    out.append((namespace, name, entry.phase == Phase.RUNNING.value))
                    continue
                if entry.phase == Phase.RUNNING.value:
                    every: float | None = self.poll_seconds
                elif entry.phase == Phase.PENDING.value:
                    every = PENDING_FACTOR * self.poll_seconds
                else:
                    every = None
                if every is not None and now - entry.polled_at >= every:
                    out.append((namespace, name, True))
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
