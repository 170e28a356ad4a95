"""The model catalog with memory estimates, and the hyper-parameter reference (pure).

Both are read from the trainer's own modules — `finetune_trainer.catalog.CATALOG` and the pydantic
models of `finetune_trainer.config` — so the CLI prints exactly what the trainer accepts. Called
by `main` for `list models` and `list hyperparameters`. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

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

# Bytes per parameter (activations excluded; they grow with batch x sequence length).
# Full fine-tuning with AdamW: fp32 master weights 4 + gradients 4 + two Adam moments 8.
FULL_BYTES_PER_PARAM = 16
# LoRA: the frozen base weights at the training precision, plus the adapter trained like above.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Adapter size as a fraction of the model (rank 8 on the attention projections: well under 1 %).
LORA_ADAPTER_FRACTION = 0.01

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


def memory_estimate(parameters: float, *, precision: str = "bf16") -> MemoryEstimate:
    """Training memory for weights, gradients and optimizer state, summed over all processes.

    Full: 16 bytes per parameter. LoRA: the frozen weights at `precision` plus an adapter of
    about 1 % of the parameters at 16 bytes each. Activations are not included."""
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision must be one of {', '.join(WEIGHT_BYTES)}, got {precision!r}")
    full = parameters * FULL_BYTES_PER_PARAM
    lora = parameters * WEIGHT_BYTES[precision] + parameters * LORA_ADAPTER_FRACTION * FULL_BYTES_PER_PARAM
    return MemoryEstimate(full_gib=full / GIB, lora_gib=lora / GIB)


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
    catalog: dict[str, CatalogModel] = CATALOG, *, precision: str = "bf16", family: str | None = None
) -> list[ModelRow]:
    """The catalog sorted by family then size; `family` filters by architecture or name prefix."""
    rows = []
    for model in catalog.values():
        if family and family.lower() not in (model.family, model.name.split("-")[0]):
            continue
        count = parameter_count(model.parameters)
        estimate = memory_estimate(count, precision=precision)
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
