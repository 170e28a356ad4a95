"""Spec parsing and validation messages (pure): every error names its field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import FineTuneJob, SpecError, parse_spec
from tests.operator.factories import ftj, spec


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
            ["spec.dataset: mode Train needs dataset.name or dataset.train (eval alone is for mode Evaluate)"],
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

URI = "must be s3://<bucket>/<path>, file:///<absolute path> or hf://<org>/<name>"
DATA = "must be s3://<bucket>/<key> or file:///<absolute path>"
RUN = "must be a folder ending in /: s3://<bucket>/<prefix>/ or file:///<absolute path>/"
ENDPOINT = "without user:password@ (credentials belong in the Secret of storage.credentialsSecret)"
REVISION = "no '..'"
LABEL_KEY = "must be a label key"
LABEL_VALUE = "must be empty or a label value"
RELATIVE = "file:// paths must be absolute (file:///<path>)"
EVALUATE_ONLY = "is only used for training: in mode Evaluate leave it unset"

GAPS = [
    # URIs: absolute file://, a bucket for s3://, no whitespace
    pytest.param({"model": {"uri": "file://relative/model"}}, "spec.model.uri", RELATIVE, id="model-file-relative"),
    pytest.param({"model": {"uri": "file://./m/"}}, "spec.model.uri", RELATIVE, id="model-file-dot"),
    pytest.param(
        {"evaluation": {"baselines": [{"uri": "file://models/big/"}]}},
        "spec.evaluation.baselines[0].uri",
        RELATIVE,
        id="baseline-file-relative",
    ),
    pytest.param({"model": {"uri": "s3:///model/"}}, "spec.model.uri", URI, id="model-s3-no-bucket"),
    pytest.param({"model": {"uri": "s3://b/my model/"}}, "spec.model.uri", URI, id="model-space"),
    pytest.param({"model": {"uri": "hf://org/na\tme"}}, "spec.model.uri", URI, id="model-tab"),
    pytest.param({"dataset": {"train": ["file://data/t.jsonl"]}}, "spec.dataset.train[0]", RELATIVE, id="train-relative"),
    pytest.param({"dataset": {"train": ["s3:///t.jsonl"]}}, "spec.dataset.train[0]", DATA, id="train-no-bucket"),
    pytest.param({"dataset": {"train": ["s3://bucket/"]}}, "spec.dataset.train[0]", DATA, id="train-no-key"),
    pytest.param(
        {"dataset": {"train": ["s3://d/t.jsonl"], "eval": ["s3://d/e val.jsonl"]}},
        "spec.dataset.eval[0]",
        DATA,
        id="eval-space",
    ),
    pytest.param({"checkpoints": {"outputUri": "file://runs/x/"}}, "spec.checkpoints.outputUri", RELATIVE, id="output-relative"),
    pytest.param({"checkpoints": {"outputUri": "s3:///runs/"}}, "spec.checkpoints.outputUri", RUN, id="output-no-bucket"),
    pytest.param({"checkpoints": {"outputUri": "s3://b/run x/"}}, "spec.checkpoints.outputUri", RUN, id="output-space"),
    pytest.param({"storage": {"runsUri": "file://runs/"}}, "spec.storage.runsUri", RUN, id="runs-relative"),
    pytest.param({"storage": {"datasetsUri": "s3:// /d/"}}, "spec.storage.datasetsUri", RUN, id="datasets-space"),
    # revision
    pytest.param({"model": {"name": "pythia-70m", "revision": "../../etc"}}, "spec.model.revision", REVISION, id="revision-dotdot"),
    pytest.param({"model": {"name": "pythia-70m", "revision": "v1..2"}}, "spec.model.revision", REVISION, id="revision-inner-dotdot"),
    pytest.param({"model": {"name": "pythia-70m", "revision": "/abs"}}, "spec.model.revision", REVISION, id="revision-absolute"),
    # endpoint credentials
    pytest.param({"storage": {"endpoint": "https://KEY:SECRET@s3.example/"}}, "spec.storage.endpoint", ENDPOINT, id="endpoint-userinfo"),
    pytest.param({"storage": {"endpoint": "http://user@minio:9000"}}, "spec.storage.endpoint", ENDPOINT, id="endpoint-user"),
    pytest.param({"storage": {"endpoint": "http://minio:9000/ x"}}, "spec.storage.endpoint", ENDPOINT, id="endpoint-space"),
    # nodeSelector, tolerations, image
    pytest.param({"resources": {"nodeSelector": {"gpu type": "a100"}}}, "spec.resources.nodeSelector", LABEL_KEY, id="node-selector-key-space"),
    pytest.param({"resources": {"nodeSelector": {"-gpu": "a100"}}}, "spec.resources.nodeSelector", LABEL_KEY, id="node-selector-key-dash"),
    pytest.param({"resources": {"nodeSelector": {"Example.COM/gpu": "a"}}}, "spec.resources.nodeSelector", LABEL_KEY, id="node-selector-prefix-upper"),
    pytest.param({"resources": {"nodeSelector": {"gpu": "a100 "}}}, "spec.resources.nodeSelector.gpu", LABEL_VALUE, id="node-selector-value-space"),
    pytest.param({"resources": {"nodeSelector": {"gpu": "a" * 64}}}, "spec.resources.nodeSelector.gpu", "at most 63", id="node-selector-value-long"),
    pytest.param(
        {"resources": {"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]}},
        "spec.resources.tolerations[0]",
        "tolerationSeconds is only allowed with effect NoExecute",
        id="toleration-seconds-no-schedule",
    ),
    pytest.param(
        {"resources": {"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]}},
        "spec.resources.tolerations[0]",
        "tolerationSeconds is only allowed with effect NoExecute",
        id="toleration-seconds-no-effect",
    ),
    pytest.param(
        {"resources": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}},
        "spec.resources.tolerations[0].key",
        LABEL_KEY,
        id="toleration-key",
    ),
    pytest.param(
        {"resources": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        "spec.resources.tolerations[0]",
        "a toleration without key must have operator Exists",
        id="toleration-no-key-equal",
    ),
    pytest.param(
        {"resources": {"tolerations": [{"key": "gpu", "value": "a b"}]}},
        "spec.resources.tolerations[0].value",
        LABEL_VALUE,
        id="toleration-value",
    ),
    pytest.param(
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}},
        "spec.resources.tolerations[0]",
        "value must be empty when operator is Exists",
        id="toleration-exists-value",
    ),
    pytest.param({"resources": {"image": " trainer:1"}}, "spec.resources.image", "without spaces", id="image-leading-space"),
    pytest.param({"resources": {"image": "trainer:1\n"}}, "spec.resources.image", "without spaces", id="image-newline"),
    pytest.param({"resources": {"image": "my trainer"}}, "spec.resources.image", "without spaces", id="image-inner-space"),
    # uniqueness
    pytest.param(
        {"evaluation": {"baselines": [{"name": "gpt-j-6b"}, {"name": "gpt-j-6b"}]}},
        "spec.evaluation",
        "'gpt-j-6b' is listed twice",
        id="baselines-twice-by-name",
    ),
    pytest.param(
        {"evaluation": {"baselines": [{"uri": "s3://m/a/"}, {"name": "gpt-j-6b"}, {"uri": "s3://m/a/"}]}},
        "spec.evaluation",
        "is listed twice",
        id="baselines-twice-by-uri",
    ),
    pytest.param(
        {"evaluation": {"baselines": [{"name": "pythia-70m"}]}},
        "spec.evaluation.baselines[0]",
        "'pythia-70m' is the model being trained",
        id="baseline-is-the-model",
    ),
    pytest.param(
        {"model": {"uri": "s3://m/x/"}, "evaluation": {"baselines": [{"name": "gpt-j-6b"}, {"uri": "s3://m/x/"}]}},
        "spec.evaluation.baselines[1]",
        "is the model being trained",
        id="baseline-is-the-model-uri",
    ),
    pytest.param(
        {"dataset": {"train": ["s3://d/a.jsonl", "s3://d/b.jsonl", "s3://d/a.jsonl"]}},
        "spec.dataset.train",
        "duplicate entry 's3://d/a.jsonl'",
        id="train-twice",
    ),
    pytest.param(
        {"dataset": {"train": ["s3://d/a.jsonl"], "eval": ["s3://d/e.jsonl", "s3://d/e.jsonl"]}},
        "spec.dataset.eval",
        "duplicate entry",
        id="eval-twice",
    ),
    pytest.param(
        {"lora": {"targetModules": ["q_proj", "v_proj", "q_proj"]}},
        "spec.lora.targetModules",
        "duplicate entry 'q_proj'",
        id="lora-modules-twice",
    ),
    # mode Evaluate refuses what only training uses
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": {"learningRate": 0.001}},
        "spec.hyperparameters.learningRate",
        EVALUATE_ONLY,
        id="evaluate-learning-rate",
    ),
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": {"warmupSteps": 10}},
        "spec.hyperparameters.warmupSteps",
        EVALUATE_ONLY,
        id="evaluate-warmup",
    ),
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": {"lrScheduler": "cosine"}},
        "spec.hyperparameters.lrScheduler",
        EVALUATE_ONLY + " (default linear)",
        id="evaluate-scheduler",
    ),
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": {"gradientCheckpointing": True}},
        "spec.hyperparameters.gradientCheckpointing",
        EVALUATE_ONLY + " (default false)",
        id="evaluate-gradient-checkpointing",
    ),
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": None, "checkpoints": {"everySteps": 5}},
        "spec.checkpoints.everySteps",
        EVALUATE_ONLY,
        id="evaluate-checkpoint-cadence",
    ),
]


@pytest.mark.parametrize(("overrides", "field", "message"), GAPS)
def test_validation_gaps_are_closed(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec(**overrides))
    matching = [e for e in info.value.errors if e.startswith(f"{field}: ")]
    assert matching, f"no error names {field}: {info.value.errors}"
    assert any(message in e for e in matching), matching


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"model": {"uri": "file:///models/pythia/"}}, id="file-absolute"),
        pytest.param({"model": {"uri": "s3://models/pythia-70m"}}, id="s3-bucket-key"),
        pytest.param({"model": {"uri": "s3://models"}}, id="s3-bucket-root"),
        pytest.param({"model": {"uri": "hf://EleutherAI/pythia-70m", "revision": "step.1000/v1.0"}}, id="revision-dots"),
        pytest.param({"dataset": {"train": ["s3://d/a/**/*.jsonl", "file:///data/b.jsonl"]}}, id="globs"),
        pytest.param({"storage": {"endpoint": "http://127.0.0.1:9000", "runsUri": "s3://runs/"}}, id="endpoint-port"),
        pytest.param({"storage": {"endpoint": "https://s3.example/path@v2"}}, id="endpoint-at-in-path"),
        pytest.param(
            {"resources": {"nodeSelector": {"kubernetes.io/arch": "amd64", "gpu": ""}, "image": "reg:5000/t@sha256:ab"}},
            id="labels-and-image",
        ),
        pytest.param(
            {"resources": {"tolerations": [{"operator": "Exists"}, {"key": "x", "effect": "NoExecute", "tolerationSeconds": 9}]}},
            id="tolerations",
        ),
        pytest.param(
            {"model": {"name": "pythia-70m", "init": "scratch"}, "evaluation": {"baselines": [{"name": "pythia-70m"}]}},
            id="scratch-vs-pretrained-same-model",
        ),
        pytest.param(
            {"model": {"name": "pythia-70m", "revision": "main"}, "evaluation": {"baselines": [{"name": "pythia-70m"}]}},
            id="baseline-other-revision",
        ),
        pytest.param(
            {"mode": "Evaluate", "hyperparameters": {"learningRate": 5e-5, "batchSize": 4}},
            id="evaluate-default-values-written-out",
        ),
    ],
)
def test_close_but_valid_specs_pass(overrides: dict[str, Any]) -> None:
    parse_spec(spec(**overrides))
