"""Hypothesis strategies for FineTuneJob specs: near-valid manifests a user could write.

Each field is drawn from values on both sides of its rule (URIs with and without a bucket, an
absolute path, a space; label keys with and without a prefix; counts at and beyond their
bounds; lists with and without duplicates), so a run explores accepted and refused specs in
about equal measure. Used by the unit fuzz tests (Python validation alone) and by the
integration test that asks the real API server about the same specs (the CRD must agree).
Holds no tests.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_MISSING = object()

SEGMENTS = ["d", "runs", "a b", "x..y", "..", "model", "t.jsonl", "**/*.jsonl", "é", "k@v", "\t", ""]
URI_PREFIXES = ["s3://", "s3:///", "s3://Bucket/", "s3://b/", "file://", "file:///", "file://./", "hf://", "http://", ""]
LABEL_KEYS = [
    "gpu",
    "kubernetes.io/arch",
    "example.com/gpu-type",
    "a" * 63,
    "a" * 64,
    "-gpu",
    "gpu type",
    "Example.COM/gpu",
    "a/b/c",
    "/gpu",
    "gpu_",
    "g.p_u-1",
]
LABEL_VALUES = ["", "a100", "A-1.b_2", "a" * 63, "a" * 64, "bad value", "-x", "x-"]
ENDPOINTS = [
    "http://127.0.0.1:9000",
    "https://s3.example",
    "https://s3.example/path@v2",
    "https://KEY:SECRET@s3.example/",
    "http://user@minio:9000",
    "ftp://s3.example",
    "http://minio:9000/ x",
    "http:///",
]
IMAGES = ["trainer:1", "reg:5000/t@sha256:ab", " trainer:1", "trainer:1\n", "my trainer", ""]
REVISIONS = ["main", "v1.0", "step.1000/v1.0", "../x", "v1..2", "/abs", ".hidden", "a b", "refs/pr/1"]
MODEL_NAMES = ["pythia-70m", "pythia-160m", "gpt-j-6b", "smollm2-135m-instruct", "Pythia_70M!"]


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(_MISSING), strategy)


@st.composite
def uris(draw: st.DrawFn, *, folder: bool = False) -> str:
    prefix = draw(st.sampled_from(URI_PREFIXES))
    parts = draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3))
    text = prefix + "/".join(parts)
    if folder and draw(st.booleans()):
        text += "/"
    return text


@st.composite
def model_specs(draw: st.DrawFn) -> dict[str, Any]:
    model: dict[str, Any] = {}
    which = draw(st.sampled_from(["name", "uri", "both", "neither"]))
    if which in ("name", "both"):
        model["name"] = draw(st.sampled_from(MODEL_NAMES))
    if which in ("uri", "both"):
        model["uri"] = draw(uris())
    if draw(st.integers(0, 4)) == 0:
        model["init"] = draw(st.sampled_from(["pretrained", "scratch", "random"]))
    if draw(st.integers(0, 4)) == 0:
        model["revision"] = draw(st.sampled_from(REVISIONS))
    return model


@st.composite
def tolerations(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["key"] = draw(st.sampled_from(LABEL_KEYS))
    if draw(st.booleans()):
        out["operator"] = draw(st.sampled_from(["Exists", "Equal", "In"]))
    if draw(st.booleans()):
        out["value"] = draw(st.sampled_from(LABEL_VALUES))
    if draw(st.booleans()):
        out["effect"] = draw(st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]))
    if draw(st.booleans()):
        out["tolerationSeconds"] = draw(st.sampled_from([0, 60, -1]))
    return out


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not _MISSING:
        target[key] = value


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """A FineTuneJob spec (camelCase, as a user writes it)."""
    spec: dict[str, Any] = {}
    _put(spec, "mode", draw(optional(st.sampled_from(["Train", "Evaluate", "Test"]))))
    spec["model"] = draw(model_specs())
    dataset: dict[str, Any] = {}
    data_uri = st.builds(lambda u: u, uris())
    if draw(st.integers(0, 5)) == 0:
        dataset["name"] = draw(st.sampled_from(["reuters", "Bad_Name"]))
    _put(dataset, "train", draw(optional(st.lists(data_uri, min_size=0, max_size=3))))
    _put(dataset, "eval", draw(optional(st.lists(data_uri, min_size=1, max_size=2))))
    if draw(st.booleans()):
        dataset["train"] = ["s3://d/train.jsonl"]  # keep many specs valid
    spec["dataset"] = dataset

    hp: dict[str, Any] = {}
    _put(hp, "maxSteps", draw(optional(st.sampled_from([1, 10, 0]))))
    _put(hp, "epochs", draw(optional(st.sampled_from([1, 0.5, 0]))))
    _put(hp, "learningRate", draw(optional(st.sampled_from([5e-5, 1e-4, 0, 1.5]))))
    _put(hp, "lrScheduler", draw(optional(st.sampled_from(["linear", "cosine", "step"]))))
    _put(hp, "warmupSteps", draw(optional(st.sampled_from([0, 10, -1]))))
    _put(hp, "batchSize", draw(optional(st.sampled_from([8, 4, 6, 0]))))
    _put(hp, "microBatchSize", draw(optional(st.sampled_from([1, 2, 3]))))
    _put(hp, "dropout", draw(optional(st.sampled_from([0.0, 0.1, 1.5]))))
    _put(hp, "gradientCheckpointing", draw(optional(st.booleans())))
    _put(spec, "hyperparameters", draw(optional(st.just(hp))))

    if draw(st.integers(0, 3)) == 0:
        lora: dict[str, Any] = {"rank": draw(st.sampled_from([4, 0]))}
        _put(lora, "targetModules", draw(optional(st.lists(st.sampled_from(["q_proj", "v_proj", ""]), max_size=3))))
        spec["lora"] = lora
    if draw(st.booleans()):
        baselines = draw(st.lists(model_specs(), max_size=3))
        if draw(st.booleans()):
            baselines.append(dict(spec["model"]))  # the model itself
        spec["evaluation"] = {"baselines": baselines}
    if draw(st.integers(0, 3)) == 0:
        spec["checkpoints"] = {"outputUri": draw(uris(folder=True))}
        _put(spec["checkpoints"], "everySteps", draw(optional(st.sampled_from([500, 5]))))

    resources: dict[str, Any] = {}
    _put(resources, "nodes", draw(optional(st.sampled_from([1, 2]))))
    _put(
        resources,
        "nodeSelector",
        draw(optional(st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=2))),
    )
    _put(resources, "tolerations", draw(optional(st.lists(tolerations(), max_size=2))))
    _put(resources, "image", draw(optional(st.sampled_from(IMAGES))))
    if resources:
        spec["resources"] = resources
    storage: dict[str, Any] = {}
    _put(storage, "endpoint", draw(optional(st.sampled_from(ENDPOINTS))))
    _put(storage, "runsUri", draw(optional(uris(folder=True))))
    if storage:
        spec["storage"] = storage
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.sampled_from(["learningrate", "bogus"]))] = 1
    return spec
