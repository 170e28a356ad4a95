"""Operator metrics move with reconcile cycles (prometheus-client registry, no server)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from finetune_operator.reconcile import reconcile
from tests.operator.factories import NOW, SETTINGS, ftj
from tests.operator.fake import FakeCluster


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_reconcile_updates_metrics(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(name="metered"))
    before = {
        "reconciles": _value("finetune_operator_reconciles_total", trigger="create", result="ok"),
        "writes": _value("finetune_operator_status_writes_total"),
        "invalid": _value("finetune_operator_errors_total", kind="invalid_spec"),
    }
    reconcile(fake, "team-a", "metered", settings=SETTINGS, now=NOW, trigger="create")
    assert (
        _value("finetune_operator_reconciles_total", trigger="create", result="ok")
        == before["reconciles"] + 1
    )
    assert _value("finetune_operator_status_writes_total") == before["writes"] + 1
    assert _value("finetune_operator_reconcile_duration_seconds_count", trigger="create") >= 1
    assert _value("finetune_operator_jobs", phase="Pending") >= 1
    fake.put_finetunejob(ftj(name="broken", model={"name": "nope"}))
    reconcile(fake, "team-a", "broken", settings=SETTINGS, now=NOW)
    assert _value("finetune_operator_errors_total", kind="invalid_spec") == before["invalid"] + 1
    assert _value("finetune_operator_jobs", phase="Failed") >= 1


def test_each_job_has_one_phase_series(fake: FakeCluster) -> None:
    fake.put_finetunejob(ftj(name="phased"))
    reconcile(fake, "team-a", "phased", settings=SETTINGS, now=NOW)
    assert (
        _value("finetune_operator_job_phase", namespace="team-a", finetunejob="phased", phase="Pending") == 1
    )
    obj = fake.finetunejob(name="phased")
    obj["spec"]["cancel"] = True
    obj["metadata"]["generation"] += 1
    reconcile(fake, "team-a", "phased", settings=SETTINGS, now=NOW)
    assert (
        _value("finetune_operator_job_phase", namespace="team-a", finetunejob="phased", phase="Cancelled")
        == 1
    )
    assert (
        REGISTRY.get_sample_value(
            "finetune_operator_job_phase",
            {"namespace": "team-a", "finetunejob": "phased", "phase": "Pending"},
        )
        is None
    ), "the previous phase's series is removed"
