"""Generate the FineTuneJob CRD from the typed models (pure; the one source of the schema).

`python -m finetune_operator.crdgen` prints the CRD; `--write` updates
crds/finetune.dev_finetunejobs.yaml and docs/api-reference.md; `--check` fails if either
checked-in file is stale (tests/unit/test_operator_crd.py does this).

The pydantic JSON schema is turned into a Kubernetes *structural* schema: `$ref`s inlined,
`Optional[X]` becomes X (absent = unset), `const` becomes a one-value enum, numeric exclusive
bounds become OpenAPI v3.0 booleans, titles and `additionalProperties: false` dropped (the API
server prunes or, with strict field validation, rejects unknown fields). Optional sections
with a default factory get `default: {}` so the API server fills in their field defaults.
Cross-field rules become CEL `x-kubernetes-validations` from `CEL_RULES`; each rule mirrors a
pydantic validator (the trainer's, or `api.cross_field_errors`) and a unit test keeps them in step.

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from finetune_operator import api
from finetune_trainer import config as trainer_config

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml"

Rule = dict[str, str]


def _model_key(var: str) -> str:
    """CEL for `ModelSpec.key`: name (or 'uri:' + uri) and revision, as one string."""
    return (
        f"((has({var}.name) ? {var}.name : 'uri:' + {var}.uri) + '@' + "
        f"(has({var}.revision) ? {var}.revision : ''))"
    )


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _evaluate_unused_rules() -> list[Rule]:
    """One rule per training-only setting (`trainer_config.EVALUATE_UNUSED`): in mode Evaluate
    it keeps its default (mirrors `trainer_config.mode_errors`)."""
    rules = []
    for section, name in trainer_config.EVALUATE_UNUSED:
        alias = to_camel(name)
        default = trainer_config.evaluate_unused_default(section, name)
        message = trainer_config.EVALUATE_UNUSED_MESSAGE.format(default=trainer_config._literal(default))
        rules.append(
            {
                "rule": f"self.mode == 'Train' || self.{section}.{alias} == {_cel_literal(default)}",
                "message": f"{section}.{alias} {message}",
                "fieldPath": f".{section}.{alias}",
            }
        )
    return rules


def _absolute_file_rules() -> list[Rule]:
    """file:// URIs of a FineTuneJob are absolute (mirrors `api._relative_file_uris`)."""

    def absolute(value: str) -> str:
        return f"(!{value}.startsWith('file://') || {value}.startsWith('file:///'))"

    rules = []
    for path, is_list in api.FILE_URI_FIELDS:
        parent, _, leaf = path.rpartition(".")
        test = f"self.{path}.all(u, {absolute('u')})" if is_list else absolute(f"self.{path}")
        rules.append(
            {
                "rule": f"!has(self.{parent}.{leaf}) || {test}",
                "message": f"{path}: {api.RELATIVE_FILE_MESSAGE}",
                "fieldPath": f".{path}",
            }
        )
    rules.append(
        {
            "rule": "!has(self.evaluation.baselines) || "
            f"self.evaluation.baselines.all(b, !has(b.uri) || {absolute('b.uri')})",
            "message": f"evaluation.baselines[].uri: {api.RELATIVE_FILE_MESSAGE}",
            "fieldPath": ".evaluation.baselines",
        }
    )
    return rules


def pattern_rule(pattern: str, message: str) -> Rule:
    """A string pattern as a CEL rule answering with `message` (RE2 raw string)."""
    if "'" in pattern:
        raise ValueError(f"pattern {pattern!r} cannot be a raw CEL string")
    return {"rule": f"self.matches(r'{pattern}')", "message": message}


# CEL rules per model (placed on every schema generated from that model), with the message the
# API server returns. `fieldPath` makes the error name the field.
CEL_RULES: dict[type[BaseModel], list[Rule]] = {
    trainer_config.ModelSpec: [
        {
            "rule": "has(self.name) != has(self.uri)",
            "message": "exactly one of name (a catalog model) or uri (s3://, file://, hf://) must be set",
        },
    ],
    trainer_config.DatasetSpec: [
        {
            "rule": "!(has(self.name) && has(self.train))",
            "message": "name (a registered dataset) and train (a list of URIs) are exclusive: set one of them",
        },
        {
            "rule": "has(self.name) || has(self.train) || has(self.eval)",
            "message": "set name (a registered dataset), train (a list of URIs) or, in mode Evaluate, "
            "eval (a list of URIs)",
        },
        {
            "rule": "self.packing || self.packingStrategy == 'concatenate'",
            "message": "packingStrategy: documents needs packing: true (without packing every sequence "
            "is one document already)",
            "fieldPath": ".packingStrategy",
        },
        {
            "rule": "!has(self.groupByLength) || !self.groupByLength || !self.packing",
            "message": "groupByLength: true needs packing: false (with packing every block is "
            "sequenceLength tokens long already)",
            "fieldPath": ".groupByLength",
        },
    ],
    trainer_config.Hyperparameters: [
        {
            "rule": "!(has(self.maxSteps) && has(self.epochs))",
            "message": "maxSteps and epochs are exclusive: set one of them",
        },
        {
            "rule": "!(self.warmupSteps > 0 && self.warmupRatio > 0.0)",
            "message": "warmupSteps and warmupRatio are exclusive: set one of them",
        },
        {
            "rule": "!has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0",
            "message": "batchSize must be a multiple of microBatchSize",
            "fieldPath": ".microBatchSize",
        },
        {
            "rule": "self.sharding != 'data-parallel' || (self.reshardAfterForward && !self.cpuOffload)",
            "message": "reshardAfterForward and cpuOffload apply to sharding fsdp (or auto), not data-parallel",
            "fieldPath": ".sharding",
        },
        {
            "rule": "!(self.sharding == 'fsdp' && self.precision == 'fp16')",
            "message": "sharding fsdp trains in fp32 or bf16, not fp16 (use precision bf16)",
            "fieldPath": ".precision",
        },
    ],
    trainer_config.EvaluationSpec: [
        {
            "rule": "!has(self.baselines) || "
            f"self.baselines.all(b, self.baselines.exists_one(c, {_model_key('c')} == {_model_key('b')}))",
            "message": "each baseline model may be listed once (same name, or same uri and revision)",
            "fieldPath": ".baselines",
        },
    ],
    api.ResourcesSpec: [
        {
            "rule": f"!has(self.nodeSelector) || self.nodeSelector.all(k, k.size() <= {api.LABEL_KEY_MAX_LENGTH} "
            f"&& k.matches(r'{api.LABEL_KEY_PATTERN}'))",
            "message": f"every nodeSelector key {api.LABEL_KEY_MESSAGE}",
            "fieldPath": ".nodeSelector",
        },
        {
            "rule": "self.gpus == 0 || self.processesPerNode == self.gpus",
            "message": "processesPerNode must equal gpus when gpus > 0 (one training process per GPU)",
            "fieldPath": ".processesPerNode",
        },
    ],
    api.FineTuneJobSpec: [
        # mode (trainer_config.mode_errors)
        {
            "rule": "self.mode == 'Evaluate' || has(self.dataset.name) || has(self.dataset.train)",
            "message": "mode Train needs dataset.name or dataset.train (eval alone is for mode Evaluate)",
            "fieldPath": ".dataset",
        },
        {
            "rule": "self.mode == 'Train' || !has(self.lora)",
            "message": "lora is not allowed in mode Evaluate (nothing is trained); to evaluate a LoRA "
            "checkpoint, give its folder as model.uri",
            "fieldPath": ".lora",
        },
        {
            "rule": "self.mode == 'Train' || !has(self.hyperparameters.maxSteps)",
            "message": "maxSteps is not allowed in mode Evaluate (nothing is trained)",
            "fieldPath": ".hyperparameters.maxSteps",
        },
        {
            "rule": "self.mode == 'Train' || !has(self.hyperparameters.epochs)",
            "message": "epochs is not allowed in mode Evaluate (nothing is trained)",
            "fieldPath": ".hyperparameters.epochs",
        },
        {
            "rule": "self.mode == 'Train' || self.evaluation.atStart",
            "message": "atStart must be true in mode Evaluate (the step-0 evaluation is the result)",
            "fieldPath": ".evaluation.atStart",
        },
        *_evaluate_unused_rules(),
        *_absolute_file_rules(),
        # trainer_config.baseline_errors
        {
            "rule": "self.model.init != 'pretrained' || !has(self.evaluation.baselines) || "
            "!self.evaluation.baselines.exists(b, "
            f"{_model_key('b')} == {_model_key('self.model')})",
            "message": "evaluation.baselines lists the model being trained: its zero-shot result is the "
            "step-0 evaluation already (remove it from baselines)",
            "fieldPath": ".evaluation.baselines",
        },
        {
            "rule": "!has(self.lora) || self.model.init == 'pretrained'",
            "message": "lora needs model.init: pretrained (LoRA adapts existing weights)",
            "fieldPath": ".lora",
        },
        {
            "rule": "self.hyperparameters.batchSize % ((has(self.hyperparameters.microBatchSize) ? "
            "self.hyperparameters.microBatchSize : 1) * self.resources.nodes * "
            "self.resources.processesPerNode) == 0",
            "message": "hyperparameters.batchSize must be a multiple of microBatchSize * resources.nodes "
            "* resources.processesPerNode",
            "fieldPath": ".hyperparameters.batchSize",
        },
        {
            "rule": "!oldSelf.cancel || self.cancel",
            "message": "cancel cannot be undone: create a new FineTuneJob to train again",
            "fieldPath": ".cancel",
        },
    ],
    api.Toleration: [
        {
            "rule": "self.operator != 'Exists' || !has(self.value)",
            "message": "value must be empty when operator is Exists",
        },
        {
            "rule": "has(self.key) || self.operator == 'Exists'",
            "message": "a toleration without key must have operator Exists (it tolerates every taint)",
        },
        {
            "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "message": "tolerationSeconds is only allowed with effect NoExecute",
            "fieldPath": ".tolerationSeconds",
        },
    ],
}

# Fields frozen once training started (status.startTime set): a running job's results must
# describe one configuration, and its run folder must not move. Before the start they may change
# (the ConfigMap is re-rendered). Paths below spec.
IMMUTABLE_ONCE_STARTED = (
    "mode",
    "model",
    "dataset",
    "hyperparameters",
    "lora",
    "checkpoints.outputUri",
    "storage",
)
# Fields frozen once the batch Job exists (status.jobName set): they are in its pod template,
# which Kubernetes does not let change.
IMMUTABLE_ONCE_JOB_EXISTS = ("resources", "runPolicy")


# The subset of JSONSchemaProps the generator may emit (no $ref, patternProperties, propertyNames).
STRUCTURAL_KEYS = frozenset(
    {
        "type",
        "description",
        "default",
        "enum",
        "format",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "required",
        "properties",
        "items",
        "additionalProperties",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
    }
)


def root_rules() -> list[Rule]:
    """Rules on the whole object: the name (it becomes a Service and pod hostnames) and
    immutability of the training sections once started."""
    rules: list[Rule] = [
        {
            "rule": f"self.metadata.name.size() <= {api.JOB_NAME_MAX_LENGTH} && "
            f"self.metadata.name.matches('{api.JOB_NAME_PATTERN}')",
            "message": f"must be at most {api.JOB_NAME_MAX_LENGTH} characters of a-z, 0-9 and '-', "
            "starting with a letter (it names a Service and pod hostnames)",
            "fieldPath": ".metadata.name",
        }
    ]
    started = "has(oldSelf.status) && has(oldSelf.status.startTime)"
    job_exists = "has(oldSelf.status) && has(oldSelf.status.jobName)"
    frozen = [
        (path, started, "the job has started (status.startTime is set)") for path in IMMUTABLE_ONCE_STARTED
    ]
    frozen += [
        (path, job_exists, "its Job exists (status.jobName is set; a Job's pods cannot change)")
        for path in IMMUTABLE_ONCE_JOB_EXISTS
    ]
    for path, when, why in frozen:
        field = f"spec.{path}"
        same = (
            f"has(self.{field}) == has(oldSelf.{field}) && "
            f"(!has(self.{field}) || self.{field} == oldSelf.{field})"
        )
        rules.append(
            {
                "rule": f"!({when}) || ({same})",
                "message": f"{field} is immutable once {why}: create a new FineTuneJob",
                "fieldPath": f".{field}",
            }
        )
    return rules


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `model`, CEL rules included."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    by_name = _models_by_def_name(model)
    return _convert(schema, defs, by_name, model)


def _models_by_def_name(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `model`, by its JSON-schema definition name."""
    found: dict[str, type[BaseModel]] = {}
    todo: list[Any] = [model]
    while todo:
        current = todo.pop()
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            for arg in getattr(current, "__args__", ()):
                todo.append(arg)
            continue
        if current.__name__ in found:
            continue
        found[current.__name__] = current
        for info in current.model_fields.values():
            todo.append(info.annotation)
    return found


def _convert(
    node: dict[str, Any],
    defs: dict[str, Any],
    models: dict[str, type[BaseModel]],
    model: type[BaseModel] | None,
) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        merged = {**defs[name], **node}  # sibling keys (description, default) win
        return _convert(merged, defs, models, models.get(name))
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"unions are not structural: {variants}")
        if node.get("default", "missing") is None:
            node.pop("default")
        merged = {**variants[0], **node}
        return _convert(merged, defs, models, model)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "additionalProperties") and not isinstance(value, dict):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _convert(prop, defs, models, None) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _convert(value, defs, models, None)
        else:
            out[key] = value
    unknown = set(out) - STRUCTURAL_KEYS
    if unknown:
        raise ValueError(f"schema keys a CRD does not allow: {sorted(unknown)}")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "string" and out.get("pattern") in api.PATTERN_MESSAGES:
        pattern = out.pop("pattern")
        out["x-kubernetes-validations"] = [pattern_rule(pattern, api.PATTERN_MESSAGES[pattern])]
    if out.get("type") == "object" and "properties" in out:
        _default_sections(out, model)
        if model is not None and model in CEL_RULES:
            out["x-kubernetes-validations"] = CEL_RULES[model]
    return out


def _default_sections(node: dict[str, Any], model: type[BaseModel] | None) -> None:
    """A section with a default factory defaults to its model's defaults, written out (the API
    server checks a default against the section's CEL rules without nested defaulting)."""
    if model is None:
        return
    for name, info in model.model_fields.items():
        alias = info.alias or name
        prop = node["properties"].get(alias)
        if prop is not None and info.default_factory is not None and prop.get("type") == "object":
            default = info.default_factory()  # type: ignore[call-arg]
            prop["default"] = default.model_dump(mode="json", by_alias=True, exclude_none=True)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition for FineTuneJob."""
    spec_schema = structural(api.FineTuneJobSpec)
    status_schema = structural(api.FineTuneJobStatus)
    schema = {
        "type": "object",
        "description": "A fine-tuning (or training) run of a causal language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only name may be described under metadata; typed so that fieldPath can point at it.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": root_rules(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".status.model"},
    {"name": "Step", "type": "string", "jsonPath": ".status.progress.steps"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.latestEvaluation.loss"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.latestEvaluation.accuracy"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]

REFERENCE_PATH = CRD_PATH.parents[1] / "docs" / "api-reference.md"

# (section path, model) in the order of the reference page.
REFERENCE_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("spec", api.FineTuneJobSpec),
    ("spec.model (and spec.evaluation.baselines[])", trainer_config.ModelSpec),
    ("spec.dataset", trainer_config.DatasetSpec),
    ("spec.hyperparameters", trainer_config.Hyperparameters),
    ("spec.lora", trainer_config.LoraSpec),
    ("spec.evaluation", trainer_config.EvaluationSpec),
    ("spec.checkpoints", trainer_config.CheckpointSpec),
    ("spec.resources", api.ResourcesSpec),
    ("spec.resources.tolerations[]", api.Toleration),
    ("spec.storage", api.StorageSpec),
    ("spec.storage.credentialsSecret", api.SecretReference),
    ("spec.runPolicy", api.RunPolicy),
    ("status", api.FineTuneJobStatus),
    ("status.progress", api.Progress),
    ("status.evaluations[], status.latestEvaluation", api.Evaluation),
    ("status.baselines[]", api.Baseline),
    ("status.checkpoints[]", api.CheckpointRecord),
    ("status.conditions[]", api.Condition),
]


def render_reference() -> str:
    """docs/api-reference.md: every field's type, range, default and description, plus the
    CEL rules — generated from the same models as the CRD."""
    lines = [
        "<!-- Generated by `python -m finetune_operator.crdgen --write` from the typed models. Do not edit. -->",
        "# FineTuneJob field reference (finetune.dev/v1alpha1)",
        "",
        "Types, ranges, defaults and descriptions as the CRD schema enforces them; see docs/api.md for",
        "how to use them. `unset` means the field is optional with no default; `-` a section whose",
        "own fields carry the defaults.",
        "",
    ]
    for title, model in REFERENCE_SECTIONS:
        lines += [
            f"## {title}",
            "",
            "| field | type | range | default | description |",
            "|---|---|---|---|---|",
        ]
        for row in trainer_config.describe_fields(model):
            if row.name == "phase" and model is api.FineTuneJobStatus:
                row = row._replace(type="enum", range=" | ".join(p.value for p in api.Phase))
            description = row.description.replace("|", "\\|").replace("\n", " ")
            range_text = row.range.replace("|", "\\|")
            lines.append(f"| `{row.name}` | {row.type} | {range_text} | {row.default} | {description} |")
        rules = CEL_RULES.get(model, [])
        if rules:
            lines += ["", "Cross-field rules (CEL, enforced by the API server):", ""]
            lines += [f"- `{rule['rule']}` — {rule['message']}" for rule in rules]
        lines.append("")
    lines += ["## Whole-object rules", ""]
    lines += [f"- `{rule['rule']}` — {rule['message']}" for rule in root_rules()]
    return "\n".join(lines) + "\n"


HEADER = "# Generated by `python -m finetune_operator.crdgen --write` from the typed models. Do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Plain YAML: no anchors/aliases for rule lists shared between schemas."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    return HEADER + yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {CRD_PATH}")
    group.add_argument("--check", action="store_true", help=f"fail if {CRD_PATH} is stale")
    args = parser.parse_args(argv)
    outputs = {CRD_PATH: render(), REFERENCE_PATH: render_reference()}
    if args.write:
        for path, text in outputs.items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    elif args.check:
        stale = [p for p, text in outputs.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is stale: run python -m finetune_operator.crdgen --write", file=sys.stderr)
        return 1 if stale else 0
    else:
        sys.stdout.write(outputs[CRD_PATH])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
