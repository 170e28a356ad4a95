"""The CRD is generated from the typed models, checked in up to date, and structural."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from finetune_operator import api, crdgen
from finetune_trainer import config as trainer_config


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_equals_generated() -> None:
    assert crdgen.CRD_PATH.read_text(encoding="utf-8") == crdgen.render(), (
        "crds/ is stale: run python -m finetune_operator.crdgen --write"
    )


def test_checked_in_field_reference_equals_generated() -> None:
    assert crdgen.REFERENCE_PATH.read_text(encoding="utf-8") == crdgen.render_reference(), (
        "docs/api-reference.md is stale: run python -m finetune_operator.crdgen --write"
    )


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        assert "type" in node, f"{path or '<root>'} has no type"
        forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "title", "$defs", "propertyNames"} & set(node)
        assert not forbidden, f"{path}: {forbidden}"
        assert set(node) <= crdgen.STRUCTURAL_KEYS, f"{path}: {set(node) - crdgen.STRUCTURAL_KEYS}"
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_names_and_subresources(crd: dict[str, Any]) -> None:
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert (names["kind"], names["shortNames"], names["categories"]) == (
        "FineTuneJob",
        ["ftj"],
        ["all", "finetune"],
    )
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns(crd: dict[str, Any]) -> None:
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Model": ".status.model",
        "Step": ".status.progress.steps",
        "Eval-Loss": ".status.latestEvaluation.loss",
        "Accuracy": ".status.latestEvaluation.accuracy",
        "Age": ".metadata.creationTimestamp",
        "Message": ".status.message",
    }


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(
            ".spec.hyperparameters.dropout",
            {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.0},
            id="dropout-range-default",
        ),
        pytest.param(
            ".spec.hyperparameters.learningRate",
            {"minimum": 0.0, "exclusiveMinimum": True, "default": 5e-05},
            id="lr-exclusive-minimum",
        ),
        pytest.param(
            ".spec.hyperparameters.precision",
            {"enum": ["fp32", "bf16", "fp16"], "default": "fp32"},
            id="precision-enum",
        ),
        pytest.param(
            ".spec.model.init", {"enum": ["pretrained", "scratch"], "default": "pretrained"}, id="init-enum"
        ),
        pytest.param(
            ".spec.dataset.format", {"enum": ["text", "prompt-completion", "chat"]}, id="format-enum"
        ),
        pytest.param(".spec.resources.nodes", {"type": "integer", "minimum": 1, "default": 1}, id="nodes"),
        pytest.param(
            ".spec.runPolicy.terminationGracePeriodSeconds", {"minimum": 30, "default": 300}, id="grace"
        ),
        pytest.param(
            ".spec.resources",
            {"type": "object", "default": {"nodes": 1, "processesPerNode": 1, "gpus": 0}},
            id="section-defaults-written-out",
        ),
        pytest.param(".spec.suspend", {"type": "boolean", "default": False}, id="suspend"),
        pytest.param(
            ".spec.mode",
            {"type": "string", "enum": ["Train", "Evaluate"], "default": "Train"},
            id="mode-enum",
        ),
        pytest.param(".status.phase", {"enum": [p.value for p in api.Phase]}, id="phase-enum"),
    ],
)
def test_field_schema(schema: dict[str, Any], path: str, expected: dict[str, Any]) -> None:
    node = schema
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    assert {key: node.get(key) for key in expected} == expected


def test_required_fields(schema: dict[str, Any]) -> None:
    assert schema["required"] == ["spec"]
    assert schema["properties"]["spec"]["required"] == ["model", "dataset"]
    assert "lora" not in schema["properties"]["spec"]["properties"]["lora"].get("default", {})


def test_every_field_is_described(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    for path, node in _walk(spec, ".spec"):
        if path.endswith(("[]", "{}")):
            continue
        assert node.get("description"), f"{path} has no description"


def _cel_in_docstrings(model: type[BaseModel]) -> list[str]:
    rules = []
    for name in dir(model):
        doc = getattr(getattr(model, name, None), "__doc__", None) or ""
        if name.startswith("_") and "CEL:" in doc and "rendered config only" not in doc:
            text = " ".join(doc.split("CEL:", 1)[1].split())
            rules.extend(rule.strip() for rule in text.split(";") if rule.strip())
    return rules


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(trainer_config.ModelSpec, id="model"),
        pytest.param(trainer_config.DatasetSpec, id="dataset"),
        pytest.param(trainer_config.Hyperparameters, id="hyperparameters"),
    ],
)
def test_trainer_validators_are_mirrored_in_cel(model: type[BaseModel]) -> None:
    """Each trainer model_validator's documented CEL rule is in the CRD (one source of truth)."""
    documented = _cel_in_docstrings(model)
    assert documented, f"{model.__name__} documents no CEL rule"
    generated = [rule["rule"] for rule in crdgen.CEL_RULES[model]]
    for rule in documented:
        assert rule in generated, f"{model.__name__}: {rule!r} missing from crdgen.CEL_RULES"


def test_one_process_per_gpu_is_a_cel_rule_naming_the_field(schema: dict[str, Any]) -> None:
    """api.ResourcesSpec's validator and the CRD's rule on spec.resources say the same."""
    doc = api.ResourcesSpec._one_process_per_gpu.__doc__ or ""
    rule = doc.split("CEL:", 1)[1].strip()
    resources = schema["properties"]["spec"]["properties"]["resources"]
    [generated] = [r for r in resources["x-kubernetes-validations"] if r["rule"] == rule]
    assert generated["fieldPath"] == ".processesPerNode"


def test_mode_rules_are_mirrored_in_cel() -> None:
    """TrainerConfig's mode rules (`mode_errors`) are spec-level CEL rules, each naming its field."""
    doc = trainer_config.TrainerConfig._mode.__doc__ or ""
    documented = [r.strip() for r in " ".join(doc.split("):", 1)[1].split()).split(";") if r.strip()]
    assert len(documented) == 5
    generated = {rule["rule"]: rule for rule in crdgen.CEL_RULES[api.FineTuneJobSpec]}
    for rule in documented:
        assert rule in generated, f"{rule!r} missing from crdgen.CEL_RULES[FineTuneJobSpec]"
        assert generated[rule].get("fieldPath"), f"{rule!r} names no field"


def test_cel_rules_on_every_occurrence(schema: dict[str, Any]) -> None:
    """ModelSpec's rule applies to spec.model and to each baseline."""
    spec = schema["properties"]["spec"]["properties"]
    model_rule = crdgen.CEL_RULES[trainer_config.ModelSpec]
    assert spec["model"]["x-kubernetes-validations"] == model_rule
    assert spec["evaluation"]["properties"]["baselines"]["items"]["x-kubernetes-validations"] == model_rule


def test_root_rules_name_and_immutability(schema: dict[str, Any]) -> None:
    rules = schema["x-kubernetes-validations"]
    assert "self.metadata.name" in rules[0]["rule"] and rules[0]["fieldPath"] == ".metadata.name"
    immutable = {r["fieldPath"]: r["rule"] for r in rules[1:]}
    frozen = crdgen.IMMUTABLE_ONCE_STARTED + crdgen.IMMUTABLE_ONCE_JOB_EXISTS
    assert list(immutable) == [f".spec.{s}" for s in frozen]
    for path in crdgen.IMMUTABLE_ONCE_STARTED:
        assert "oldSelf.status.startTime" in immutable[f".spec.{path}"]
    for path in crdgen.IMMUTABLE_ONCE_JOB_EXISTS:
        assert "oldSelf.status.jobName" in immutable[f".spec.{path}"]
    assert {".spec.storage", ".spec.checkpoints.outputUri", ".spec.resources", ".spec.runPolicy"} <= set(
        immutable
    )


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        pytest.param("demo", True, id="simple"),
        pytest.param("a" * api.JOB_NAME_MAX_LENGTH, True, id="longest"),
        pytest.param("a" * (api.JOB_NAME_MAX_LENGTH + 1), False, id="too-long"),
        pytest.param("1abc", False, id="starts-with-digit"),
        pytest.param("a.b", False, id="dot"),
    ],
)
def test_job_name_pattern(name: str, valid: bool) -> None:
    ok = len(name) <= api.JOB_NAME_MAX_LENGTH and re.fullmatch(api.JOB_NAME_PATTERN, name) is not None
    assert ok is valid


def test_rendered_yaml_has_no_aliases() -> None:
    text = crdgen.render()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == crdgen.crd()


def test_check_mode_reports_stale(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("old", encoding="utf-8")
    monkeypatch.setattr(crdgen, "CRD_PATH", stale)
    monkeypatch.setattr(crdgen, "REFERENCE_PATH", tmp_path / "reference.md")
    assert crdgen.main(["--check"]) == 1
    assert crdgen.main(["--write"]) == 0
    assert crdgen.main(["--check"]) == 0
