"""The CLI's model catalog, memory estimates and hyper-parameter reference (pure)."""

from __future__ import annotations

from typing import Any

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
    ("precision", "strategy", "processes", "full_bytes", "lora_bytes"),
    [
        pytest.param("bf16", "data-parallel", 8, 16, 2, id="data-parallel-keeps-all-on-every-process"),
        pytest.param("fp32", "data-parallel", 1, 16, 4, id="fp32-lora-base"),
        pytest.param("bf16", "fsdp", 8, 2, 2 / 8, id="fsdp-splits-over-8"),
        pytest.param("fp16", "fsdp", 2, 8, 2, id="fp16-keeps-an-fp32-base"),
    ],
)
def test_memory_estimate_is_per_process_for_the_strategy(
    precision: str, strategy: str, processes: int, full_bytes: float, lora_bytes: float
) -> None:
    """Bytes per parameter one process holds (16 for full AdamW fine-tuning, split by fsdp)."""
    estimate = catalog.memory_estimate("1B", precision=precision, strategy=strategy, processes=processes)
    assert estimate.full_gib == pytest.approx(full_bytes * 1e9 / 1024**3, rel=1e-6)
    assert estimate.lora_gib == pytest.approx(lora_bytes * 1e9 / 1024**3, rel=1e-6)


def test_memory_estimate_is_the_trainers() -> None:
    """One home for the rule: the CLI prints what finetune_trainer.memory (which the trainer logs
    and checks against its tensors) says."""
    from finetune_trainer import memory

    trainer = memory.catalog_estimate("6B", strategy="fsdp", world_size=4, precision="bf16", lora=False)
    assert catalog.memory_estimate("6B", strategy="fsdp", processes=4).full_gib == trainer.state / 1024**3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"precision": "int4"}, "precision must be one of bf16, fp16, fp32", id="precision"),
        pytest.param({"strategy": "zero3"}, "sharding must be one of data-parallel, fsdp", id="sharding"),
        pytest.param({"processes": 0}, "processes must be at least 1", id="processes"),
    ],
)
def test_memory_estimate_rejects_what_the_trainer_does_not_know(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        catalog.memory_estimate("1B", **kwargs)


def test_model_rows_cover_every_catalog_entry() -> None:
    rows = catalog.model_rows()
    assert {r.name for r in rows} == set(CATALOG)
    gptj = next(r for r in rows if r.name == "gpt-j-6b")
    assert (gptj.architecture, gptj.family, gptj.parameters) == ("gptj", "GPT-J", "6B")
    assert gptj.full_finetune_gib == pytest.approx(89.4, abs=0.1), (
        "data parallel: all 16 bytes on every process"
    )
    sharded = next(r for r in catalog.model_rows(strategy="fsdp", processes=8) if r.name == "gpt-j-6b")
    assert sharded.full_finetune_gib == pytest.approx(11.2, abs=0.1), "fsdp over 8 processes: an eighth each"


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
