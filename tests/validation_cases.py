"""Validation cases shared by the unit tests (Python validation, tests/unit/test_operator_api.py)
and the integration tests (the real API server with the generated CRD,
tests/integration/test_operator_validation.py): both layers must refuse each of `GAPS`, naming
the field, and accept each of `CLOSE_BUT_VALID`. Holds no tests.
"""

from __future__ import annotations

import pytest

URI = "must be s3://<bucket>/<path>, file:///<absolute path> or hf://<org>/<name>"
DATA = "must be s3://<bucket>/<key> or file:///<absolute path>"
RUN = "must be a folder ending in /: s3://<bucket>/<prefix>/ or file:///<absolute path>/"
ENDPOINT = "without user:password@ (credentials belong in the Secret of storage.credentialsSecret)"
REVISION = "no '..'"
LABEL_KEY = "must be a label key"
LABEL_VALUE = "must be empty or a label value"
RELATIVE = "file:// paths must be absolute (file:///<path>)"
EVALUATE_ONLY = "is only used for training: in mode Evaluate leave it unset"

TYPE = "must be of type"

GAPS = [
    # values of another type: refused as the schema types them, never converted ("10" -> 10)
    pytest.param(
        {"hyperparameters": {"maxSteps": "10"}},
        "spec.hyperparameters.maxSteps",
        f"{TYPE} integer",
        id="max-steps-string",
    ),
    pytest.param(
        {"hyperparameters": {"maxSteps": True}},
        "spec.hyperparameters.maxSteps",
        f"{TYPE} integer",
        id="max-steps-boolean",
    ),
    pytest.param(
        {"hyperparameters": {"learningRate": "1e-4"}},
        "spec.hyperparameters.learningRate",
        f"{TYPE} number",
        id="learning-rate-string",
    ),
    pytest.param({"suspend": "yes"}, "spec.suspend", f"{TYPE} boolean", id="suspend-string"),
    pytest.param({"model": {"name": 7}}, "spec.model.name", f"{TYPE} string", id="model-name-number"),
    # URIs: absolute file://, a bucket for s3://, no whitespace
    pytest.param(
        {"model": {"uri": "file://relative/model"}}, "spec.model.uri", RELATIVE, id="model-file-relative"
    ),
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
    pytest.param(
        {"dataset": {"train": ["file://data/t.jsonl"]}},
        "spec.dataset.train[0]",
        RELATIVE,
        id="train-relative",
    ),
    pytest.param(
        {"dataset": {"train": ["s3:///t.jsonl"]}}, "spec.dataset.train[0]", DATA, id="train-no-bucket"
    ),
    pytest.param({"dataset": {"train": ["s3://bucket/"]}}, "spec.dataset.train[0]", DATA, id="train-no-key"),
    pytest.param(
        {"dataset": {"train": ["s3://d/t.jsonl"], "eval": ["s3://d/e val.jsonl"]}},
        "spec.dataset.eval[0]",
        DATA,
        id="eval-space",
    ),
    pytest.param(
        {"checkpoints": {"outputUri": "file://runs/x/"}},
        "spec.checkpoints.outputUri",
        RELATIVE,
        id="output-relative",
    ),
    pytest.param(
        {"checkpoints": {"outputUri": "s3:///runs/"}},
        "spec.checkpoints.outputUri",
        RUN,
        id="output-no-bucket",
    ),
    pytest.param(
        {"checkpoints": {"outputUri": "s3://b/run x/"}}, "spec.checkpoints.outputUri", RUN, id="output-space"
    ),
    pytest.param({"storage": {"runsUri": "file://runs/"}}, "spec.storage.runsUri", RUN, id="runs-relative"),
    pytest.param(
        {"storage": {"datasetsUri": "s3:// /d/"}}, "spec.storage.datasetsUri", RUN, id="datasets-space"
    ),
    # revision
    pytest.param(
        {"model": {"name": "pythia-70m", "revision": "../../etc"}},
        "spec.model.revision",
        REVISION,
        id="revision-dotdot",
    ),
    pytest.param(
        {"model": {"name": "pythia-70m", "revision": "v1..2"}},
        "spec.model.revision",
        REVISION,
        id="revision-inner-dotdot",
    ),
    pytest.param(
        {"model": {"name": "pythia-70m", "revision": "/abs"}},
        "spec.model.revision",
        REVISION,
        id="revision-absolute",
    ),
    # endpoint credentials
    pytest.param(
        {"storage": {"endpoint": "https://KEY:SECRET@s3.example/"}},
        "spec.storage.endpoint",
        ENDPOINT,
        id="endpoint-userinfo",
    ),
    pytest.param(
        {"storage": {"endpoint": "http://user@minio:9000"}},
        "spec.storage.endpoint",
        ENDPOINT,
        id="endpoint-user",
    ),
    pytest.param(
        {"storage": {"endpoint": "http://minio:9000/ x"}},
        "spec.storage.endpoint",
        ENDPOINT,
        id="endpoint-space",
    ),
    # nodeSelector, tolerations, image
    pytest.param(
        {"resources": {"nodeSelector": {"gpu type": "a100"}}},
        "spec.resources.nodeSelector",
        LABEL_KEY,
        id="node-selector-key-space",
    ),
    pytest.param(
        {"resources": {"nodeSelector": {"-gpu": "a100"}}},
        "spec.resources.nodeSelector",
        LABEL_KEY,
        id="node-selector-key-dash",
    ),
    pytest.param(
        {"resources": {"nodeSelector": {"Example.COM/gpu": "a"}}},
        "spec.resources.nodeSelector",
        LABEL_KEY,
        id="node-selector-prefix-upper",
    ),
    pytest.param(
        {"resources": {"nodeSelector": {"gpu": "a100 "}}},
        "spec.resources.nodeSelector.gpu",
        LABEL_VALUE,
        id="node-selector-value-space",
    ),
    pytest.param(
        {"resources": {"nodeSelector": {"gpu": "a" * 64}}},
        "spec.resources.nodeSelector.gpu",
        "at most 63",
        id="node-selector-value-long",
    ),
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
    pytest.param(
        {"resources": {"image": " trainer:1"}},
        "spec.resources.image",
        "without spaces",
        id="image-leading-space",
    ),
    pytest.param(
        {"resources": {"image": "trainer:1\n"}}, "spec.resources.image", "without spaces", id="image-newline"
    ),
    pytest.param(
        {"resources": {"image": "my trainer"}},
        "spec.resources.image",
        "without spaces",
        id="image-inner-space",
    ),
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
        {
            "model": {"uri": "s3://m/x/"},
            "evaluation": {"baselines": [{"name": "gpt-j-6b"}, {"uri": "s3://m/x/"}]},
        },
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

# Specs next to a rule that must pass.
CLOSE_BUT_VALID = [
    # a float with no fraction for an integer field: the API server takes it (and stores 10)
    pytest.param({"hyperparameters": {"maxSteps": 10.0, "batchSize": 8.0}}, id="integral-float-for-integer"),
    pytest.param({"model": {"uri": "file:///models/pythia/"}}, id="file-absolute"),
    pytest.param({"model": {"uri": "s3://models/pythia-70m"}}, id="s3-bucket-key"),
    pytest.param({"model": {"uri": "s3://models"}}, id="s3-bucket-root"),
    pytest.param(
        {"model": {"uri": "hf://EleutherAI/pythia-70m", "revision": "step.1000/v1.0"}}, id="revision-dots"
    ),
    pytest.param({"dataset": {"train": ["s3://d/a/**/*.jsonl", "file:///data/b.jsonl"]}}, id="globs"),
    pytest.param(
        {"storage": {"endpoint": "http://127.0.0.1:9000", "runsUri": "s3://runs/"}}, id="endpoint-port"
    ),
    pytest.param({"storage": {"endpoint": "https://s3.example/path@v2"}}, id="endpoint-at-in-path"),
    pytest.param(
        {
            "resources": {
                "nodeSelector": {"kubernetes.io/arch": "amd64", "gpu": ""},
                "image": "reg:5000/t@sha256:ab",
            }
        },
        id="labels-and-image",
    ),
    pytest.param(
        {
            "resources": {
                "tolerations": [
                    {"operator": "Exists"},
                    {"key": "x", "effect": "NoExecute", "tolerationSeconds": 9},
                ]
            }
        },
        id="tolerations",
    ),
    pytest.param(
        {
            "model": {"name": "pythia-70m", "init": "scratch"},
            "evaluation": {"baselines": [{"name": "pythia-70m"}]},
        },
        id="scratch-vs-pretrained-same-model",
    ),
    pytest.param(
        {
            "model": {"name": "pythia-70m", "revision": "main"},
            "evaluation": {"baselines": [{"name": "pythia-70m"}]},
        },
        id="baseline-other-revision",
    ),
    pytest.param(
        {"mode": "Evaluate", "hyperparameters": {"learningRate": 5e-5, "batchSize": 4}},
        id="evaluate-default-values-written-out",
    ),
]
