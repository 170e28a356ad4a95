"""Rows and tables the CLI prints, from FineTuneJob objects (pure)."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
from rich.console import Console

from finetune_cli import reading, views
from tests.unit.cli_factories import REUTERS_STATUS, ftj, gptj_evaluation, reuters_job


def _text(view: views.View) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(views.render(view))
    return out.getvalue()


@pytest.mark.parametrize(
    ("job", "phase"),
    [
        pytest.param(ftj(phase="Running"), "Running", id="from-status"),
        pytest.param(ftj(suspend=True), "Suspended", id="suspended-not-yet-seen"),
        pytest.param(ftj(), "Pending", id="new-not-yet-seen"),
        pytest.param(ftj(cancel=True), "Cancelling", id="cancel-not-yet-seen"),
    ],
)
def test_phase_of(job: dict[str, Any], phase: str) -> None:
    assert reading.phase_of(job) == phase


@pytest.mark.parametrize(
    ("status", "text"),
    [
        pytest.param({}, "", id="no-progress"),
        pytest.param({"progress": {"step": 5}}, "5", id="total-unknown"),
        pytest.param({"progress": {"step": 50, "totalSteps": 200}}, "50/200 (25%)", id="percent-computed"),
        pytest.param(
            {"phase": "Succeeded", "progress": {"step": 198, "totalSteps": 200}},
            "200/200 (100%)",
            id="succeeded-is-done",
        ),
    ],
)
def test_progress_text(status: dict[str, Any], text: str) -> None:
    assert reading.progress_text(ftj(**status)) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(None, "-", id="unknown"),
        pytest.param(42.4, "42s", id="seconds"),
        pytest.param(125, "2m05s", id="minutes"),
        pytest.param(3720, "1h02m", id="hours"),
        pytest.param(float("nan"), "-", id="nan"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert reading.duration(seconds) == text


@pytest.mark.parametrize(
    ("spec_model", "label"),
    [
        pytest.param({"name": "pythia-70m"}, "pythia-70m", id="catalog-name"),
        pytest.param({"uri": "s3://models/team/my-model/"}, "my-model", id="uri-folder"),
    ],
)
def test_model_label_without_status(spec_model: dict[str, Any], label: str) -> None:
    job = ftj()
    job["spec"]["model"] = spec_model
    assert reading.model_label(job) == label


def test_jobs_view_has_the_studio_columns() -> None:
    view = views.jobs_view([reuters_job()], namespace="team")
    assert [c.header for c in view.columns][:6] == [
        "ID",
        "Model",
        "Start (UTC)",
        "End (UTC)",
        "Phase",
        "Progress",
    ]
    row = view.rows[0]
    assert (row["id"], row["model"], row["phase"], row["progress"]) == (
        "neox-reuters",
        "pythia-1.4b",
        "Succeeded",
        "2000/2000 (100%)",
    )
    text = _text(view)
    assert "11-29 06:01" in text
    assert "1.880" in text


def test_jobs_view_empty_says_what_to_do() -> None:
    view = views.jobs_view([], namespace="team")
    assert "kubectl finetune experiment add" in view.empty


def test_jobs_view_shows_a_dashboard_link_when_configured() -> None:
    view = views.jobs_view([reuters_job()], namespace="team", dashboard="https://grafana/d/ft?ns=team")
    assert "https://grafana/d/ft?ns=team" in _text(view)


def test_compare_reproduces_the_studio_table() -> None:
    rows = reading.compare_rows([reuters_job()])
    table = [
        (r["model"], r["step"], r["accuracy"], r["loss"], round(r["perplexity"], 2), r["kind"]) for r in rows
    ]
    assert table == [
        ("gpt-j-6b", 0, 0.625, 1.92, 6.84, "baseline"),
        ("pythia-1.4b", 0, 0.52, 2.41, 11.13, "zero-shot"),
        ("pythia-1.4b", 1000, 0.59, 1.95, 7.03, "fine-tuned"),
        ("pythia-1.4b", 2000, 0.602, 1.88, 6.56, "fine-tuned"),
    ]
    view = views.compare_view([reuters_job()])
    assert [c.header for c in view.columns][:5] == ["Model", "Step", "Accuracy", "Loss", "Perplexity"]
    assert view.highlight == {3}  # the fine-tuned 1.4B model has the lowest loss


def test_compare_lists_a_shared_baseline_once_and_flags_different_datasets() -> None:
    other = ftj("neox-patents", dataset={"name": "patents"}, **REUTERS_STATUS)
    same = ftj("neox-reuters-2", **REUTERS_STATUS)
    rows = reading.compare_rows([reuters_job(), same, other])
    baselines = [(r["model"], r["dataset"]) for r in rows if r["kind"] == "baseline"]
    assert baselines == [("gpt-j-6b", "reuters"), ("gpt-j-6b", "patents")]
    assert views.compare_view([reuters_job(), other]).caption == "Different datasets are not comparable."


def test_compare_shows_an_evaluation_next_to_the_fine_tuned_model() -> None:
    """The studio's Table 1: the fine-tuned 1.4B model against GPT-J 6B evaluated (mode Evaluate)."""
    rows = reading.compare_rows([reuters_job(), gptj_evaluation()])
    assert [(r["model"], r["step"], r["kind"], r["job"]) for r in rows][-2:] == [
        ("pythia-1.4b", 2000, "fine-tuned", "neox-reuters"),
        ("gpt-j-6b", 0, "evaluation", "eval-gpt-j"),
    ]
    assert views.compare_view([reuters_job(), gptj_evaluation()]).caption is None, "same dataset"


def test_compare_derives_perplexity_from_loss_when_missing() -> None:
    job = ftj(evaluations=[{"step": 0, "loss": 2.0, "accuracy": 0.5}])
    assert reading.compare_rows([job])[0]["perplexity"] == pytest.approx(math.exp(2.0))


def test_evaluations_view_links_steps_to_checkpoint_ids() -> None:
    view = views.evaluations_view(reuters_job())
    by_step = {(r["kind"], r["step"]): r["checkpoint"] for r in view.rows}
    assert by_step == {
        ("baseline", 0): None,
        ("zero-shot", 0): None,
        ("fine-tuned", 1000): "neox-reuters:1000",
        ("fine-tuned", 2000): "neox-reuters:2000",
    }


def test_checkpoints_view_has_id_time_and_step() -> None:
    view = views.checkpoints_view([reuters_job()], title="Checkpoints")
    assert [(r["id"], r["step"], r["time"]) for r in view.rows] == [
        ("neox-reuters:1000", 1000, "2026-11-29T07:31:00Z"),
        ("neox-reuters:2000", 2000, "2026-11-29T09:01:00Z"),
    ]


@pytest.mark.parametrize(
    ("given", "changed"),
    [
        pytest.param({"maxSteps": 2000, "learningRate": 2e-5}, {"maxSteps", "learningRate"}, id="some-set"),
        pytest.param({"dropout": 0.0, "batchSize": 8}, set(), id="defaults-written-out"),
        pytest.param(None, set(), id="absent"),
    ],
)
def test_hyperparameters_view_shows_values_next_to_defaults(
    given: dict[str, Any] | None, changed: set[str]
) -> None:
    view = views.hyperparameters_view(ftj(hyperparameters=given))
    rows = {r["name"]: r for r in view.rows}
    assert (rows["dropout"]["value"], rows["dropout"]["default"]) == (0.0, 0.0)
    assert {r["name"] for r in view.rows if r["changed"]} == changed
    assert {view.rows[i]["name"] for i in view.highlight} == changed


def test_plot_series_has_a_line_per_job_and_a_flat_line_per_baseline() -> None:
    series = reading.plot_series([reuters_job()])
    job, baseline = series
    assert job.label == "neox-reuters (pythia-1.4b)"
    assert job.steps == [0, 1000, 2000]
    assert job.values["loss"] == [2.41, 1.95, 1.88]
    assert baseline.baseline
    assert baseline.steps == [0, 2000]
    assert baseline.values["accuracy"] == [0.625, 0.625]


def test_summary_view_names_phase_and_run_folder() -> None:
    job = ftj(
        phase="Failed", reason="InvalidInput", message="train.jsonl:3: no field 'text'", runUri="s3://runs/x/"
    )
    rows = {r["field"]: r["value"] for r in views.summary_view(reading.job_summary(job)).rows}
    assert rows["phase"] == "Failed"
    assert rows["message"] == "train.jsonl:3: no field 'text'"
    assert rows["runUri"] == "s3://runs/x/"


def test_empty_optional_columns_are_left_out() -> None:
    waiting = _text(views.jobs_view([ftj(suspend=True)], namespace="team"))
    assert "ETA" not in waiting and "Loss" not in waiting
    assert "Loss" in _text(views.jobs_view([reuters_job()], namespace="team"))


def test_plot_series_draws_an_evaluation_as_a_flat_line() -> None:
    checkpoint = ftj(
        "eval-ckpt", mode="Evaluate", **{**REUTERS_STATUS, "evaluations": REUTERS_STATUS["evaluations"][:1]}
    )
    checkpoint["spec"]["model"] = {"uri": "s3://runs/team/neox-reuters/checkpoints/step-001000/"}
    checkpoint["status"]["model"] = "step-001000"
    series = reading.plot_series([reuters_job(), gptj_evaluation(), checkpoint])
    flat = {s.label: s for s in series if s.baseline}
    # the job's GPT-J baseline and the GPT-J evaluation are one zero-shot line; a checkpoint is not zero-shot
    assert set(flat) == {"gpt-j-6b (zero-shot)", "step-001000 (evaluation)"}
    assert flat["gpt-j-6b (zero-shot)"].steps == [0, 2000]


def test_an_evaluation_job_shows_its_result_and_eval_as_progress() -> None:
    job = gptj_evaluation()
    row = reading.job_row(job)
    assert (row["evalLoss"], row["accuracy"], row["progress"]) == (1.92, 0.625, "eval")
    assert reading.progress_fields(job) == (
        100.0,
        {"steps": "eval", "phase": "Succeeded", "detail": "loss 1.920"},
    )
    assert reading.job_summary(job)["mode"] == "Evaluate"
    by_kind = {(r["kind"], r["step"]) for r in views.evaluations_view(job).rows}
    assert by_kind == {("evaluation", 0)}


@pytest.mark.parametrize(
    ("status", "percent", "fields"),
    [
        pytest.param(
            {"phase": "Running", "progress": {"step": 50, "totalSteps": 200, "etaSeconds": 90}},
            25.0,
            {"steps": "50/200", "phase": "Running", "detail": "eta 1m30s"},
            id="running",
        ),
        pytest.param(
            {"phase": "Failed", "message": "invalid input", "latestEvaluation": {"loss": 2.0}},
            0.0,
            {"steps": "0", "phase": "Failed", "detail": "loss 2.000 invalid input"},
            id="failed-with-message",
        ),
    ],
)
def test_progress_fields_of_a_live_bar(
    status: dict[str, Any], percent: float, fields: dict[str, str]
) -> None:
    assert reading.progress_fields(ftj(**status)) == (percent, fields)


def test_wide_adds_columns_at_the_end_and_all_namespaces_a_namespace_first() -> None:
    job = reuters_job()
    narrow = _text(views.jobs_view([job], namespace="team"))
    wide = views.render(views.jobs_view([job], namespace="team"), wide=True)
    headers = [c.header for c in wide.columns]
    assert "Dataset" not in narrow and "Message" not in narrow
    assert headers[-2:] == ["Dataset", "Created (UTC)"], "Message only when a job has one"
    every = views.jobs_view([job], namespace="team", all_namespaces=True)
    assert every.title == "FineTuneJobs in all namespaces"
    assert every.columns[0].header == "Namespace" and every.rows[0]["namespace"] == "team"


def test_name_output_is_kind_slash_name_for_jobs_and_refused_without_names() -> None:
    assert views.jobs_view([reuters_job()], namespace="team").names() == [
        "finetunejob.finetune.dev/neox-reuters"
    ]
    assert views.checkpoints_view([reuters_job()], title="t").names() == [
        "neox-reuters:1000",
        "neox-reuters:2000",
    ]
    with pytest.raises(ValueError, match=r"-o name: the rows of .* have no name"):
        views.compare_view([reuters_job()]).names()


def test_status_caption_says_how_to_open_a_jobs_tensorboard() -> None:
    caption = views.jobs_view([reuters_job()], namespace="team", tensorboard=True).caption
    assert "TensorBoard of a job: kubectl finetune tensorboard ID" in str(caption)
    assert views.jobs_view([], namespace="team", tensorboard=True).caption is None, "no job, no hint"


def _pod(name: str, rank: int, created: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "annotations": {reading.COMPLETION_INDEX: str(rank)},
        }
    }


def test_pods_by_rank_keeps_the_newest_pod_of_each_rank() -> None:
    pods = [
        _pod("j-1-new", 1, "2026-11-29T07:00:00Z"),
        _pod("j-0-old", 0, "2026-11-29T06:00:00Z"),
        _pod("j-0-new", 0, "2026-11-29T07:00:00Z"),
        {"metadata": {"name": "no-index"}},
    ]
    assert {rank: p["metadata"]["name"] for rank, p in reading.pods_by_rank(pods).items()} == {
        0: "j-0-new",
        1: "j-1-new",
    }
    assert reading.trainer_selector("j") == "finetune.dev/job-name=j,app.kubernetes.io/component=trainer"


def test_event_rows_are_the_jobs_its_batch_jobs_and_its_pods_oldest_first() -> None:
    job = ftj("studio", jobName="studio")
    events = [
        {"involvedObject": {"kind": "Pod", "name": "studio-0-x"}, "reason": "Started", "type": "Normal",
         "lastTimestamp": "2026-11-29T06:02:00Z", "message": "Started container trainer", "count": 1},
        {"involvedObject": {"kind": "FineTuneJob", "name": "studio"}, "reason": "Created", "type": "Normal",
         "eventTime": "2026-11-29T06:00:00.000000Z", "message": "created Job studio"},
        {"involvedObject": {"kind": "Pod", "name": "other-0-y"}, "reason": "Started", "type": "Normal",
         "lastTimestamp": "2026-11-29T06:01:00Z", "message": "not ours"},
        {"involvedObject": {"kind": "Job", "name": "studio"}, "reason": "SuccessfulCreate", "type": "Normal",
         "lastTimestamp": "2026-11-29T06:01:00Z", "message": "Created pod: studio-0-x", "count": 2},
    ]  # fmt: skip
    rows = reading.event_rows(events, job, ["studio-0-x"])
    assert [(r["object"], r["reason"], r["count"]) for r in rows] == [
        ("finetunejob/studio", "Created", 1),
        ("job/studio", "SuccessfulCreate", 2),
        ("pod/studio-0-x", "Started", 1),
    ]
    assert "Started container trainer" in _text(views.events_view(rows, job="studio"))
