"""The real API server rejects invalid FineTuneJobs with messages naming the field and what is
allowed (OpenAPI schema + CEL rules of the generated CRD). No operator runs here."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, SpecError, parse_spec
from tests.integration.operator_env import manifest
from tests.kube import ClusterHandle
from tests.operator.factories import spec as factory_spec
from tests.strategies import AGREEMENT_EXAMPLES, AGREEMENT_SEED, seeded_specs
from tests.validation_cases import CLOSE_BUT_VALID, GAPS

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("crd")]


def with_spec(**changes: Any) -> dict[str, Any]:
    obj = manifest("bad")
    for path, value in changes.items():
        node = obj["spec"]
        parts = path.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return obj


def named(name: str) -> dict[str, Any]:
    obj = manifest("x")
    obj["metadata"]["name"] = name
    return obj


def no_spec() -> dict[str, Any]:
    obj = manifest("bad")
    del obj["spec"]
    return obj


INVALID = [
    ("no-spec", no_spec(), ["spec: Required value"]),
    ("no-model", with_spec(model=None), ["spec.model: Required value"]),
    ("no-dataset", with_spec(dataset=None), ["spec.dataset: Required value"]),
    (
        "model-name-and-uri",
        with_spec(model={"name": "pythia-70m", "uri": "hf://EleutherAI/pythia-70m"}),
        ["spec.model: Invalid value", "exactly one of name (a catalog model) or uri"],
    ),
    (
        "model-neither",
        with_spec(model={"init": "pretrained"}),
        ["spec.model: Invalid value", "exactly one of name"],
    ),
    (
        "model-init-enum",
        with_spec(model__init="random"),
        ['spec.model.init: Unsupported value: "random"', '"pretrained", "scratch"'],
    ),
    (
        "model-uri-scheme",
        with_spec(model={"uri": "http://example.com/m"}),
        [
            "spec.model.uri: Invalid value",
            "must be s3://<bucket>/<path>, file:///<absolute path> or hf://<org>/<name>",
        ],
    ),
    ("model-name-pattern", with_spec(model={"name": "Pythia_70M!"}), ["spec.model.name: Invalid value"]),
    (
        "dataset-name-and-train",
        with_spec(dataset={"name": "reuters", "train": ["s3://d/t.jsonl"]}),
        [
            "spec.dataset: Invalid value",
            "name (a registered dataset) and train (a list of URIs) are exclusive",
        ],
    ),
    (
        "dataset-no-source",
        with_spec(dataset={"format": "text"}),
        [
            "spec.dataset: Invalid value",
            "set name (a registered dataset), train (a list of URIs) or, in mode Evaluate, eval",
        ],
    ),
    (
        "group-by-length-with-packing",
        with_spec(dataset={"train": ["s3://d/t.jsonl"], "groupByLength": True}),
        ["spec.dataset.groupByLength: Invalid value", "groupByLength: true needs packing: false"],
    ),
    (
        "train-mode-needs-training-data",
        with_spec(dataset={"eval": ["s3://d/e.jsonl"]}),
        ["spec.dataset: Invalid value", "mode Train needs dataset.name or dataset.train"],
    ),
    (
        "mode-enum",
        with_spec(mode="Test"),
        ['spec.mode: Unsupported value: "Test"', '"Train", "Evaluate"'],
    ),
    (
        "evaluate-max-steps",
        with_spec(mode="Evaluate"),
        ["spec.hyperparameters.maxSteps: Invalid value", "maxSteps is not allowed in mode Evaluate"],
    ),
    (
        "evaluate-epochs",
        with_spec(mode="Evaluate", hyperparameters={"epochs": 1, "batchSize": 4}),
        ["spec.hyperparameters.epochs: Invalid value", "epochs is not allowed in mode Evaluate"],
    ),
    (
        "evaluate-lora",
        with_spec(mode="Evaluate", hyperparameters={"batchSize": 4}, lora={"rank": 4}),
        ["spec.lora: Invalid value", "lora is not allowed in mode Evaluate", "give its folder as model.uri"],
    ),
    (
        "evaluate-at-start",
        with_spec(mode="Evaluate", hyperparameters={"batchSize": 4}, evaluation={"atStart": False}),
        ["spec.evaluation.atStart: Invalid value", "atStart must be true in mode Evaluate"],
    ),
    (
        "dataset-train-empty",
        with_spec(dataset={"train": []}),
        ["spec.dataset.train: Invalid value", "should have at least 1 items"],
    ),
    (
        "dataset-format-enum",
        with_spec(dataset__format="parquet"),
        ['spec.dataset.format: Unsupported value: "parquet"', '"text", "prompt-completion", "chat"'],
    ),
    (
        "dropout-above-1",
        with_spec(hyperparameters__dropout=1.5),
        [
            "spec.hyperparameters.dropout: Invalid value: 1.5: spec.hyperparameters.dropout in body should be less than or equal to 1"
        ],
    ),
    (
        "learning-rate-zero",
        with_spec(hyperparameters__learningRate=0),
        ["spec.hyperparameters.learningRate: Invalid value: 0", "should be greater than 0"],
    ),
    (
        "batch-size-zero",
        with_spec(hyperparameters__batchSize=0),
        ["spec.hyperparameters.batchSize: Invalid value: 0", "should be greater than or equal to 1"],
    ),
    (
        "batch-size-type",
        with_spec(hyperparameters__batchSize="eight"),
        ['spec.hyperparameters.batchSize: Invalid value: "string"', "must be of type integer"],
    ),
    (
        "precision-enum",
        with_spec(hyperparameters__precision="int8"),
        ['spec.hyperparameters.precision: Unsupported value: "int8"', '"fp32", "bf16", "fp16"'],
    ),
    (
        "steps-and-epochs",
        with_spec(hyperparameters__epochs=1),
        ["spec.hyperparameters: Invalid value", "maxSteps and epochs are exclusive"],
    ),
    (
        "warmup-steps-and-ratio",
        with_spec(hyperparameters__warmupSteps=10, hyperparameters__warmupRatio=0.1),
        ["warmupSteps and warmupRatio are exclusive"],
    ),
    (
        "micro-batch-divides",
        with_spec(hyperparameters__microBatchSize=3),
        [
            "spec.hyperparameters.microBatchSize: Invalid value",
            "batchSize must be a multiple of microBatchSize",
        ],
    ),
    (
        "world-size-divides",
        with_spec(resources={"nodes": 3}),
        [
            "spec.hyperparameters.batchSize: Invalid value",
            "multiple of microBatchSize * resources.nodes * resources.processesPerNode",
        ],
    ),
    (
        "lora-needs-pretrained",
        with_spec(model={"name": "pythia-70m", "init": "scratch"}, lora={"rank": 8}),
        ["spec.lora: Invalid value", "lora needs model.init: pretrained"],
    ),
    (
        "lora-rank-zero",
        with_spec(lora={"rank": 0}),
        ["spec.lora.rank: Invalid value: 0", "greater than or equal to 1"],
    ),
    ("nodes-zero", with_spec(resources={"nodes": 0}), ["spec.resources.nodes: Invalid value: 0"]),
    (
        "memory-quantity",
        with_spec(resources={"memory": "lots"}),
        ['spec.resources.memory: Invalid value: "lots"'],
    ),
    (
        "grace-too-short",
        with_spec(runPolicy={"terminationGracePeriodSeconds": 5}),
        ["spec.runPolicy.terminationGracePeriodSeconds: Invalid value: 5", "greater than or equal to 30"],
    ),
    (
        "output-uri-needs-slash",
        with_spec(checkpoints={"outputUri": "s3://bucket/run"}),
        ["spec.checkpoints.outputUri: Invalid value"],
    ),
    (
        "endpoint-scheme",
        with_spec(storage={"endpoint": "ftp://s3.local"}),
        ["spec.storage.endpoint: Invalid value"],
    ),
    (
        "toleration-exists-with-value",
        with_spec(resources={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}),
        ["spec.resources.tolerations[0]: Invalid value", "value must be empty when operator is Exists"],
    ),
    (
        "baseline-neither",
        with_spec(evaluation={"baselines": [{"revision": "main"}]}),
        ["spec.evaluation.baselines[0]: Invalid value", "exactly one of name"],
    ),
    (
        "unknown-field",
        with_spec(hyperparameters__learningrate=0.1),
        ['unknown field "spec.hyperparameters.learningrate"'],
    ),
    ("name-starts-with-digit", named("1job"), ["metadata.name: Invalid value", "starting with a letter"]),
    ("name-too-long", named("a" * 53), ["metadata.name: Invalid value", "must be at most 52 characters"]),
]


@pytest.mark.parametrize(
    ("obj", "expected"), [pytest.param(obj, expected, id=case) for case, obj, expected in INVALID]
)
def test_invalid_manifest_rejected(
    cluster: ClusterHandle, namespace: str, obj: dict[str, Any], expected: list[str]
) -> None:
    result = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
    )
    assert result.returncode != 0, f"accepted: {json.dumps(obj.get('spec', obj))}"
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"


def test_valid_manifest_gets_defaults(cluster: ClusterHandle, namespace: str) -> None:
    out = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(manifest("ok")),
    )
    spec = json.loads(out.stdout)["spec"]
    assert spec["hyperparameters"]["learningRate"] == 5e-05
    assert spec["hyperparameters"]["dropout"] == 0
    assert spec["resources"] == {"nodes": 1, "processesPerNode": 1, "gpus": 0}
    assert spec["runPolicy"]["backoffLimit"] == 0
    assert spec["suspend"] is False and spec["cancel"] is False
    assert spec["mode"] == "Train"
    assert "lora" not in spec, "no LoRA unless asked for"


def test_valid_evaluate_manifest(cluster: ClusterHandle, namespace: str) -> None:
    obj = manifest(
        "evaluation",
        mode="Evaluate",
        dataset={"eval": ["file:///standin/ok/eval.jsonl"]},
        hyperparameters={"batchSize": 4},
        checkpoints={},
    )
    out = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(obj)
    )
    spec = json.loads(out.stdout)["spec"]
    assert (spec["mode"], spec["dataset"]["eval"], spec["evaluation"]["atStart"]) == (
        "Evaluate",
        ["file:///standin/ok/eval.jsonl"],
        True,
    )
    assert "maxSteps" not in spec["hyperparameters"] and "train" not in spec["dataset"]


def _create_started(cluster: ClusterHandle, namespace: str, name: str, **status_fields: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest(name)))
    status = {"status": {"phase": "Running", "startTime": "2026-11-29T06:00:00Z", **status_fields}}
    cluster.kubectl(
        "patch",
        "ftj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        pytest.param({"spec": {"model": {"name": "pythia-160m"}}}, "spec.model: Invalid value", id="model"),
        pytest.param(
            {"spec": {"dataset": {"train": ["file:///standin/ok/other.jsonl"]}}},
            "spec.dataset: Invalid value",
            id="dataset",
        ),
        pytest.param(
            {"spec": {"hyperparameters": {"learningRate": 0.001}}},
            "spec.hyperparameters: Invalid value",
            id="hyperparameters",
        ),
        pytest.param({"spec": {"lora": {"rank": 4}}}, "spec.lora: Invalid value", id="lora-added"),
        pytest.param(
            {"spec": {"mode": "Evaluate", "hyperparameters": {"maxSteps": None}}},
            "spec.mode: Invalid value",
            id="mode",
        ),
    ],
)
def test_training_sections_immutable_once_started(
    cluster: ClusterHandle, namespace: str, patch: dict[str, Any], fragment: str
) -> None:
    _create_started(cluster, namespace, "started")
    result = cluster.kubectl(
        "patch", "ftj", "started", "-n", namespace, "--type=merge", "-p", json.dumps(patch), check=False
    )
    assert result.returncode != 0
    assert fragment in result.stderr and "immutable once the job has started" in result.stderr, result.stderr


def test_changes_allowed_before_start_and_outside_training_sections(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest("fresh")))
    cluster.kubectl(
        "patch",
        "ftj",
        "fresh",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"hyperparameters": {"learningRate": 0.001}}}),
    )
    _create_started(cluster, namespace, "running")
    for change in ({"suspend": True}, {"evaluation": {"everySteps": 3}}, {"runPolicy": {"backoffLimit": 2}}):
        cluster.kubectl(
            "patch", "ftj", "running", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": change})
        )


def test_cancel_cannot_be_undone(cluster: ClusterHandle, namespace: str) -> None:
    obj = copy.deepcopy(manifest("cancelled"))
    obj["spec"]["cancel"] = True
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(obj))
    result = cluster.kubectl(
        "patch",
        "ftj",
        "cancelled",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"cancel":false}}',
        check=False,
    )
    assert result.returncode != 0
    assert "spec.cancel: Invalid value" in result.stderr and "cancel cannot be undone" in result.stderr, (
        result.stderr
    )


# ---------------------------------------------------------------------------------------------
# the validation gaps, and the CRD agreeing with the Python validation


# Where the API server's own wording differs from the Python validation's (same rule).
SERVER_WORDING = {
    "baselines-twice-by-name": "each baseline model may be listed once",
    "baselines-twice-by-uri": "each baseline model may be listed once",
    "train-twice": "Duplicate value",
    "eval-twice": "Duplicate value",
    "lora-modules-twice": "Duplicate value",
    "node-selector-value-long": "Too long",
    "baseline-is-the-model": "evaluation.baselines lists the model being trained",
    "baseline-is-the-model-uri": "evaluation.baselines lists the model being trained",
}


def _gap_manifest(overrides: dict[str, Any]) -> dict[str, Any]:
    """The very spec the unit tests give `parse_spec` (tests/operator/factories.spec)."""
    obj = manifest("gap")
    obj["spec"] = factory_spec(**overrides)
    return obj


@pytest.mark.parametrize(
    ("case", "overrides", "field", "message"), [pytest.param(p.id, *p.values, id=p.id) for p in GAPS]
)
def test_validation_gaps_refused_by_the_api_server(
    cluster: ClusterHandle, namespace: str, case: str, overrides: dict[str, Any], field: str, message: str
) -> None:
    """The earliest layer: `kubectl apply` answers, naming the field; nothing is created."""
    obj = _gap_manifest(overrides)
    result = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
    )
    assert result.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    base = field.split("[")[0]
    assert base in result.stderr or base.rsplit(".", 1)[0] in result.stderr, result.stderr
    assert SERVER_WORDING.get(case, message) in result.stderr, result.stderr


@pytest.mark.parametrize("overrides", CLOSE_BUT_VALID)
def test_close_but_valid_specs_accepted_by_the_api_server(
    cluster: ClusterHandle, namespace: str, overrides: dict[str, Any]
) -> None:
    obj = _gap_manifest(overrides)
    result = cluster.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def custom_api(cluster: ClusterHandle) -> Any:
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(str(cluster.kubeconfig)))


def _server_verdict(custom_api: Any, namespace: str, spec: dict[str, Any]) -> tuple[bool, str]:
    from kubernetes.client.rest import ApiException

    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "fuzz"}, "spec": spec}
    try:
        custom_api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as exc:
        if exc.status in (400, 422):
            return False, str(json.loads(exc.body).get("message"))
        raise
    return True, ""


def test_the_crd_and_the_python_validation_agree(custom_api: Any, namespace: str) -> None:
    """Generated near-valid specs: each accepted by the API server (schema + CEL, strict field
    validation) is accepted by `parse_spec`, and each refused by one is refused by the other.
    The specs come from fixed seeds (`tests.strategies.seeded_specs`): the same on every run;
    a disagreement names its seed, replayed with `seeded_spec(seed)`."""
    disagreements = []
    for seed, spec in seeded_specs(AGREEMENT_SEED, AGREEMENT_EXAMPLES):
        accepted, why = _server_verdict(custom_api, namespace, spec)
        try:
            parse_spec(spec)
            python, python_why = True, ""
        except SpecError as exc:
            python, python_why = False, "; ".join(exc.errors)
        if accepted != python:
            disagreements.append(
                f"seed {seed}: API server {'accepts' if accepted else 'refuses: ' + why}; Python "
                f"{'accepts' if python else 'refuses: ' + python_why}; spec: {json.dumps(spec)}"
            )
    assert not disagreements, (
        f"{len(disagreements)} of {AGREEMENT_EXAMPLES} specs (seeds {AGREEMENT_SEED}..."
        f"{AGREEMENT_SEED + AGREEMENT_EXAMPLES - 1}); replay one with "
        "`from tests.strategies import seeded_spec; seeded_spec(<seed>)`:\n" + "\n".join(disagreements)
    )


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        pytest.param(
            {"spec": {"checkpoints": {"outputUri": "file:///elsewhere/"}}},
            "spec.checkpoints.outputUri: Invalid value",
            id="output-uri",
        ),
        pytest.param(
            {"spec": {"storage": {"runsUri": "s3://other/"}}}, "spec.storage: Invalid value", id="runs-uri"
        ),
        pytest.param(
            {"spec": {"storage": {"endpoint": "http://127.0.0.1:9999"}}},
            "spec.storage: Invalid value",
            id="endpoint",
        ),
    ],
)
def test_run_folder_and_storage_immutable_once_started(
    cluster: ClusterHandle, namespace: str, patch: dict[str, Any], fragment: str
) -> None:
    _create_started(cluster, namespace, "started")
    result = cluster.kubectl(
        "patch", "ftj", "started", "-n", namespace, "--type=merge", "-p", json.dumps(patch), check=False
    )
    assert result.returncode != 0
    assert fragment in result.stderr and "immutable once the job has started" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"spec": {"resources": {"memory": "2Gi"}}}, id="memory"),
        pytest.param({"spec": {"resources": {"nodeSelector": {"gpu": "a100"}}}}, id="node-selector"),
        pytest.param({"spec": {"runPolicy": {"backoffLimit": 5}}}, id="backoff-limit"),
        pytest.param({"spec": {"runPolicy": {"ttlSecondsAfterFinished": 0}}}, id="ttl"),
    ],
)
def test_resources_and_run_policy_immutable_once_the_job_exists(
    cluster: ClusterHandle, namespace: str, patch: dict[str, Any]
) -> None:
    """They are in the Job's pod template, which cannot change: refused, not silently ignored."""
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest("pending")))
    cluster.kubectl("patch", "ftj", "pending", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    _create_started(cluster, namespace, "created", jobName="created")
    result = cluster.kubectl(
        "patch", "ftj", "created", "-n", namespace, "--type=merge", "-p", json.dumps(patch), check=False
    )
    assert result.returncode != 0
    assert "immutable once its Job exists" in result.stderr, result.stderr
