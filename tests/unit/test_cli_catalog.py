"""The CLI's model catalog, memory estimates and hyper-parameter reference (pure)."""

from __future__ import annotations

import pytest

from finetune_cli import catalog
from finetune_trainer.catalog import CATALOG
from finetune_trainer.config import Hyperparameters


@pytest.mark.parametrize(
    ("size", "count"),
    [
        pytest.param("70M", 70e6, id="millions"),
        pytest.param("1.4B", 1.4e9, id="fractional-billions"),
        pytest.param("6b", 6e9, id="lower-case"),
        pytest.param("20B", 20e9, id="gpt-neox"),
    ],
)
def test_parameter_count_reads_catalog_sizes(size: str, count: float) -> None:
    assert catalog.parameter_count(size) == pytest.approx(count)


@pytest.mark.parametrize(
    "size", [pytest.param("", id="empty"), pytest.param("big", id="word"), pytest.param("1.4", id="no-unit")]
)
def test_parameter_count_rejects_other_text(size: str) -> None:
    with pytest.raises(ValueError, match="not a model size"):
        catalog.parameter_count(size)


@pytest.mark.parametrize(
    ("precision", "lora_bytes_per_param"),
    [pytest.param("bf16", 2 + 0.16, id="bf16"), pytest.param("fp32", 4 + 0.16, id="fp32")],
)
def test_memory_estimate_full_is_16_bytes_per_parameter_and_lora_far_less(
    precision: str, lora_bytes_per_param: float
) -> None:
    estimate = catalog.memory_estimate(1e9, precision=precision)
    assert estimate.full_gib == pytest.approx(16e9 / 1024**3)
    assert estimate.lora_gib == pytest.approx(lora_bytes_per_param * 1e9 / 1024**3)
    assert estimate.lora_gib < estimate.full_gib / 3


def test_memory_estimate_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        catalog.memory_estimate(1e9, precision="int4")


def test_model_rows_cover_every_catalog_entry() -> None:
    rows = catalog.model_rows()
    assert {r.name for r in rows} == set(CATALOG)
    gptj = next(r for r in rows if r.name == "gpt-j-6b")
    assert (gptj.architecture, gptj.family, gptj.parameters) == ("gptj", "GPT-J", "6B")
    assert gptj.full_finetune_gib == pytest.approx(89.4, abs=0.1)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        pytest.param("pythia", 8, id="pythia-by-prefix"),
        pytest.param("cerebras", 7, id="cerebras-by-prefix"),
        pytest.param("codegen", 12, id="codegen-nl-multi-mono"),
        pytest.param("gpt_neox", 9, id="by-architecture"),
    ],
)
def test_model_rows_filter_by_family(family: str, expected: int) -> None:
    assert len(catalog.model_rows(family=family)) == expected


def test_model_rows_are_sorted_by_size_within_a_family() -> None:
    sizes = [r.parameters for r in catalog.model_rows(family="pythia")]
    assert sizes == ["70M", "160M", "410M", "1B", "1.4B", "2.8B", "6.9B", "12B"]


def test_field_rows_list_every_hyperparameter_from_the_trainer_model() -> None:
    rows = {r.name: r for r in catalog.field_rows(["hyperparameters"])}
    assert set(rows) == {f.alias for f in Hyperparameters.model_fields.values()}
    assert rows["dropout"].type == "float"
    assert rows["dropout"].range == "[0.0, 1.0]"
    assert rows["dropout"].default == "0.0"
    assert rows["dropout"].required is False
    assert rows["lrScheduler"].range == "constant | linear | cosine"


def test_field_rows_cover_every_section_with_descriptions() -> None:
    rows = catalog.field_rows(list(catalog.SECTIONS))
    assert {r.section for r in rows} == set(catalog.SECTIONS)
    assert all(r.description for r in rows)


def test_field_rows_reject_unknown_section() -> None:
    with pytest.raises(ValueError, match="unknown section 'optimizer'"):
        catalog.field_rows(["optimizer"])
