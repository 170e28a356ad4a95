"""The configuration contract: parsing, camelCase wire form, constraints, CLI field listing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune_trainer import contract
from finetune_trainer.config import (
    CheckpointSpec,
    DatasetSpec,
    EvaluationSpec,
    Hyperparameters,
    LoraSpec,
    ModelSpec,
    TrainerConfig,
    describe_fields,
)

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "model": {"name": "pythia-70m"},
    "dataset": {"train": ["s3://bucket/data/*.jsonl"]},
    "run": {"uri": "s3://bucket/runs/ns/job/"},
}


def test_minimal_config_gets_documented_defaults() -> None:
    config = TrainerConfig.from_dict(MINIMAL)
    assert config.hyperparameters.dropout == 0.0
    assert config.evaluation.at_start is True
    assert config.lora is None
    assert config.run_uri == "s3://bucket/runs/ns/job/"


def test_round_trip_through_yaml_uses_camel_case() -> None:
    config = TrainerConfig.from_dict({**MINIMAL, "hyperparameters": {"maxSteps": 10, "microBatchSize": 2}})
    text = config.to_yaml()
    assert "maxSteps: 10" in text and "microBatchSize: 2" in text and "max_steps" not in text
    assert TrainerConfig.from_yaml(text) == config


def test_snake_case_names_are_accepted_in_python() -> None:
    assert Hyperparameters(max_steps=5).max_steps == 5


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        pytest.param({"hyperparameters": {"dropout": 1.5}}, "hyperparameters.dropout", id="dropout-range"),
        pytest.param(
            {"hyperparameters": {"learningRate": 0}}, "hyperparameters.learningRate", id="lr-positive"
        ),
        pytest.param(
            {"hyperparameters": {"precision": "fp8"}}, "hyperparameters.precision", id="precision-enum"
        ),
        pytest.param({"hyperparameters": {"maxStep": 3}}, "hyperparameters.maxStep", id="unknown-field"),
        pytest.param(
            {"hyperparameters": {"maxSteps": 3, "epochs": 1}}, "hyperparameters", id="steps-xor-epochs"
        ),
        pytest.param(
            {"hyperparameters": {"batchSize": 6, "microBatchSize": 4}}, "hyperparameters", id="micro-divides"
        ),
        pytest.param(
            {"hyperparameters": {"warmupSteps": 3, "warmupRatio": 0.1}}, "hyperparameters", id="warmup-xor"
        ),
        pytest.param({"model": {"name": "x", "uri": "file:///m"}}, "model", id="name-xor-uri"),
        pytest.param({"model": {"uri": "ftp://m"}}, "model.uri", id="uri-scheme"),
        pytest.param({"dataset": {"format": "text"}}, "dataset", id="train-required"),
        pytest.param(
            {"dataset": {"train": ["file:///d"], "format": "csv"}}, "dataset.format", id="format-enum"
        ),
        pytest.param({"lora": {"rank": 0}}, "lora.rank", id="lora-rank"),
        pytest.param({"run": {}}, "", id="no-run-folder"),
        pytest.param({"mode": "Eval"}, "mode", id="mode-enum"),
        pytest.param({"dataset": {"eval": ["file:///e.jsonl"]}}, "", id="train-mode-needs-train"),
        pytest.param(
            {"mode": "Evaluate", "hyperparameters": {"maxSteps": 3}}, "", id="evaluate-no-max-steps"
        ),
    ],
)
def test_invalid_configs_name_the_field(patch: dict[str, object], field: str) -> None:
    data = {**MINIMAL, **patch}
    with pytest.raises(ValidationError) as info:
        TrainerConfig.from_dict(data)
    locations = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert field in locations, locations


def test_evaluate_mode_config_names_every_misfit_field() -> None:
    data = {
        **MINIMAL,
        "mode": "Evaluate",
        "hyperparameters": {"epochs": 1},
        "lora": {},
        "evaluation": {"atStart": False},
    }
    with pytest.raises(ValidationError) as info:
        TrainerConfig.from_dict(data)
    text = str(info.value)
    for fragment in (
        "lora: not allowed in mode Evaluate",
        "hyperparameters.epochs: not allowed in mode Evaluate",
        "evaluation.atStart: must be true in mode Evaluate",
    ):
        assert fragment in text


def test_evaluate_mode_needs_only_eval_files() -> None:
    config = TrainerConfig.from_dict(
        {**MINIMAL, "mode": "Evaluate", "dataset": {"eval": ["file:///e.jsonl"]}}
    )
    assert (config.mode, config.dataset.train) == ("Evaluate", None)


def test_describe_fields_prints_type_range_default() -> None:
    rows = {r.name: r for r in describe_fields(Hyperparameters)}
    assert rows["dropout"][:4] == ("dropout", "float", "[0.0, 1.0]", "0.0")
    assert rows["precision"].range == "fp32 | bf16 | fp16"
    assert rows["learningRate"].range.startswith("(0.0,")
    for model in (ModelSpec, DatasetSpec, Hyperparameters, LoraSpec, EvaluationSpec, CheckpointSpec):
        for row in describe_fields(model):
            assert row.description, f"{model.__name__}.{row.name} has no description"


def test_json_schema_uses_only_openapi_expressible_constraints() -> None:
    allowed = {
        "type",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "enum",
        "const",
        "pattern",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "items",
        "anyOf",
        "default",
        "description",
        "title",
        "properties",
        "additionalProperties",
        "required",
        "$ref",
        "$defs",
        "x-kubernetes-list-type",  # a list without duplicates (the Python side: _no_duplicates)
    }
    schema = TrainerConfig.model_json_schema(by_alias=True)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for child in value.values():
                        walk(child)
                    continue
                assert key in allowed, key
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)


def test_config_contract_imports_without_torch_or_kopf() -> None:
    code = (
        "import sys, finetune_trainer.config, finetune_trainer.contract, finetune_trainer.catalog;"
        "print(sorted(m for m in ('torch', 'transformers', 'kopf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_termination_message_fits_4096_bytes() -> None:
    evaluation = contract.EvaluationPoint(step=1, loss=1.0, accuracy=0.5, perplexity=2.7)
    summary = contract.TerminationSummary(
        phase="Failed",
        exitCode=1,
        reason="Error",
        message="x" * 10000,
        step=3,
        totalSteps=10,
        runUri="s3://b/r/",
        evaluations=[{**evaluation, "step": i} for i in range(200)],  # type: ignore[typeddict-item]
    )
    text = contract.encode_termination_message(summary)
    assert len(text.encode()) <= contract.TERMINATION_MESSAGE_MAX_BYTES
    decoded = json.loads(text)
    assert decoded["evaluations"][0]["step"] == 0 and decoded["evaluations"][-1]["step"] == 199


def _checkpoint(step: int) -> contract.CheckpointRecord:
    return contract.CheckpointRecord(
        step=step,
        uri=f"s3://bucket/runs/team/job/checkpoints/step-{step:06d}/",
        time="2026-11-29T06:00:00Z",
        metrics={"trainLoss": 2.0, "evalLoss": 2.1, "evalAccuracy": 0.5, "evalPerplexity": 8.2},
    )


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        pytest.param(3, "complete", id="few-fit-whole"),
        pytest.param(25, "step-and-uri", id="many-lose-metrics-and-times"),
        pytest.param(60, "absent", id="too-many-left-out-never-cut"),
    ],
)
def test_termination_message_keeps_the_checkpoint_list_whole_or_leaves_it_out(
    count: int, expected: str
) -> None:
    """A checkpoint missing from the list would read as deleted by keepLast: the list shrinks to
    steps and URIs, or goes away as a whole."""
    summary = contract.TerminationSummary(
        phase="Succeeded",
        exitCode=0,
        reason="Completed",
        message="trained",
        step=count,
        totalSteps=count,
        runUri="s3://bucket/runs/team/job/",
        checkpoints=[_checkpoint(i + 1) for i in range(count)],
    )
    decoded = json.loads(contract.encode_termination_message(summary))
    if expected == "absent":
        assert "checkpoints" not in decoded
        return
    assert [c["step"] for c in decoded["checkpoints"]] == list(range(1, count + 1))
    assert all(c["uri"].endswith(f"step-{c['step']:06d}/") for c in decoded["checkpoints"])
    assert all(("metrics" in c) == (expected == "complete") for c in decoded["checkpoints"])


def test_bind_address_and_port_from_env() -> None:
    assert contract.bind_address({"POD_IP": "127.0.0.7"}) == "127.0.0.7"
    assert contract.bind_address({}) == "0.0.0.0"
    assert contract.progress_port({}) == 9090
    assert contract.config_path({}) == "/etc/finetune/config.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "trainer" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_trainer_config_parses(path: Path) -> None:
    TrainerConfig.from_file(path)
