"""The Argo CD health check (docs/gitops/argocd-health.lua), run by a real Lua interpreter.

Argo CD evaluates the script with the object as a Lua table `obj`; lupa does the same here
(tests/gitops_health.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.gitops_health import health


def job(
    phase: str | None, *, stalled: bool = False, generation: int = 1, observed: int = 1, **status: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "j", "generation": generation}}
    if phase is not None:
        conditions = [
            {"type": "Ready", "status": str(phase == "Succeeded"), "observedGeneration": observed},
            {
                "type": "Stalled",
                "status": str(stalled),
                "message": 'secret "s3" not found' if stalled else "",
            },
        ]
        obj["status"] = {"phase": phase, "observedGeneration": observed, "conditions": conditions, **status}
    return obj


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(job(None), "Progressing", id="not-reconciled-yet"),
        pytest.param(job("Pending"), "Progressing", id="pending"),
        pytest.param(job("Running", progress={"steps": "120/2000"}), "Progressing", id="running"),
        pytest.param(job("Succeeded"), "Healthy", id="succeeded"),
        pytest.param(job("Suspended"), "Suspended", id="suspended"),
        pytest.param(job("Failed", message="invalid input"), "Degraded", id="failed"),
        pytest.param(job("Cancelled"), "Degraded", id="cancelled"),
        pytest.param(job("Pending", stalled=True), "Degraded", id="stalled-pending"),
        pytest.param(job("Succeeded", generation=2, observed=1), "Progressing", id="stale-generation"),
    ],
)
def test_argocd_health_follows_the_phase_and_conditions(obj: dict[str, Any], expected: str) -> None:
    assert health(obj)[0] == expected


def test_argocd_health_message_says_what_is_happening() -> None:
    assert health(job("Running", progress={"steps": "120/2000"}))[1] == "Running: step 120/2000"
    assert health(job("Pending", stalled=True))[1] == 'secret "s3" not found'
    assert health(job("Failed", message="invalid input (exit code 3)"))[1] == "invalid input (exit code 3)"
