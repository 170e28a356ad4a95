"""The typed configuration contract of the trainer.

One `TrainerConfig` is what a training pod reads (YAML at `$FINETUNE_CONFIG`) and what the
operator renders into the ConfigMap. Its sub-models are embedded unchanged in the `FineTuneJob`
CRD (`spec.model`, `spec.dataset`, `spec.hyperparameters`, `spec.lora`, `spec.evaluation`,
`spec.checkpoints`) and the CRD's OpenAPI schema is generated from them, so:

- every constraint the API server must enforce is a plain JSON-schema constraint (ge/le, enums,
  patterns, lengths); the one custom field validator, `_no_duplicates`, is the Python side of
  `x-kubernetes-list-type: set`;
- checks that span fields live in `model_validator`s and are mirrored as CEL rules in the CRD
  (each validator's docstring states the rule);
- field names are camelCase on the wire (`alias_generator=to_camel`), snake_case in Python.

`mode` says what a run does: `Train` (the default) fine-tunes or trains and evaluates at step 0
and every N steps; `Evaluate` only evaluates the model (a catalog model, a checkpoint or any
`model.uri`) on the eval set exactly as step 0 of a training run would, plus the baselines,
and writes no checkpoint. `mode_errors` holds the rules that tie the sections to the mode.

Checks that need the runtime (world size, the tokenizer, the data) are done by the trainer's
preflight and exit with `contract.EXIT_INVALID_INPUT`.

Imported by: the trainer, the operator and the CLI. Must not import torch, transformers or kopf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

# URI grammar shared with the CRD schema. Each pattern must mean the same to pydantic-core's Rust
# regex and to the API server's RE2: no lookarounds, no backreferences, no Unicode classes (`\s`
# differs between the two), hence the explicit character classes. `crdgen` turns the patterns of
# `PATTERN_MESSAGES` into CEL rules that answer with the message instead of the regex.
_URI_CHAR = r"[^\x00-\x20\x7f]"  # anything printable but a space
_BUCKET = r"[a-z0-9][a-z0-9.-]*"
# file:// paths may be relative here (a trainer run by hand, from a checkout); a FineTuneJob
# refuses them (`finetune_operator.api.FILE_URI_FIELDS`): in a pod they vanish with the pod.
MODEL_URI_PATTERN = rf"^(s3://{_BUCKET}(/{_URI_CHAR}*)?|file://{_URI_CHAR}+|hf://{_URI_CHAR}+)$"
DATA_URI_PATTERN = rf"^(s3://{_BUCKET}/|file://){_URI_CHAR}+$"
RUN_URI_PATTERN = rf"^(s3://{_BUCKET}/|file://)({_URI_CHAR}*/)?$"
# A run or datasets folder that only the operator's spec names (never relative).
ABSOLUTE_RUN_URI_PATTERN = rf"^(s3://{_BUCKET}/|file:///)({_URI_CHAR}*/)?$"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
# No userinfo (user:password@) in the authority: credentials only ever come from a Secret.
ENDPOINT_PATTERN = r"^https?://[^\x00-\x20\x7f/@]+(/[^\x00-\x20\x7f]*)?$"
# A git revision: no '..' (no path traversal in the hub cache), no leading '/' or '.'.
REVISION_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_/-]*(\.[A-Za-z0-9_/-]+)*$"

PATTERN_MESSAGES = {
    MODEL_URI_PATTERN: "must be s3://<bucket>/<path>, file:///<absolute path> or hf://<org>/<name>, "
    "without spaces",
    DATA_URI_PATTERN: "must be s3://<bucket>/<key> or file:///<absolute path> (globs * and ** allowed), "
    "without spaces",
    RUN_URI_PATTERN: "must be a folder ending in /: s3://<bucket>/<prefix>/ or file:///<absolute path>/, "
    "without spaces",
    ABSOLUTE_RUN_URI_PATTERN: "must be a folder ending in /: s3://<bucket>/<prefix>/ or "
    "file:///<absolute path>/, without spaces",
    ENDPOINT_PATTERN: "must be http(s)://<host>[:<port>][/<path>] without spaces and without "
    "user:password@ (credentials belong in the Secret of storage.credentialsSecret)",
    REVISION_PATTERN: "must be a branch, tag or commit: letters, digits, '_', '-', '/' and single "
    "dots, not starting with '/' or '.', no '..'",
}


def uri_name(uri: str) -> str:
    """What a model or data file is called in tables: its URI's last path segment
    (``s3://models/pythia-1.4b/`` is ``pythia-1.4b``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _no_duplicates(values: list[str] | None) -> list[str] | None:
    """Lists whose CRD schema is `x-kubernetes-list-type: set` (the API server refuses duplicates
    with 'Duplicate value'); this is the same check in Python."""
    if values is not None:
        seen: set[str] = set()
        for value in values:
            if value in seen:
                raise ValueError(f"duplicate entry {value!r}: each entry may appear once")
            seen.add(value)
    return values


UNIQUE: JsonDict = {"x-kubernetes-list-type": "set"}

DataUri = Annotated[str, Field(pattern=DATA_URI_PATTERN, max_length=1024)]
# A list of data URIs, each at most once (`x-kubernetes-list-type: set` in the CRD).
DataUris = Annotated[list[DataUri], AfterValidator(_no_duplicates)]

Mode = Literal["Train", "Evaluate"]
TRAIN: Mode = "Train"
EVALUATE: Mode = "Evaluate"
MODE_DESCRIPTION = (
    "Train: fine-tune (or train from scratch), evaluating at step 0 and every evaluation.everySteps. "
    "Evaluate: only evaluate the model on the eval set as step 0 of a training run would (eval loss, "
    "token accuracy, perplexity), plus the baselines; no optimizer step, no checkpoint. In Evaluate "
    "mode lora, maxSteps and epochs are not allowed, evaluation.atStart must stay true, and the "
    "settings only training uses (learning rate and schedule, warmup, weight decay, dropout, gradient "
    "clipping and checkpointing, checkpoint cadence and retention) must keep their defaults."
)


Sharding = Literal["auto", "data-parallel", "fsdp"]
AUTO: Sharding = "auto"
DATA_PARALLEL: Sharding = "data-parallel"
FSDP: Sharding = "fsdp"


class _Spec(BaseModel):
    """Base of every contract model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class ModelSpec(_Spec):
    """Which model to start from (also used for evaluation baselines)."""

    name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=63,
        description="Catalog name (see `kubectl finetune list models`), e.g. pythia-1.4b. "
        "Exactly one of name or uri.",
    )
    uri: str | None = Field(
        default=None,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="Model location: s3://… or file://… (a Hugging Face format directory, or a "
        ".gguf file to import), or hf://org/name. Exactly one of name or uri.",
    )
    init: Literal["pretrained", "scratch"] = Field(
        default="pretrained",
        description="pretrained: fine-tune the weights; scratch: random weights from the model's "
        "config (train from scratch).",
    )
    revision: str | None = Field(
        default=None,
        max_length=128,
        pattern=REVISION_PATTERN,
        description="Revision (branch, tag or commit) for hf:// models; no '..'.",
    )

    @model_validator(mode="after")
    def _name_xor_uri(self) -> Self:
        """CEL: has(self.name) != has(self.uri)"""
        if (self.name is None) == (self.uri is None):
            raise ValueError("exactly one of name or uri must be set")
        return self

    @property
    def key(self) -> tuple[str, str]:
        """What makes two model specs the same model: name or uri, and revision."""
        return (self.name if self.name is not None else f"uri:{self.uri}", self.revision or "")

    @property
    def display_name(self) -> str:
        if self.name is not None:
            return self.name
        assert self.uri is not None
        return uri_name(self.uri)


class DatasetSpec(_Spec):
    """Training and evaluation data."""

    name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=63,
        description="A registered dataset (`kubectl finetune add dataset`): files under "
        "<datasetsUri>/<name>/train/ and optionally <name>/eval/. Exclusive with train.",
    )
    train: DataUris | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        json_schema_extra=UNIQUE,
        description="Training files: s3:// or file:// URIs of JSONL (also gzip .gz or zstd .zst), "
        "Parquet (.parquet) or .txt files; globs (*, **) allowed. Exclusive with name; one of them "
        "is required in mode Train.",
    )
    eval: DataUris | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        json_schema_extra=UNIQUE,
        description="Evaluation files (same forms as train). If unset, evalSize records are held "
        "out of the training data. In mode Evaluate, eval alone (without name or train) is enough.",
    )
    format: Literal["text", "prompt-completion", "chat"] = Field(
        default="text",
        description="Record format. text: loss on every token; prompt-completion: loss only on "
        "the completion; chat: the tokenizer's chat template, loss only on assistant turns. "
        ".txt files are always text (one document per file).",
    )
    text_field: str = Field(
        default="text", min_length=1, max_length=64, description="JSONL field of a text record."
    )
    prompt_field: str = Field(
        default="prompt", min_length=1, max_length=64, description="JSONL field of the prompt."
    )
    completion_field: str = Field(
        default="completion",
        min_length=1,
        max_length=64,
        description="JSONL field of the completion.",
    )
    messages_field: str = Field(
        default="messages",
        min_length=1,
        max_length=64,
        description="JSONL field of the chat messages (list of {role, content}).",
    )
    train_on_inputs: bool = Field(
        default=False,
        description="Also compute the loss on prompts / non-assistant turns.",
    )
    packing: bool = Field(
        default=True,
        description="Concatenate documents (each ending with the EOS token) and cut them into "
        "blocks of sequenceLength tokens (see packingStrategy). Off: one record per sequence "
        "(see groupByLength); longer records are split into several sequences, never truncated.",
    )
    packing_strategy: Literal["concatenate", "documents"] = Field(
        default="concatenate",
        description="With packing. concatenate: a block attends across the documents in it. "
        "documents: position ids restart at each document, so no token attends across a document "
        "boundary and a document's first token carries no loss (the loss of a block equals that "
        "of its documents evaluated alone).",
    )
    group_by_length: bool | None = Field(
        default=None,
        description="Without packing: batch sequences of similar length together (the epoch's "
        "order cut into groups of 50 global batches, each sorted by length, its batches shuffled), "
        "so padding wastes little compute. Unset: on without packing. Only with packing: false.",
    )
    eval_size: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Records held out of the training data for evaluation when eval is unset "
        "(chosen by hyperparameters.seed).",
    )

    @model_validator(mode="after")
    def _sources(self) -> Self:
        """CEL: !(has(self.name) && has(self.train)); has(self.name) || has(self.train) || has(self.eval)"""
        if self.name is not None and self.train is not None:
            raise ValueError("name and train are exclusive: set one of them")
        if self.name is None and self.train is None and self.eval is None:
            raise ValueError(
                "set name (a registered dataset), train (URIs) or, in mode Evaluate, eval (URIs)"
            )
        return self

    @model_validator(mode="after")
    def _packing(self) -> Self:
        """CEL: self.packing || self.packingStrategy == 'concatenate'"""
        if not self.packing and self.packing_strategy != "concatenate":
            raise ValueError(
                "packingStrategy: documents needs packing: true (without packing every sequence is one "
                "document already)"
            )
        return self

    @model_validator(mode="after")
    def _grouping(self) -> Self:
        """CEL: !has(self.groupByLength) || !self.groupByLength || !self.packing"""
        if self.packing and self.group_by_length:
            raise ValueError(
                "groupByLength: true needs packing: false (with packing every block is sequenceLength "
                "tokens long already)"
            )
        return self

    @property
    def grouped_by_length(self) -> bool:
        """Whether training batches are length-grouped: groupByLength, by default on without packing."""
        return not self.packing if self.group_by_length is None else self.group_by_length


class Hyperparameters(_Spec):
    """Optimisation settings. Each field's type, range and default is what the CLI prints."""

    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Optimizer steps to train. Exclusive with epochs; if neither is set, 1 epoch.",
    )
    epochs: float | None = Field(
        default=None,
        gt=0.0,
        le=1000.0,
        description="Passes over the training data (fractions allowed). Exclusive with maxSteps.",
    )
    learning_rate: float = Field(default=5e-5, gt=0.0, le=1.0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="linear",
        description="Decay after warmup: constant, linear to 0, or cosine to 0.",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Linear warmup steps. Exclusive with warmupRatio.",
    )
    warmup_ratio: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Warmup as a fraction of the total steps. Exclusive with warmupSteps.",
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=65_536,
        description="Global batch: sequences per optimizer step, over all processes.",
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4_096,
        description="Sequences per process per forward pass. Gradient accumulation = batchSize / "
        "(microBatchSize x processes). Default: batchSize / processes (no accumulation).",
    )
    sequence_length: int = Field(
        default=512,
        ge=16,
        le=131_072,
        description="Tokens per sequence (block size when packing).",
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Dropout probability set on the model's dropout layers.",
    )
    max_grad_norm: float = Field(
        default=1.0,
        ge=0.0,
        le=1000.0,
        description="Gradient clipping norm; 0 disables clipping.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Training precision: fp32, or bf16/fp16 mixed precision (fp16 needs a GPU).",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Random seed (weights init, data order).")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass to save memory.",
    )
    sharding: Sharding = Field(
        default=AUTO,
        description="How the processes hold the model. data-parallel: every process holds the full "
        "weights, gradients and AdamW state (~16 bytes per parameter in fp32). fsdp: FSDP2, each "
        "transformer block and then the whole model sharded over all processes (~16/N bytes per "
        "parameter with N processes, plus one block gathered at a time). auto: fsdp when there is "
        "more than one process and data parallel would not fit the GPU's memory, else data-parallel.",
    )
    reshard_after_forward: bool = Field(
        default=True,
        description="fsdp: free each block's gathered weights after its forward pass and gather them "
        "again for the backward pass (less memory, one more all-gather per block). false: keep them "
        "until the backward pass.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="fsdp: keep the sharded weights, gradients and AdamW state in host memory and run "
        "the optimizer step on the CPU (fits larger models on a GPU, slower steps). GPU runs only.",
    )

    @model_validator(mode="after")
    def _exclusive(self) -> Self:
        """CEL: !(has(self.maxSteps) && has(self.epochs));
        !(self.warmupSteps > 0 && self.warmupRatio > 0.0);
        !has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0;
        self.sharding != 'data-parallel' || (self.reshardAfterForward && !self.cpuOffload);
        !(self.sharding == 'fsdp' && self.precision == 'fp16')"""
        errors = []
        if self.max_steps is not None and self.epochs is not None:
            errors.append("maxSteps and epochs are exclusive")
        if self.warmup_steps > 0 and self.warmup_ratio > 0.0:
            errors.append("warmupSteps and warmupRatio are exclusive")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            errors.append("batchSize must be a multiple of microBatchSize")
        if self.sharding == DATA_PARALLEL and (not self.reshard_after_forward or self.cpu_offload):
            errors.append(
                "reshardAfterForward and cpuOffload apply to sharding fsdp (or auto), not data-parallel"
            )
        if self.sharding == FSDP and self.precision == "fp16":
            errors.append("sharding fsdp trains in fp32 or bf16, not fp16 (use precision bf16)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process; ValueError if it does not divide."""
        micro = self.micro_batch(world_size)
        if self.batch_size % (micro * world_size):
            raise ValueError(
                f"hyperparameters.batchSize={self.batch_size} is not a multiple of "
                f"microBatchSize ({micro}) x processes ({world_size})"
            )
        return self.batch_size // (micro * world_size)

    def micro_batch(self, world_size: int) -> int:
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        if self.batch_size % world_size:
            raise ValueError(
                f"hyperparameters.batchSize={self.batch_size} is not a multiple of the "
                f"number of processes ({world_size})"
            )
        return self.batch_size // world_size


class LoraSpec(_Spec):
    """Parameter-efficient fine-tuning with LoRA (peft). Absent: full fine-tuning."""

    rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0.0, le=4096.0, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0.0, le=1.0, description="Dropout on the LoRA input.")
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], AfterValidator(_no_duplicates)]
        | None
    ) = Field(
        default=None,
        min_length=1,
        max_length=64,
        json_schema_extra=UNIQUE,
        description="Module names to adapt; default: peft's choice for the model family "
        "(the attention projections).",
    )
    merge_on_export: bool = Field(
        default=True,
        description="final/ holds the merged model; the adapter alone is in final/adapter/.",
    )


class EvaluationSpec(_Spec):
    """When and how much to evaluate, and which baselines to compare against."""

    every_steps: int = Field(
        default=100,
        ge=1,
        le=10_000_000,
        description="Evaluate every N optimizer steps (and always at the last step).",
    )
    at_start: bool = Field(
        default=True, description="Evaluate at step 0: the zero-shot baseline of the model."
    )
    max_batches: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Evaluate at most this many micro-batches per process; default: the whole eval set.",
    )
    log_every_steps: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="Train loss is logged as the token-weighted mean over this many steps.",
    )
    baselines: list[ModelSpec] = Field(
        default_factory=list,
        max_length=8,
        description="Other models evaluated zero-shot on the same eval set, reported side by side; "
        "each model once, and not the model being trained.",
    )

    @model_validator(mode="after")
    def _unique_baselines(self) -> Self:
        """CEL: !has(self.baselines) || self.baselines.all(b, self.baselines.exists_one(c, model_key(c) == model_key(b)))
        (`crdgen` spells model_key out)"""
        seen: set[tuple[str, str]] = set()
        for index, baseline in enumerate(self.baselines):
            key = baseline.key
            if key in seen:
                raise ValueError(
                    f"baselines[{index}]: {baseline.display_name!r} is listed twice: each baseline model once"
                )
            seen.add(key)
        return self


class CheckpointSpec(_Spec):
    """Checkpoint cadence and retention."""

    every_steps: int = Field(
        default=500,
        ge=1,
        le=10_000_000,
        description="Save a checkpoint every N optimizer steps (and at the end).",
    )
    keep_last: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Keep the newest K complete checkpoints; older ones are deleted.",
    )
    output_uri: str | None = Field(
        default=None,
        pattern=RUN_URI_PATTERN,
        max_length=1024,
        description="Run folder (s3://…/ or file://…/, ending in /) for checkpoints, metrics and "
        "final/; default: run.uri, set by the operator.",
    )


class RunSpec(_Spec):
    """Filled in by the operator, not by users. Credentials never appear here: they come from
    the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, HF_TOKEN) via a Secret."""

    uri: str | None = Field(
        default=None,
        pattern=RUN_URI_PATTERN,
        max_length=1024,
        description="Run folder, e.g. s3://bucket/runs/<namespace>/<job>/.",
    )
    storage_endpoint: str | None = Field(
        default=None,
        pattern=ENDPOINT_PATTERN,
        max_length=1024,
        description="S3 endpoint URL (http(s)://host:port); default: AWS.",
    )
    storage_region: str | None = Field(default=None, max_length=64, description="S3 region name.")
    datasets_uri: str | None = Field(
        default=None,
        pattern=RUN_URI_PATTERN,
        max_length=1024,
        description="Where registered datasets live (<datasetsUri>/<name>/train/…).",
    )
    namespace: str | None = Field(default=None, max_length=63, description="FineTuneJob namespace.")
    job_name: str | None = Field(default=None, max_length=253, description="FineTuneJob name.")


class TrainerConfig(_Spec):
    """Everything one training run needs. Rendered by the operator into the pod's ConfigMap."""

    mode: Mode = Field(default=TRAIN, description=MODE_DESCRIPTION)
    model: ModelSpec
    dataset: DatasetSpec
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraSpec | None = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    # `crdgen` also generates one rule per EVALUATE_UNUSED setting and one from `baseline_errors`.
    @model_validator(mode="after")
    def _mode(self) -> Self:
        """CEL (on the FineTuneJob spec): self.mode == 'Evaluate' || has(self.dataset.name) ||
        has(self.dataset.train); self.mode == 'Train' || !has(self.lora);
        self.mode == 'Train' || !has(self.hyperparameters.maxSteps);
        self.mode == 'Train' || !has(self.hyperparameters.epochs);
        self.mode == 'Train' || self.evaluation.atStart"""
        errors = mode_errors(
            self.mode,
            dataset=self.dataset,
            hyperparameters=self.hyperparameters,
            lora=self.lora,
            evaluation=self.evaluation,
            checkpoints=self.checkpoints,
        ) + baseline_errors(self.model, self.evaluation)
        if errors:
            raise ValueError("; ".join(f"{path}: {message}" for path, message in errors))
        return self

    @model_validator(mode="after")
    def _run_folder(self) -> Self:
        """CEL (on the rendered config only; run.uri is the operator's): a run folder is known."""
        if self.checkpoints.output_uri is None and self.run.uri is None:
            raise ValueError("no run folder: set checkpoints.outputUri or run.uri")
        if self.dataset.name is not None and self.run.datasets_uri is None:
            raise ValueError("dataset.name needs run.datasetsUri (set by the operator)")
        return self

    @property
    def run_uri(self) -> str:
        uri = self.checkpoints.output_uri or self.run.uri
        assert uri is not None
        return uri

    @classmethod
    def from_dict(cls, data: Any) -> TrainerConfig:
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, text: str) -> TrainerConfig:
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainerConfig:
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"))

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Settings only training uses: in mode Evaluate they must keep their defaults (a value set there
# would be silently ignored). (section, field) in Python names; mirrored by one CEL rule each.
EVALUATE_UNUSED: tuple[tuple[str, str], ...] = (
    ("hyperparameters", "learning_rate"),
    ("hyperparameters", "lr_scheduler"),
    ("hyperparameters", "warmup_steps"),
    ("hyperparameters", "warmup_ratio"),
    ("hyperparameters", "weight_decay"),
    ("hyperparameters", "dropout"),
    ("hyperparameters", "max_grad_norm"),
    ("hyperparameters", "gradient_checkpointing"),
    ("hyperparameters", "sharding"),
    ("hyperparameters", "reshard_after_forward"),
    ("hyperparameters", "cpu_offload"),
    ("checkpoints", "every_steps"),
    ("checkpoints", "keep_last"),
)
EVALUATE_UNUSED_MESSAGE = "is only used for training: in mode Evaluate leave it unset (default {default})"


def evaluate_unused_default(section: str, name: str) -> Any:
    """The default a training-only setting must keep in mode Evaluate."""
    model = Hyperparameters if section == "hyperparameters" else CheckpointSpec
    return model.model_fields[name].default


def mode_errors(
    mode: Mode,
    *,
    dataset: DatasetSpec,
    hyperparameters: Hyperparameters,
    lora: LoraSpec | None,
    evaluation: EvaluationSpec,
    checkpoints: CheckpointSpec | None = None,
) -> list[tuple[str, str]]:
    """(field path, what is allowed) for each section that does not fit the mode. Shared by
    `TrainerConfig` and the operator's spec validation; mirrored by CEL rules in the CRD."""
    errors = []
    if mode == TRAIN:
        if dataset.name is None and dataset.train is None:
            errors.append(
                (
                    "dataset",
                    "mode Train needs dataset.name or dataset.train (eval alone is for mode Evaluate)",
                )
            )
        return errors
    if lora is not None:
        errors.append(
            (
                "lora",
                "not allowed in mode Evaluate (nothing is trained); to evaluate a LoRA checkpoint, "
                "give its folder as model.uri",
            )
        )
    if hyperparameters.max_steps is not None:
        errors.append(("hyperparameters.maxSteps", "not allowed in mode Evaluate (nothing is trained)"))
    if hyperparameters.epochs is not None:
        errors.append(("hyperparameters.epochs", "not allowed in mode Evaluate (nothing is trained)"))
    if not evaluation.at_start:
        errors.append(
            ("evaluation.atStart", "must be true in mode Evaluate (the step-0 evaluation is the result)")
        )
    sections = {"hyperparameters": hyperparameters, "checkpoints": checkpoints or CheckpointSpec()}
    for section, name in EVALUATE_UNUSED:
        default = evaluate_unused_default(section, name)
        if getattr(sections[section], name) != default:
            errors.append(
                (f"{section}.{to_camel(name)}", EVALUATE_UNUSED_MESSAGE.format(default=_literal(default)))
            )
    return errors


def _literal(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def baseline_errors(model: ModelSpec, evaluation: EvaluationSpec) -> list[tuple[str, str]]:
    """A pretrained model is its own step-0 evaluation: listing it as a baseline too evaluates it
    twice under two names. (From scratch, the pretrained model is a meaningful baseline.)
    Mirrored by a spec-level CEL rule."""
    if model.init != "pretrained":
        return []
    return [
        (
            f"evaluation.baselines[{index}]",
            f"{baseline.display_name!r} is the model being trained: its zero-shot result is the step-0 "
            "evaluation already (remove it from baselines)",
        )
        for index, baseline in enumerate(evaluation.baselines)
        if baseline.key == model.key
    ]


class FieldRow(NamedTuple):
    """One line of `kubectl finetune list hyperparameters`."""

    name: str
    type: str
    range: str
    default: str
    description: str


def describe_fields(model: type[BaseModel]) -> list[FieldRow]:
    """Name (camelCase), type, range, default and description of each field of a spec model,
    e.g. FieldRow('dropout', 'float', '[0.0, 1.0]', '0.0', ...)."""
    rows = []
    for name, info in model.model_fields.items():
        alias = info.alias or name
        schema = model.model_json_schema(by_alias=True)["properties"][alias]
        variants = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
        main = variants[0] if variants else schema
        if "enum" in main:
            type_name, range_text = "enum", " | ".join(str(v) for v in main["enum"])
        elif "const" in main:
            type_name, range_text = "enum", str(main["const"])
        else:
            type_name = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}.get(
                main.get("type", ""), main.get("type", "object")
            )
            low = main.get("minimum", main.get("exclusiveMinimum"))
            high = main.get("maximum", main.get("exclusiveMaximum"))
            range_text = ""
            if low is not None or high is not None:
                left = "(" if "exclusiveMinimum" in main else "["
                right = ")" if "exclusiveMaximum" in main else "]"
                range_text = f"{left}{_num(low, type_name)}, {_num(high, type_name)}{right}"
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = "-"
        else:
            default = (
                "unset"
                if info.default is None
                else str(info.default).lower()
                if isinstance(info.default, bool)
                else str(info.default)
            )
        rows.append(FieldRow(alias, type_name, range_text, default, info.description or ""))
    return rows


def _num(value: Any, type_name: str) -> str:
    if value is None:
        return "∞"
    if type_name == "float":
        return repr(float(value))
    return str(value)
