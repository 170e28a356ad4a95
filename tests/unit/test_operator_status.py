"""Status derivation (pure): observed Job, pods and progress → phase, conditions, results."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from finetune_operator.api import FineTuneJob, FineTuneJobStatus, ObjectRef, Phase, Reason
from finetune_operator.status import Observed, Problem, derive_status, invalid_spec_status
from tests.operator.factories import NOW, batch_job, condition, parsed, pod, progress_report
from tests.operator.status_cases import CASES, EVALUATE, SUMMARY_EVALUATED, SUMMARY_OK


def derived(job: FineTuneJob, observed: Observed, progress: Any, now: datetime) -> dict[str, Any]:
    """`derive_status` in the JSON form the operator writes."""
    return derive_status(job, observed, progress, now).to_dict()


def invalid(ref: ObjectRef, previous: dict[str, Any], errors: list[str], now: datetime) -> dict[str, Any]:
    return invalid_spec_status(ref, previous, errors, now).to_dict()


def _conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


@pytest.mark.parametrize(
    ("overrides", "observed", "expected", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_phase_and_conditions(
    overrides: dict[str, Any], observed: Observed, expected: tuple[str, ...], fragment: str
) -> None:
    status = derived(parsed(generation=3, **overrides), observed, None, NOW)
    conds = _conditions(status)
    assert (
        status["phase"],
        status["reason"],
        conds.get("Ready"),
        conds["Reconciling"],
        conds["Stalled"],
    ) == expected
    assert fragment in status["message"]
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    FineTuneJobStatus.model_validate(status)  # matches the CRD's status schema


def test_progress_from_rank_zero() -> None:
    status = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), progress_report(), NOW)
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["steps"], progress["percent"]) == (
        40,
        100,
        "40/100",
        40.0,
    )
    assert (progress["trainLoss"], progress["tokensPerSecond"], progress["etaSeconds"]) == (2.5, 1200.0, 60.0)
    assert progress["trainerPhase"] == "Training"
    assert status["latestEvaluation"] == {"step": 20, "loss": 2.7, "accuracy": 0.47, "perplexity": 14.9}
    assert [e["step"] for e in status["evaluations"]] == [0, 20]
    assert status["baselines"] == [
        {"model": "pythia-160m", "loss": 2.9, "accuracy": 0.44, "perplexity": 18.2}
    ]
    assert status["checkpoints"][0]["step"] == 20
    assert status["startTime"] == "2026-11-29T06:00:01Z"
    FineTuneJobStatus.model_validate(status)


def test_progress_kept_when_not_polled() -> None:
    first = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), progress_report(), NOW)
    again = derived(
        parsed(status=first),
        Observed(batch_job=batch_job(active=1), pods=[pod()]),
        None,
        NOW + timedelta(seconds=5),
    )
    assert again == first, "the same observation gives the same status"


def test_metrics_in_the_status_have_five_significant_digits() -> None:
    """What `kubectl get ftj` prints: 0.78004, not 0.7800356164157423 (metrics.jsonl keeps it all)."""
    report = progress_report(
        trainLoss=0.91234567,
        evaluations=[
            {
                "step": 30,
                "loss": 0.7800356164157423,
                "accuracy": 0.7665081880612784,
                "perplexity": 2.1815499631049864,
            }
        ],
        baselines=[
            {
                "model": "gpt-j-6b",
                "loss": 3.6211434680195125,
                "accuracy": 0.36,
                "perplexity": 37.380286555882904,
            }
        ],
    )
    status = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), report, NOW)
    assert status["latestEvaluation"] == {
        "step": 30,
        "loss": 0.78004,
        "accuracy": 0.76651,
        "perplexity": 2.1815,
    }
    assert status["baselines"][-1] == {
        "model": "gpt-j-6b",
        "loss": 3.6211,
        "accuracy": 0.36,
        "perplexity": 37.38,
    }
    assert status["progress"]["trainLoss"] == 0.91235


def test_evaluations_merge_across_polls() -> None:
    first = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), progress_report(), NOW)
    later = progress_report(
        step=60, evaluations=[{"step": 40, "loss": 2.5, "accuracy": 0.5, "perplexity": 12.2}]
    )
    second = derived(parsed(status=first), Observed(batch_job=batch_job(active=1), pods=[pod()]), later, NOW)
    assert [e["step"] for e in second["evaluations"]] == [0, 20, 40]
    assert second["latestEvaluation"]["step"] == 40


def test_final_summary_fills_in_results() -> None:
    observed = Observed(
        batch_job=batch_job(
            succeeded=1, conditions=[condition("Complete")], completion_time="2026-11-29T06:21:00Z"
        ),
        pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_OK)],
    )
    status = derived(parsed(), observed, None, NOW)
    assert status["progress"]["steps"] == "100/100"
    assert status["progress"]["percent"] == 100.0
    assert status["latestEvaluation"]["step"] == 100
    assert status["checkpoints"][-1]["uri"].endswith("step-000100/")
    assert status["completionTime"] == "2026-11-29T06:21:00Z"
    assert status["exitCode"] == 0


def test_terminal_phase_is_sticky_when_job_is_gone() -> None:
    """A Job deleted by ttlSecondsAfterFinished leaves the FineTuneJob's status as it was."""
    observed = Observed(
        batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
        pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_OK)],
    )
    done = derived(parsed(), observed, None, NOW)
    later = derived(parsed(status=done), Observed(), None, NOW + timedelta(hours=1))
    assert later == done


def test_cancel_after_success_stays_succeeded() -> None:
    done = derived(parsed(), Observed(batch_job=batch_job(conditions=[condition("Complete")])), None, NOW)
    after = derived(
        parsed(status=done, cancel=True),
        Observed(batch_job=batch_job(suspend=True, conditions=[condition("Complete")])),
        None,
        NOW,
    )
    assert after["phase"] == "Succeeded"


def test_transition_times_change_only_on_transitions() -> None:
    running = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), None, NOW)
    later = NOW + timedelta(minutes=5)
    still = derived(
        parsed(status=running), Observed(batch_job=batch_job(active=1), pods=[pod()]), None, later
    )
    assert still["conditions"] == running["conditions"]
    done = derived(
        parsed(status=running), Observed(batch_job=batch_job(conditions=[condition("Complete")])), None, later
    )
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Ready"] == "2026-11-29T06:05:00Z"  # False -> True
    assert times["Reconciling"] == "2026-11-29T06:05:00Z"  # True -> False
    assert times["Stalled"] == "2026-11-29T06:00:00Z"  # False all along


def test_invalid_spec_status() -> None:
    ref = ObjectRef(name="demo", namespace="team-a", uid="u", generation=2)
    status = invalid(ref, {}, ["spec.model: exactly one of name or uri must be set"], NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.model: exactly one of name or uri" in status["message"]
    assert _conditions(status) == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    FineTuneJobStatus.model_validate(status)


def test_invalid_spec_failure_is_reevaluated_after_a_fix() -> None:
    failed = derived(
        parsed(), Observed(problem=Problem(Reason.INVALID_SPEC, "bad", permanent=True)), None, NOW
    )
    fixed = derived(parsed(status=failed, generation=2), Observed(batch_job=batch_job()), None, NOW)
    assert fixed["phase"] == "Pending"


@pytest.mark.parametrize(
    ("report", "expected_steps"),
    [
        pytest.param({"step": 5, "totalSteps": None}, "5", id="total-unknown"),
        pytest.param({"step": "x", "totalSteps": 10}, "0/10", id="garbage-step"),
        pytest.param({"step": 3, "totalSteps": 10, "trainLoss": float("nan")}, "3/10", id="nan-loss-dropped"),
        pytest.param(
            {
                "step": -4,
                "totalSteps": -1,
                "etaSeconds": -5,
                "tokensPerSecond": -1,
                "evaluations": [{"step": -1}, "x"],
                "checkpoints": [{"step": -2, "uri": "s3://x/"}],
                "trainedTokens": -9,
                "epoch": -1,
            },
            "0",
            id="negative-values-dropped",
        ),
        pytest.param(
            {"step": True, "totalSteps": 10, "baselines": [{"model": 3}, "x"]}, "0/10", id="wrong-types"
        ),
    ],
)
def test_malformed_progress_is_tolerated(report: dict[str, Any], expected_steps: str) -> None:
    status = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), report, NOW)
    assert status["progress"]["steps"] == expected_steps
    assert "trainLoss" not in status["progress"]
    FineTuneJobStatus.model_validate(status)


def test_no_flap_to_pending_between_pod_exit_and_job_completion() -> None:
    running = derived(parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), None, NOW)
    exited = Observed(batch_job=batch_job(), pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_OK)])
    between = derived(parsed(status=running), exited, None, NOW)
    assert (between["phase"], between["message"]) == (
        "Running",
        "pods exited; waiting for the Job to conclude",
    )
    resumed = derived(
        parsed(status=running),
        Observed(batch_job=batch_job(active=1), pods=[pod(phase="Pending")]),
        None,
        NOW,
    )
    assert resumed["phase"] == "Pending", "new pods that have not started yet are Pending"


# ---- status.checkpoints: exactly the checkpoints that still exist ---------------------------------
def _ckpt(step: int, *, detailed: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "uri": f"s3://runs/team-a/demo/checkpoints/step-{step:06d}/"}
    if detailed:
        record.update(time=f"2026-11-29T06:{step // 10:02d}:00Z", metrics={"trainLoss": 2.0, "evalLoss": 2.1})
    return record


def _summary(*steps: int, detailed: bool = True, listed: bool = True, **fields: Any) -> str:
    """A termination summary listing the checkpoints `steps` (left out unless `listed`)."""
    summary: dict[str, Any] = {
        "phase": "Succeeded",
        "exitCode": 0,
        "reason": "Completed",
        "message": "done",
        "step": 60,
        "totalSteps": 60,
        "runUri": "s3://runs/team-a/demo/",
        **fields,
    }
    if listed:
        summary["checkpoints"] = [_ckpt(s, detailed=detailed) for s in steps]
    return json.dumps(summary)


NO_LIST = object()  # the report has no checkpoint list (null: the trainer has not listed them yet)
RUNNING = [pod()]
DONE = Observed(
    batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
    pods=[pod(phase="Succeeded", exit_code=0, message=_summary(40, 50, 60))],
)
FAILED_POD = pod(
    phase="Failed", exit_code=1, message=_summary(20, 30, 40, phase="Failed", exitCode=1, step=40)
)
FAILED = Observed(batch_job=batch_job(failed=1), pods=[FAILED_POD])
RETRYING = Observed(batch_job=batch_job(active=1, failed=1), pods=[FAILED_POD, pod(phase="Running")])

CHECKPOINT_CASES = [
    # id, checkpoints in the previous status, observed, reported list (or NO_LIST / None: not polled), expected steps
    ("first-report", [], Observed(batch_job=batch_job(active=1), pods=RUNNING), [10], [10]),
    (
        "keep-last-deleted-the-oldest",
        [10, 20, 30],
        Observed(batch_job=batch_job(active=1), pods=RUNNING),
        [20, 30, 40],
        [20, 30, 40],
    ),
    (
        "not-listed-yet-keeps-the-list",
        [10, 20],
        Observed(batch_job=batch_job(active=1), pods=RUNNING),
        NO_LIST,
        [10, 20],
    ),
    (
        "resumed-run-lists-earlier-checkpoints",
        [10, 20],
        Observed(batch_job=batch_job(active=1), pods=RUNNING),
        [10, 20, 30],
        [10, 20, 30],
    ),
    (
        "not-polled-keeps-the-list",
        [10, 20],
        Observed(batch_job=batch_job(active=1), pods=RUNNING),
        None,
        [10, 20],
    ),
    ("final-summary-after-the-last-retention", [30, 40, 50], DONE, None, [40, 50, 60]),
    ("summary-and-report-agree", [30, 40, 50], DONE, [40, 50, 60], [40, 50, 60]),
    ("failed-attempts-summary-after-its-last-retention", [10, 20, 30], FAILED, None, [20, 30, 40]),
    ("retry-report-replaces", [20, 30, 40], RETRYING, [30, 40, 50], [30, 40, 50]),
    ("earlier-attempts-summary-ignored-while-a-retry-runs", [30, 40, 50], RETRYING, None, [30, 40, 50]),
    (
        "summary-without-a-list-keeps-the-list",
        [30, 40],
        Observed(
            batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
            pods=[pod(phase="Succeeded", exit_code=0, message=_summary(listed=False))],
        ),
        None,
        [30, 40],
    ),
    (
        "malformed-entries-dropped",
        [10],
        Observed(batch_job=batch_job(active=1), pods=RUNNING),
        [{"step": -1, "uri": "s3://x/"}, {"step": 20}, _ckpt(30)],
        [30],
    ),
]


@pytest.mark.parametrize(
    ("previous", "observed", "reported", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CHECKPOINT_CASES],
)
def test_status_lists_exactly_the_checkpoints_that_still_exist(
    previous: list[int], observed: Observed, reported: Any, expected: list[int]
) -> None:
    before = {"phase": "Running", "checkpoints": [_ckpt(s) for s in previous]}
    report = None
    if reported is not None:
        checkpoints = (
            None if reported is NO_LIST else [c if isinstance(c, dict) else _ckpt(c) for c in reported]
        )
        report = progress_report(step=60, total=60, checkpoints=checkpoints)
    status = derived(parsed(status=before), observed, report, NOW)
    assert [c["step"] for c in status.get("checkpoints", [])] == expected
    FineTuneJobStatus.model_validate(status)


def test_a_shortened_summary_keeps_what_is_known_of_each_checkpoint() -> None:
    """The termination summary may carry only step and URI (4096 bytes); time and metrics stay."""
    before = {"phase": "Running", "checkpoints": [_ckpt(40), _ckpt(50)]}
    done = Observed(
        batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
        pods=[pod(phase="Succeeded", exit_code=0, message=_summary(50, 60, detailed=False))],
    )
    status = derived(parsed(status=before), done, None, NOW)
    assert status["checkpoints"] == [_ckpt(50), _ckpt(60, detailed=False)]


# ---- mode Evaluate -------------------------------------------------------------------------------------
def test_an_evaluation_reports_step_zero_of_zero_steps_printed_as_eval() -> None:
    report = progress_report(
        step=0,
        total=0,
        phase="Evaluating",
        trainLoss=None,
        learningRate=None,
        etaSeconds=None,
        tokensPerSecond=None,
        epoch=None,
        checkpoints=[],
        evaluations=[{"step": 0, "loss": 2.2, "accuracy": 0.55, "perplexity": 9.025}],
    )
    running = derived(parsed(**EVALUATE), Observed(batch_job=batch_job(active=1), pods=[pod()]), report, NOW)
    assert running["progress"] == {
        "step": 0,
        "totalSteps": 0,
        "steps": "eval",
        "trainerPhase": "Evaluating",
        "updatedAt": "2026-11-29T06:00:00Z",
    }
    assert running["latestEvaluation"]["step"] == 0 and running["checkpoints"] == []
    done = Observed(
        batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
        pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_EVALUATED)],
    )
    finished = derived(parsed(status=running, **EVALUATE), done, None, NOW)
    assert (finished["phase"], finished["progress"]["steps"], finished["progress"]["percent"]) == (
        "Succeeded",
        "eval",
        100.0,
    )
    assert finished["evaluations"] == [{"step": 0, "loss": 2.2, "accuracy": 0.55, "perplexity": 9.025}]
    assert finished["baselines"][0]["model"] == "pythia-160m" and finished["checkpoints"] == []
    FineTuneJobStatus.model_validate(finished)


def test_derive_status_is_typed_and_its_json_form_round_trips() -> None:
    status = derive_status(
        parsed(), Observed(batch_job=batch_job(active=1), pods=[pod()]), progress_report(), NOW
    )
    assert status.phase is Phase.RUNNING
    assert status.progress is not None and status.progress.updated_at == "2026-11-29T06:00:00Z"
    assert FineTuneJobStatus.from_dict(status.to_dict()) == status
    assert "restarts" not in status.to_dict(), "only the fields the cycle set are written"
