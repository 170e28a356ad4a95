"""Experiment templates, edited manifests, run selection, eval jobs and checkpoint IDs (pure)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from finetune_cli import experiments
from finetune_operator.api import JOB_NAME_MAX_LENGTH, parse_spec
from tests.unit.cli_factories import REUTERS_STATUS, ftj, reuters_job


@pytest.mark.parametrize(
    ("dataset", "datasets_uri"),
    [
        pytest.param(None, None, id="train-uris"),
        pytest.param("reuters", "s3://datasets/", id="registered-dataset"),
    ],
)
def test_template_is_a_valid_suspended_finetunejob(dataset: str | None, datasets_uri: str | None) -> None:
    text = experiments.template(name="exp-1", model="pythia-70m", dataset=dataset, datasets_uri=datasets_uri)
    manifest = yaml.safe_load(text)
    assert manifest["kind"] == "FineTuneJob"
    assert manifest["spec"]["suspend"] is True
    spec = parse_spec(manifest["spec"])
    assert spec.model.name == "pythia-70m"
    assert spec.dataset.name == dataset
    assert spec.storage.datasets_uri == datasets_uri


def test_errors_are_added_as_a_comment_and_replaced_on_the_next_round() -> None:
    text = experiments.template(name="exp-1", model="pythia-70m")
    once = experiments.with_errors(text, ["spec.hyperparameters.dropout: should be <= 1"])
    assert once.startswith(experiments.ERROR_HEADER)
    assert "# ERROR: spec.hyperparameters.dropout: should be <= 1\n" in once
    twice = experiments.with_errors(once, ["line one\nline two"])
    assert "dropout" not in twice
    assert "# ERROR: line one\n# ERROR: line two\n" in twice
    assert experiments.strip_errors(twice) == text
    assert yaml.safe_load(twice) == yaml.safe_load(text)


def test_parse_manifest_forces_suspend_namespace_and_label() -> None:
    text = experiments.template(name="exp-1", model="pythia-70m").replace("suspend: true", "suspend: false")
    manifest = experiments.parse_manifest(text, namespace="team")
    assert manifest["spec"]["suspend"] is True
    assert manifest["metadata"]["namespace"] == "team"
    assert manifest["metadata"]["labels"] == {experiments.LABEL_ROLE: experiments.ROLE_EXPERIMENT}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("spec: [unclosed", "not valid YAML", id="yaml-syntax"),
        pytest.param("- a\n- b\n", "expected one FineTuneJob", id="a-list"),
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n",
            "kind must be FineTuneJob",
            id="wrong-kind",
        ),
        pytest.param(
            "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {}\nspec: {}\n",
            "metadata.name is required",
            id="no-name",
        ),
        pytest.param(
            "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n",
            "spec is required",
            id="no-spec",
        ),
    ],
)
def test_parse_manifest_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(experiments.ManifestError, match=message):
        experiments.parse_manifest(text, namespace="team")


def _jobs() -> list[dict[str, Any]]:
    return [
        ftj("a", created="2026-11-29T06:00:00Z", suspend=True),
        ftj("b", created="2026-11-29T06:01:00Z", suspend=True),
        ftj("c", created="2026-11-29T06:02:00Z", suspend=True),
        ftj("started", created="2026-11-29T06:03:00Z", suspend=True, startTime="2026-11-29T06:04:00Z"),
        ftj("cancelled", created="2026-11-29T06:04:00Z", suspend=True, cancel=True),
        ftj("plain", created="2026-11-29T06:05:00Z", suspend=True, role=None),
        ftj("running", created="2026-11-29T06:06:00Z"),
    ]


@pytest.mark.parametrize(
    ("count", "names"),
    [
        pytest.param(1, ["c"], id="newest"),
        pytest.param(2, ["b", "c"], id="two-oldest-first"),
        pytest.param(10, ["a", "b", "c"], id="more-than-waiting"),
    ],
)
def test_to_run_picks_the_newest_waiting_experiments(count: int, names: list[str]) -> None:
    assert experiments.to_run(_jobs(), count) == names


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        pytest.param("neox-reuters:2000", ("neox-reuters", 2000), id="job-step"),
        pytest.param("a:0", ("a", 0), id="step-0"),
    ],
)
def test_parse_checkpoint_id(value: str, parsed: tuple[str, int]) -> None:
    assert experiments.parse_checkpoint_id(value) == parsed
    assert experiments.checkpoint_id(*parsed) == value


@pytest.mark.parametrize(
    "value", [pytest.param("neox-reuters", id="no-step"), pytest.param("X:1", id="upper-case")]
)
def test_parse_checkpoint_id_rejects_other_text(value: str) -> None:
    with pytest.raises(experiments.ManifestError, match="IDs look like <job>:<step>"):
        experiments.parse_checkpoint_id(value)


def test_find_checkpoint_returns_the_uri_or_lists_the_steps() -> None:
    assert experiments.find_checkpoint(reuters_job(), 1000) == REUTERS_STATUS["checkpoints"][0]["uri"]
    with pytest.raises(experiments.ManifestError, match="it has steps 1000, 2000"):
        experiments.find_checkpoint(reuters_job(), 500)
    with pytest.raises(experiments.ManifestError, match="no checkpoints yet"):
        experiments.find_checkpoint(ftj(), 500)


@pytest.mark.parametrize(
    ("model", "dataset"),
    [
        pytest.param("gpt-j-6b", "reuters", id="short"),
        pytest.param("a-very-long-model-name-" * 4, "dataset-name-" * 4, id="shortened"),
        pytest.param("Model_With.Dots", "x", id="slugged"),
    ],
)
def test_eval_name_is_a_valid_job_name(model: str, dataset: str) -> None:
    name = experiments.eval_name(model, dataset, "061500")
    assert len(name) <= JOB_NAME_MAX_LENGTH
    assert name.startswith("eval-") and name.endswith("-061500")
    assert "--" not in name


def test_eval_manifest_is_a_valid_evaluate_mode_spec() -> None:
    manifest = experiments.eval_manifest(
        name="eval-x",
        namespace="team",
        model={"uri": "s3://runs/team/job/checkpoints/step-000100/"},
        dataset={"eval": ["s3://data/reuters/eval.jsonl"]},
        storage={"datasetsUri": "s3://datasets/"},
        hyperparameters={"sequenceLength": 1024, "seed": 7},
        max_batches=4,
    )
    assert manifest["metadata"]["labels"] == {experiments.LABEL_ROLE: experiments.ROLE_EVALUATION}
    assert experiments.is_evaluation(manifest)
    spec = parse_spec(manifest["spec"])
    assert (spec.mode, spec.evaluation.at_start, spec.evaluation.max_batches) == ("Evaluate", True, 4)
    assert (spec.hyperparameters.max_steps, spec.hyperparameters.sequence_length) == (None, 1024)
    assert "checkpoints" not in manifest["spec"] and "lora" not in manifest["spec"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {
                "hyperparameters": {
                    "maxSteps": 2000,
                    "batchSize": 32,
                    "microBatchSize": 4,
                    "sequenceLength": 1024,
                    "seed": 7,
                    "learningRate": 2e-5,
                },
                "evaluation": {"maxBatches": 50},
            },
            ({"sequenceLength": 1024, "seed": 7, "batchSize": 4, "microBatchSize": 4}, 50),
            id="micro-batch-and-max-batches",
        ),
        pytest.param(
            {
                "hyperparameters": {"batchSize": 32, "precision": "bf16"},
                "resources": {"nodes": 2, "processesPerNode": 4},
            },
            ({"precision": "bf16", "batchSize": 4, "microBatchSize": 4}, None),
            id="per-process-batch",
        ),
        pytest.param({}, ({}, None), id="defaults"),
    ],
)
def test_a_checkpoint_is_evaluated_as_its_job_evaluates(
    spec: dict[str, Any], expected: tuple[dict[str, Any], int | None]
) -> None:
    """Sequence length, seed (the held-out split), precision and micro-batch of the source job."""
    job = {"metadata": {"name": "neox"}, "spec": {"model": {"name": "pythia-1.4b"}, **spec}}
    settings, max_batches = experiments.evaluation_settings(job)
    assert (settings, max_batches) == expected
    manifest = experiments.eval_manifest(
        name="e", namespace="n", model={"uri": "s3://r/c/"}, dataset={"name": "d"}, hyperparameters=settings
    )
    parse_spec(manifest["spec"])
