"""FineTuneJob statuses through Flux's own health library (kstatus), beside Argo CD's check.

dev/kstatus runs `status.Compute` from sigs.k8s.io/cli-utils/pkg/kstatus/status, the code Flux's
kustomize-controller runs for `wait: true` and `healthChecks` (Flux's fork of cli-utils carries
the same package). `finetune_dev.binaries` builds it like the cluster's binaries (cached after
the first time), so a missing binary is built here, never skipped. The objects carry the statuses
the operator's own `derive_status` writes for the observations of the status unit tests; the
Argo CD column runs docs/gitops/argocd-health.lua on the same objects. No cluster is needed.
docs/gitops.md's table is this file's TABLE and BEFORE_CONDITIONS.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator.api import ObjectRef
from finetune_operator.status import Observed, derive_status, invalid_spec_status
from tests.gitops_health import health, kstatus
from tests.operator.factories import NOW, batch_job, ftj, parsed, pod, progress_report
from tests.operator.status_cases import CASES


def written(
    observed: Observed, *, generation: int = 1, progress: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    """The FineTuneJob as the API server returns it (JSON) after the operator's status write."""
    status = derive_status(parsed(generation=generation, **spec), observed, progress, NOW).to_dict()
    obj: dict[str, Any] = json.loads(json.dumps(ftj(generation=generation, status=status, **spec)))
    return obj


def _stale(finished: dict[str, Any]) -> dict[str, Any]:
    """A finished job whose spec changed (spec.suspend set in Git) before the operator saw it."""
    obj = copy.deepcopy(finished)
    obj["metadata"]["generation"] = 2
    obj["spec"]["suspend"] = True
    return obj


def _deleting() -> dict[str, Any]:
    obj = written(Observed(batch_job=batch_job(active=1), pods=[pod()]))
    obj["metadata"]["deletionTimestamp"] = "2026-11-29T07:00:00Z"
    return obj


def _invalid_spec() -> dict[str, Any]:
    ref = ObjectRef(name="demo", namespace="team-a", uid="u", generation=1)
    return ftj(
        status=invalid_spec_status(
            ref, {}, ["spec.model: exactly one of name or uri must be set"], NOW
        ).to_dict()
    )


UNIT_CASES = {case[0]: written(case[2], **case[1]) for case in CASES}
OBJECTS: dict[str, dict[str, Any]] = {
    "fresh-no-status": ftj(),
    **UNIT_CASES,
    "running-with-progress": written(
        Observed(batch_job=batch_job(active=1), pods=[pod()]), progress=progress_report()
    ),
    "invalid-spec": _invalid_spec(),
    "stale-generation": _stale(UNIT_CASES["succeeded"]),
    "deleting": _deleting(),
}

# docs/gitops.md's table: (phase, Ready, Reconciling, Stalled) as the operator writes them ->
# (kstatus result as Flux sees it, Argo CD health).
TABLE: dict[tuple[str, str, str, str], tuple[str, str]] = {
    ("Pending", "False", "True", "False"): ("InProgress", "Progressing"),
    ("Pending", "False", "False", "True"): ("Failed", "Degraded"),
    ("Running", "False", "True", "False"): ("InProgress", "Progressing"),
    # A settled suspended job has no Ready condition (Ready=False would read as InProgress for as
    # long as it stays suspended); while its pods still save a checkpoint it is Reconciling.
    ("Suspended", "-", "False", "False"): ("Current", "Suspended"),
    ("Suspended", "-", "True", "False"): ("InProgress", "Suspended"),
    ("Succeeded", "True", "False", "False"): ("Current", "Healthy"),
    ("Failed", "False", "False", "True"): ("Failed", "Degraded"),
    ("Cancelled", "False", "False", "True"): ("Failed", "Degraded"),
}
# Objects whose health is decided before their conditions are read.
BEFORE_CONDITIONS: dict[str, tuple[str, str]] = {
    # kstatus reads an object with no status and no conditions as Current (nothing to wait for).
    "fresh-no-status": ("Current", "Progressing"),
    "stale-generation": ("InProgress", "Progressing"),
    "deleting": ("Terminating", "Progressing"),
}


def row(case: str) -> tuple[str, str, str, str]:
    status = OBJECTS[case]["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    return status["phase"], conditions.get("Ready", "-"), conditions["Reconciling"], conditions["Stalled"]


def expected(case: str) -> tuple[str, str]:
    if case in BEFORE_CONDITIONS:
        return BEFORE_CONDITIONS[case]
    assert row(case) in TABLE, f"{case}: {row(case)} needs its row here and in docs/gitops.md"
    return TABLE[row(case)]


@pytest.fixture(scope="module")
def computed() -> dict[str, tuple[str, str]]:
    """kstatus for every object, in one run of the program."""
    return dict(zip(OBJECTS, kstatus(*OBJECTS.values()), strict=True))


def test_every_row_of_the_table_is_checked() -> None:
    assert {row(case) for case in OBJECTS if case not in BEFORE_CONDITIONS} == set(TABLE)


@pytest.mark.parametrize("case", list(OBJECTS))
def test_flux_and_argocd_health_per_phase(case: str, computed: dict[str, tuple[str, str]]) -> None:
    assert (computed[case][0], health(OBJECTS[case])[0]) == expected(case)


@pytest.mark.parametrize("case", [c for c in OBJECTS if c not in BEFORE_CONDITIONS])
def test_flux_shows_the_jobs_own_message(case: str, computed: dict[str, tuple[str, str]]) -> None:
    """A progressing or failed Kustomization quotes the job's status message (from a condition)."""
    flux, message = computed[case]
    status = OBJECTS[case]["status"]
    if flux != "Current":
        assert message == status["message"]
    elif status["phase"] == "Succeeded":
        assert message == "Resource is Ready"
    else:  # suspended: no Ready condition to quote
        assert message == "Resource is current"


def test_flux_names_the_generation_it_waits_for(computed: dict[str, tuple[str, str]]) -> None:
    assert (
        computed["stale-generation"][1] == "FineTuneJob generation is 2, but latest observed generation is 1"
    )
