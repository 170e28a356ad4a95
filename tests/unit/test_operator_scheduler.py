"""When jobs get a reconcile cycle: spec newer than status, failed cycles, progress polls (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.scheduler import Schedule


def body(
    generation: int = 1, observed: int | None = None, phase: str | None = None, stalled: bool = False
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if observed is not None:
        status["observedGeneration"] = observed
    if phase:
        status["phase"] = phase
    if stalled:
        status["conditions"] = [{"type": "Stalled", "status": "True"}]
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    ("event", "needed"),
    [
        pytest.param(body(1), True, id="new-job"),
        pytest.param(body(2, observed=1, phase="Running"), True, id="spec-changed"),
        pytest.param(body(2, observed=2, phase="Running"), False, id="own-status-write"),
    ],
)
def test_needs_reconcile(event: dict[str, Any], needed: bool) -> None:
    schedule = Schedule(poll_seconds=10, retry_seconds=5)
    schedule.observe("ns", "a", event)
    assert schedule.needs_reconcile("ns", "a") is needed


@pytest.mark.parametrize(
    ("event", "due_at_11"),
    [
        pytest.param(body(1, 1, "Running"), [("ns", "a", True)], id="running-is-polled"),
        pytest.param(body(1, 1, "Pending", stalled=True), [], id="stalled-pending-too"),
        pytest.param(body(1, 1, "Pending"), [], id="pending-is-polled-less-often"),
        pytest.param(body(1, 1, "Suspended"), [], id="suspended-is-quiet"),
        pytest.param(body(1, 1, "Succeeded"), [], id="finished-is-quiet"),
    ],
)
def test_polling(event: dict[str, Any], due_at_11: list[tuple[str, str, bool]]) -> None:
    schedule = Schedule(poll_seconds=10, retry_seconds=5)
    schedule.observe("ns", "a", event)
    schedule.reconciled("ns", "a", ok=True, status=event["status"], now=1.0, polled=True)
    assert schedule.due(5.0) == []
    assert schedule.due(11.0) == due_at_11


def test_failed_cycle_is_retried_after_backoff() -> None:
    schedule = Schedule(poll_seconds=10, retry_seconds=5)
    schedule.observe("ns", "a", body(1))
    schedule.reconciled("ns", "a", ok=False, status=None, now=100.0, polled=False)
    assert schedule.due(103.0) == []
    assert schedule.due(105.0) == [("ns", "a", False)]
    schedule.reconciled("ns", "a", ok=True, status=body(1, 1, "Suspended")["status"], now=105.0, polled=False)
    assert schedule.due(200.0) == []
    assert not schedule.needs_reconcile("ns", "a")


def test_forget() -> None:
    schedule = Schedule(poll_seconds=10, retry_seconds=5)
    schedule.observe("ns", "a", body(1, 1, "Running"))
    schedule.forget("ns", "a")
    assert len(schedule) == 0 and schedule.due(1000.0) == []
    schedule.reconciled("ns", "a", ok=False, status=None, now=1.0, polled=False)  # unknown: ignored
    assert len(schedule) == 0


def test_pending_polled_at_a_slower_cadence() -> None:
    schedule = Schedule(poll_seconds=10, retry_seconds=5)
    schedule.observe("ns", "a", body(1, 1, "Pending"))
    schedule.reconciled("ns", "a", ok=True, status=body(1, 1, "Pending")["status"], now=1.0, polled=True)
    assert schedule.due(11.0) == []
    assert schedule.due(31.0) == [("ns", "a", True)]
