"""Spec parsing and validation messages (pure): every error names its field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import FineTuneJob, SpecError, parse_spec
from tests.operator.factories import ftj, spec
from tests.validation_cases import CLOSE_BUT_VALID, GAPS


def test_minimal_spec_gets_defaults() -> None:
    parsed = parse_spec({"model": {"name": "pythia-70m"}, "dataset": {"train": ["s3://d/t.jsonl"]}})
    assert parsed.hyperparameters.batch_size == 8
    assert parsed.resources.nodes == 1
    assert parsed.run_policy.backoff_limit == 3
    assert parsed.run_policy.termination_grace_period_seconds == 300
    assert parsed.lora is None
    assert (parsed.suspend, parsed.cancel) == (False, False)


def test_object_identity() -> None:
    job = FineTuneJob.from_object(ftj(generation=4))
    assert (job.name, job.namespace, job.ref.generation) == ("demo", "team-a", 4)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"model": {"name": "pythia-70m", "uri": "hf://x/y"}},
            ["spec.model: exactly one of name or uri"],
            id="model-name-and-uri",
        ),
        pytest.param({"model": {}}, ["spec.model: exactly one of name or uri"], id="model-neither"),
        pytest.param(
            {"resources": {"gpus": 4}, "hyperparameters": {"batchSize": 8}},
            [
                "spec.resources: processesPerNode must equal gpus when gpus > 0 (one training process per GPU), "
                "got processesPerNode 1 and gpus 4"
            ],
            id="gpus-without-processes",
        ),
        pytest.param(
            {"model": {"name": "p", "init": "random"}},
            ["spec.model.init: Input should be 'pretrained' or 'scratch'"],
            id="init-enum",
        ),
        pytest.param(
            {"dataset": {"name": "reuters", "train": ["s3://a/b"]}},
            ["spec.dataset: name and train are exclusive"],
            id="dataset-name-and-train",
        ),
        pytest.param(
            {"dataset": {"format": "text"}},
            ["spec.dataset: set name (a registered dataset), train (URIs) or, in mode Evaluate, eval"],
            id="dataset-no-source",
        ),
        pytest.param(
            {"dataset": {"eval": ["s3://d/eval.jsonl"]}},
            [
                "spec.dataset: mode Train needs dataset.name or dataset.train (eval alone is for mode Evaluate)"
            ],
            id="train-needs-training-data",
        ),
        pytest.param(
            {"mode": "Test"},
            ["spec.mode: Input should be 'Train' or 'Evaluate'"],
            id="mode-enum",
        ),
        pytest.param(
            {"mode": "Evaluate", "lora": {"rank": 4}, "hyperparameters": None},
            ["spec.lora: not allowed in mode Evaluate (nothing is trained); to evaluate a LoRA checkpoint"],
            id="evaluate-without-lora",
        ),
        pytest.param(
            {"mode": "Evaluate"},
            ["spec.hyperparameters.maxSteps: not allowed in mode Evaluate"],
            id="evaluate-without-max-steps",
        ),
        pytest.param(
            {"mode": "Evaluate", "hyperparameters": {"epochs": 2}},
            ["spec.hyperparameters.epochs: not allowed in mode Evaluate"],
            id="evaluate-without-epochs",
        ),
        pytest.param(
            {"mode": "Evaluate", "hyperparameters": None, "evaluation": {"atStart": False}},
            ["spec.evaluation.atStart: must be true in mode Evaluate (the step-0 evaluation is the result)"],
            id="evaluate-at-start",
        ),
        pytest.param(
            {"dataset": {"train": ["http://x/y"]}},
            ["spec.dataset.train[0]: must be s3://<bucket>/<key> or file:///<absolute path>"],
            id="dataset-uri-scheme",
        ),
        pytest.param(
            {"hyperparameters": {"dropout": 1.5}},
            ["spec.hyperparameters.dropout: Input should be less than or equal to 1"],
            id="dropout-range",
        ),
        pytest.param(
            {"hyperparameters": {"maxSteps": 10, "epochs": 1}},
            ["maxSteps and epochs are exclusive"],
            id="steps-xor-epochs",
        ),
        pytest.param(
            {"hyperparameters": {"batchSize": 8, "microBatchSize": 3}},
            ["batchSize must be a multiple of microBatchSize"],
            id="micro-divides",
        ),
        pytest.param(
            {"hyperparameters": {"batchSize": 6}, "resources": {"nodes": 4}},
            [
                "spec.hyperparameters.batchSize: must be a multiple of microBatchSize * nodes * processesPerNode (= 4), got 6"
            ],
            id="world-size-divides",
        ),
        pytest.param(
            {"model": {"name": "p", "init": "scratch"}, "lora": {}},
            ["spec.lora: LoRA needs model.init: pretrained"],
            id="lora-needs-pretrained",
        ),
        pytest.param(
            {"hyperparameters": {"learningRate": 0}},
            ["spec.hyperparameters.learningRate: Input should be greater than 0"],
            id="lr-positive",
        ),
        pytest.param(
            {"resources": {"memory": "lots"}},
            ["spec.resources.memory: String should match pattern"],
            id="memory-quantity",
        ),
        pytest.param(
            {"runPolicy": {"terminationGracePeriodSeconds": 5}},
            ["spec.runPolicy.terminationGracePeriodSeconds: Input should be greater than or equal to 30"],
            id="grace-minimum",
        ),
        pytest.param({"bogus": 1}, ["spec.bogus: Extra inputs are not permitted"], id="unknown-field"),
    ],
)
def test_invalid_specs_name_the_field(overrides: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**overrides))
    text = "\n".join(info.value.errors)
    for fragment in expected:
        assert fragment in text


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"dataset": {"eval": ["s3://d/eval.jsonl"]}}, id="eval-files-only"),
        pytest.param({"dataset": {"name": "reuters"}}, id="registered-dataset"),
        pytest.param({"dataset": {"train": ["s3://d/t.jsonl"], "evalSize": 16}}, id="held-out-of-train"),
        pytest.param(
            {"hyperparameters": {"batchSize": 4, "sequenceLength": 1024, "precision": "bf16", "seed": 7}},
            id="settings-evaluation-uses",
        ),
    ],
)
def test_evaluate_mode_specs(overrides: dict[str, Any]) -> None:
    parsed = parse_spec({**spec(hyperparameters=None), "mode": "Evaluate", **overrides})
    assert parsed.mode == "Evaluate"
    assert parsed.evaluation.at_start


def test_mode_defaults_to_train() -> None:
    assert parse_spec(spec()).mode == "Train"


def test_all_errors_at_once() -> None:
    bad = spec(hyperparameters={"dropout": 2.0, "weightDecay": -1}, resources={"nodes": 0})
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    fields = sorted(error.split(":")[0] for error in info.value.errors)
    assert fields == [
        "spec.hyperparameters.dropout",
        "spec.hyperparameters.weightDecay",
        "spec.resources.nodes",
    ]


# ---------------------------------------------------------------------------------------------
# The validation gaps of issue 14: each class with several instances. The same cases run against
# the real API server in tests/integration/test_operator_validation.py.


@pytest.mark.parametrize(("overrides", "field", "message"), GAPS)
def test_validation_gaps_are_closed(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**overrides))
    matching = [e for e in info.value.errors if e.startswith(f"{field}: ")]
    assert matching, f"no error names {field}: {info.value.errors}"
    assert any(message in e for e in matching), matching


@pytest.mark.parametrize("overrides", CLOSE_BUT_VALID)
def test_close_but_valid_specs_pass(overrides: dict[str, Any]) -> None:
    parse_spec(spec(**overrides))
