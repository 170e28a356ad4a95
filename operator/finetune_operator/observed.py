"""What one reconcile cycle observed (pure values): the children as read, and the problems only
the operator can detect. Read by `phase` and `status`; must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api import Reason
from finetune_operator.kueue import Queue


@dataclass(frozen=True)
class Problem:
    """Something only the operator can detect. permanent: Failed; else Pending + Stalled."""

    reason: Reason
    message: str
    permanent: bool


@dataclass(frozen=True)
class Observed:
    """The children as read from the API in this cycle (None: does not exist)."""

    # The batch/v1 Job running the pods.
    batch_job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    problem: Problem | None = None
    run_uri: str | None = None
    # Spec fields the API server dropped (`api.unknown_fields`); None: not known this cycle.
    unknown_fields: Sequence[str] | None = None
    # The Workload's state, for a job queued with Kueue (spec.resources.queueName).
    queue: Queue | None = None
