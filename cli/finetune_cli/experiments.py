"""Experiments, evaluation jobs and checkpoint IDs as FineTuneJob manifests (pure).

An experiment is a FineTuneJob created by `experiment add` with the label
`finetune.dev/role=experiment` and `spec.suspend: true`: the operator creates nothing that runs
until `run` sets `suspend: false`. An evaluation (`eval`) is a FineTuneJob in `spec.mode:
Evaluate`, labelled `finetune.dev/role=evaluation`, whose one evaluation (step 0) is the result
(see `eval_manifest`). Called by `main`; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from finetune_operator.api import API_VERSION, JOB_NAME_MAX_LENGTH, KIND, Phase
from finetune_trainer.config import EVALUATE

LABEL_ROLE = "finetune.dev/role"
ROLE_EXPERIMENT = "experiment"
ROLE_EVALUATION = "evaluation"
ERROR_MARK = "# ERROR"
ERROR_HEADER = (
    "# The experiment was not saved. Fix it (the API server's message is below), save and quit\n"
    "# the editor to try again; quit without changes to cancel.\n"
)


class ManifestError(ValueError):
    """An edited manifest that cannot be used; the message says what to change."""


def template(
    *,
    name: str,
    model: str,
    dataset: str | None = None,
    data_format: str = "text",
    datasets_uri: str | None = None,
) -> str:
    """The YAML an editor opens for `experiment add`: a valid FineTuneJob with comments."""
    dataset_block = (
        f"    name: {dataset}                 # registered: kubectl finetune list datasets\n"
        if dataset
        else "    train: [s3://bucket/data/train.jsonl]   # or name: <registered dataset>\n"
        "    # eval: [s3://bucket/data/eval.jsonl]   # unset: evalSize records held out\n"
    )
    storage_block = f"  storage:\n    datasetsUri: {datasets_uri}\n" if dataset and datasets_uri else ""
    return (
        "# A FineTuneJob experiment. It is saved suspended; `kubectl finetune run` starts it.\n"
        "# Fields, ranges and defaults: kubectl finetune list hyperparameters --all\n"
        "# Models: kubectl finetune list models\n"
        f"apiVersion: {API_VERSION}\n"
        f"kind: {KIND}\n"
        "metadata:\n"
        f"  name: {name}\n"
        "spec:\n"
        "  model:\n"
        f"    name: {model}                  # or uri: s3://… | file://… | hf://org/name\n"
        "  dataset:\n"
        f"{dataset_block}"
        f"    format: {data_format}                    # text | prompt-completion | chat\n"
        "  hyperparameters:\n"
        "    maxSteps: 100\n"
        "    learningRate: 5.0e-05\n"
        "    batchSize: 8\n"
        "    sequenceLength: 512\n"
        "  evaluation:\n"
        "    everySteps: 50                    # and at step 0: the zero-shot baseline\n"
        "    baselines: []                     # e.g. [{name: gpt-j-6b}]\n"
        "  checkpoints:\n"
        "    everySteps: 50\n"
        "    keepLast: 3\n"
        f"{storage_block}"
        "  suspend: true                       # kept until `kubectl finetune run`\n"
    )


def with_errors(text: str, errors: Sequence[str]) -> str:
    """The edited text with the errors as a comment block on top (replacing an earlier one)."""
    body = strip_errors(text)
    lines = [f"{ERROR_MARK}: {line}" for error in errors for line in str(error).splitlines() or [""]]
    return ERROR_HEADER + "\n".join(lines) + "\n" + body


def strip_errors(text: str) -> str:
    lines = text.splitlines(keepends=True)
    header = ERROR_HEADER.splitlines(keepends=True)
    if lines[: len(header)] == header:
        lines = lines[len(header) :]
    while lines and lines[0].startswith(ERROR_MARK):
        lines.pop(0)
    return "".join(lines)


class ManifestLoader(yaml.SafeLoader):
    """YAML read as kubectl reads it: `1e-4` and JSON's `5e-05` are numbers (YAML 1.2, and Go's
    sigs.k8s.io/yaml), where PyYAML's YAML 1.1 rules want a dot and read them as strings, which
    the API server would refuse for a number field."""


ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_manifest(text: str, *, namespace: str) -> dict[str, Any]:
    """The edited YAML as a FineTuneJob experiment to create: kind and apiVersion checked,
    namespace set, the experiment label added and `spec.suspend` forced to true. The error block
    `with_errors` puts on top is YAML comments: parsed as it is, a syntax error's line is the
    line the editor shows."""
    try:
        data = yaml.load(text, Loader=ManifestLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError("expected one FineTuneJob (a YAML mapping with apiVersion, kind, metadata, spec)")
    if data.get("kind") != KIND or data.get("apiVersion") != API_VERSION:
        raise ManifestError(f"kind must be {KIND} and apiVersion {API_VERSION}")
    metadata = data.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        raise ManifestError("metadata.name is required")
    if not isinstance(data.get("spec"), dict):
        raise ManifestError("spec is required (model, dataset, …)")
    labels = dict(metadata.get("labels") or {})
    labels[LABEL_ROLE] = ROLE_EXPERIMENT
    metadata = {**metadata, "namespace": namespace, "labels": labels}
    return {**data, "metadata": metadata, "spec": {**data["spec"], "suspend": True}}


def is_evaluation(job: Mapping[str, Any]) -> bool:
    """A FineTuneJob in mode Evaluate: its one evaluation (step 0) is its result."""
    return (job.get("spec") or {}).get("mode") == EVALUATE


def role(job: Mapping[str, Any]) -> str | None:
    labels = (job.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_ROLE)
    return str(value) if value else None


def is_pending_experiment(job: Mapping[str, Any]) -> bool:
    """An experiment that was never started: suspended, no start time, not cancelled."""
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    return (
        role(job) == ROLE_EXPERIMENT
        and bool(spec.get("suspend"))
        and not spec.get("cancel")
        and not status.get("startTime")
        and status.get("phase") not in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)
    )


def newest_first(jobs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(
        jobs,
        key=lambda j: ((j.get("metadata") or {}).get("creationTimestamp") or "", j["metadata"]["name"]),
        reverse=True,
    )


def to_run(jobs: Sequence[Mapping[str, Any]], count: int) -> list[str]:
    """Names of the newest `count` experiments not started yet, oldest first."""
    pending = [j for j in newest_first(jobs) if is_pending_experiment(j)]
    return [j["metadata"]["name"] for j in reversed(pending[:count])]


# ---- checkpoints and evaluation -----------------------------------------------------------------
_CHECKPOINT_ID = re.compile(r"^(?P<job>[a-z]([-a-z0-9]*[a-z0-9])?):(?P<step>[0-9]+)$")


def checkpoint_id(job: str, step: int) -> str:
    return f"{job}:{step}"


def parse_checkpoint_id(value: str) -> tuple[str, int]:
    match = _CHECKPOINT_ID.match(value)
    if not match:
        raise ManifestError(
            f"not a checkpoint ID: {value!r}; IDs look like <job>:<step>, e.g. my-job:500 "
            "(see kubectl finetune list checkpoints)"
        )
    return match["job"], int(match["step"])


def find_checkpoint(job: Mapping[str, Any], step: int) -> str:
    """The URI of a job's complete checkpoint at `step` (from its status)."""
    name = job["metadata"]["name"]
    for record in (job.get("status") or {}).get("checkpoints") or []:
        if record.get("step") == step and record.get("uri"):
            return str(record["uri"])
    steps = [str(r.get("step")) for r in (job.get("status") or {}).get("checkpoints") or []]
    raise ManifestError(
        f"job {name} has no complete checkpoint at step {step}"
        + (f"; it has steps {', '.join(steps)}" if steps else "; it has no checkpoints yet")
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def eval_name(model_label: str, dataset_label: str, suffix: str) -> str:
    """A valid FineTuneJob name `eval-<model>-<dataset>-<suffix>`, shortened to fit."""
    budget = JOB_NAME_MAX_LENGTH - len("eval--") - len(suffix) - 1
    core = slug(f"{model_label}-{dataset_label}")[:budget].strip("-")
    return f"eval-{core}-{suffix}"


# The settings that decide what a job's evaluation measures: the block length, the seed that picks
# held-out eval records, the precision; the micro-batch size and maxBatches decide how much of the
# eval set is read when maxBatches is set.
EVALUATION_HYPERPARAMETERS = ("sequenceLength", "seed", "precision")


def evaluation_settings(job: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(hyperparameters, evaluation.maxBatches) that make an evaluation of one of `job`'s
    checkpoints measure what the job's own evaluations measure: its sequence length, seed and
    precision, its per-process micro-batch size, and its maxBatches."""
    spec = job.get("spec") or {}
    given = spec.get("hyperparameters") or {}
    settings = {key: given[key] for key in EVALUATION_HYPERPARAMETERS if key in given}
    resources = spec.get("resources") or {}
    processes = int(resources.get("nodes") or 1) * int(resources.get("processesPerNode") or 1)
    micro = given.get("microBatchSize") or (
        int(given["batchSize"]) // processes if given.get("batchSize") else None
    )
    if micro:
        settings["batchSize"] = settings["microBatchSize"] = int(micro)
    max_batches = (spec.get("evaluation") or {}).get("maxBatches")
    return settings, (int(max_batches) if max_batches else None)


def eval_manifest(
    *,
    name: str,
    namespace: str,
    model: Mapping[str, Any],
    dataset: Mapping[str, Any],
    storage: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """A FineTuneJob in mode Evaluate: `model` evaluated on `dataset`'s eval set (its eval files,
    a registered dataset's eval/ files, or evalSize records held out of train), no training."""
    spec: dict[str, Any] = {"mode": EVALUATE, "model": dict(model), "dataset": dict(dataset)}
    if hyperparameters:
        spec["hyperparameters"] = dict(hyperparameters)
    if max_batches:
        spec["evaluation"] = {"maxBatches": max_batches}
    if storage:
        spec["storage"] = dict(storage)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_ROLE: ROLE_EVALUATION}},
        "spec": spec,
    }
