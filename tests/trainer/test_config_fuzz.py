"""Fuzzing the trainer's config parser (`cli.load_config`, what a pod runs first): any file —
a near-valid config, arbitrary YAML, text or bytes that are not UTF-8 — ends in a config or in
`InvalidInput` (exit code 3) whose every detail names a config field, or whose message says
where the YAML breaks; never another exception, never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_trainer.cli import load_config
from finetune_trainer.config import TrainerConfig
from finetune_trainer.errors import InvalidInput
from tests.strategies import specs

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECTIONS = ("mode", "model", "dataset", "hyperparameters", "lora", "evaluation", "checkpoints")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=12,
)


def _load(content: bytes) -> TrainerConfig | InvalidInput:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(content)
        try:
            return load_config(str(path))
        except InvalidInput as exc:
            return exc


def _assert_clear(result: TrainerConfig | InvalidInput, document: Any = None) -> None:
    if isinstance(result, TrainerConfig):
        return
    text = str(result)
    assert "Traceback" not in text
    if result.details:  # a schema error: one line per field
        for line in result.details:
            field, _, message = line.partition(": ")
            assert field and message, line
            if isinstance(document, dict) and field != "(config)":
                top = field.split(".")[0]
                known = {info.alias or name for name, info in TrainerConfig.model_fields.items()}
                assert top in document or top in known, f"{field} names neither the document nor the schema"
    else:
        assert text.startswith(("cannot read config", "invalid config", "config file")), text


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    config = {key: spec[key] for key in SECTIONS if key in spec}
    config["run"] = {"uri": "file:///tmp/run/"}
    return config


@FUZZ
@given(specs())
def test_near_valid_configs(spec: dict[str, Any]) -> None:
    document = _config(spec)
    _assert_clear(_load(yaml.safe_dump(document).encode()), document)


@FUZZ
@given(st.dictionaries(st.sampled_from([*SECTIONS, "run", "bogus"]), JSON, max_size=5))
def test_arbitrary_yaml_documents(document: dict[str, Any]) -> None:
    _assert_clear(_load(yaml.safe_dump(document).encode()), document)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes(content: bytes) -> None:
    _assert_clear(_load(content))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"model: {name: [\n", "line", id="yaml-syntax"),
        pytest.param(b"\xff\xfemodel: x\n", "utf-8", id="not-utf8"),
        pytest.param(b"[" * 5000 + b"]" * 5000, "cannot read config", id="deep-nesting"),
        pytest.param(b"- a\n- b\n", "invalid config", id="a-list"),
    ],
)
def test_unreadable_configs_say_where(content: bytes, fragment: str) -> None:
    result = _load(content)
    assert isinstance(result, InvalidInput) and fragment in str(result), result
