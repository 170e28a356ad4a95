"""The model catalog with memory estimates, and the hyper-parameter reference (pure).

Both are read from the trainer's own modules — `finetune_trainer.catalog.CATALOG` and the pydantic
models of `finetune_trainer.config` — so the CLI prints exactly what the trainer accepts. Called
by `main` for `list models` and `list hyperparameters`. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from finetune_trainer import memory
from finetune_trainer.catalog import CATALOG, CatalogModel
from finetune_trainer.config import (
    CheckpointSpec,
    DatasetSpec,
    EvaluationSpec,
    Hyperparameters,
    LoraSpec,
    ModelSpec,
    describe_fields,
)

GIB = 1024**3

# The trainer's precisions and sharding strategies (`hyperparameters.precision` / `.sharding`);
# the estimate itself is the trainer's (`finetune_trainer.memory`), the one home of its rules.
PRECISIONS = ("bf16", "fp16", "fp32")
STRATEGIES = ("data-parallel", "fsdp")

SECTIONS: dict[str, type[BaseModel]] = {
    "hyperparameters": Hyperparameters,
    "lora": LoraSpec,
    "evaluation": EvaluationSpec,
    "checkpoints": CheckpointSpec,
    "dataset": DatasetSpec,
    "model": ModelSpec,
}

_SIZE = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?)(?P<unit>[KMBT])$")
_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}

FAMILY_NAMES = {
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX",
    "codegen": "CodeGen",
    "gpt2": "GPT-2",
    "llama": "Llama",
}


def parameter_count(size: str) -> float:
    """'1.4B' -> 1.4e9, '70M' -> 7e7; ValueError for anything else."""
    match = _SIZE.match(size.strip().upper())
    if not match:
        raise ValueError(f"not a model size: {size!r} (expected e.g. 70M or 1.4B)")
    return float(match["number"]) * _UNITS[match["unit"]]


@dataclass(frozen=True)
class MemoryEstimate:
    full_gib: float
    lora_gib: float


def memory_estimate(
    parameters: str, *, precision: str = "bf16", strategy: str = "data-parallel", processes: int = 1
) -> MemoryEstimate:
    """Model state (weights, gradients, AdamW state) one training process holds, for full
    fine-tuning and for LoRA, as `finetune_trainer.memory.catalog_estimate` computes it for the
    trainer: data parallel keeps all of it on every process, fsdp splits it over `processes`.
    Activations are not included."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    full, lora = (
        memory.catalog_estimate(
            parameters, strategy=strategy, world_size=processes, precision=precision, lora=lora
        )
        for lora in (False, True)
    )
    return MemoryEstimate(full_gib=full.state / GIB, lora_gib=lora.state / GIB)


@dataclass(frozen=True)
class ModelRow:
    name: str
    architecture: str
    family: str
    parameters: str
    full_finetune_gib: float
    lora_gib: float
    source: str


def model_rows(
    catalog: dict[str, CatalogModel] = CATALOG,
    *,
    precision: str = "bf16",
    family: str | None = None,
    strategy: str = "data-parallel",
    processes: int = 1,
) -> list[ModelRow]:
    """The catalog sorted by family then size, with memory per process (`memory_estimate`);
    `family` filters by architecture or name prefix."""
    rows = []
    for model in catalog.values():
        if family and family.lower() not in (model.family, model.name.split("-")[0]):
            continue
        estimate = memory_estimate(
            model.parameters, precision=precision, strategy=strategy, processes=processes
        )
        rows.append(
            ModelRow(
                name=model.name,
                architecture=model.family,
                family=FAMILY_NAMES.get(model.family, model.family),
                parameters=model.parameters,
                full_finetune_gib=round(estimate.full_gib, 1),
                lora_gib=round(estimate.lora_gib, 1),
                source=model.uri,
            )
        )
    return sorted(rows, key=lambda r: (r.name.split("-")[0], parameter_count(r.parameters), r.name))


@dataclass(frozen=True)
class FieldRow:
    section: str
    name: str
    type: str
    range: str
    default: str
    required: bool
    description: str


def field_rows(sections: list[str]) -> list[FieldRow]:
    """Every field of the named spec sections (`SECTIONS`), as the trainer's models define it."""
    rows = []
    for section in sections:
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r}: choose from {', '.join(SECTIONS)}")
        for f in describe_fields(SECTIONS[section]):
            rows.append(
                FieldRow(
                    section=section,
                    name=f.name,
                    type=f.type,
                    range=f.range,
                    default="" if f.default == "required" else f.default,
                    required=f.default == "required",
                    description=f.description,
                )
            )
    return rows
