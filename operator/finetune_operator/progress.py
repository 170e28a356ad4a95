"""Reads rank 0's progress endpoint (`GET http://<podIP>:<port>/progress`, see
finetune_trainer.contract.ProgressReport). Pull only: training pods need no API rights.

Used by `reconcile` on the poll timer; unreachable or malformed answers return None (the
status keeps the last known progress). No decisions here.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Protocol

from finetune_operator import metrics
from finetune_trainer import contract


class ProgressSource(Protocol):
    def __call__(self, pod_ip: str, port: int) -> dict[str, Any] | None: ...


class HttpProgress:
    """`ProgressSource` over HTTP with a short timeout."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({})
        )  # pod IPs: never via a proxy

    def __call__(self, pod_ip: str, port: int) -> dict[str, Any] | None:
        url = f"http://{pod_ip}:{port}{contract.PROGRESS_PATH}"
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                data = json.loads(response.read(1_000_000))
        except (OSError, ValueError, urllib.error.URLError):
            metrics.ERRORS.labels(kind="progress_unreachable").inc()
            return None
        return data if isinstance(data, dict) else None
