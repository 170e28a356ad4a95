"""Hypothesis strategies for FineTuneJob specs: near-valid manifests a user could write.

Each field is drawn from values on both sides of its rule (URIs with and without a bucket, an
absolute path, a space; label keys with and without a prefix; counts at and beyond their
bounds; lists with and without duplicates), so a run explores accepted and refused specs in
about equal measure. Used by the unit fuzz tests (Python validation alone) and by the
integration test that asks the real API server about the same specs (the CRD must agree).
Holds no tests.

Hypothesis favours edge cases (the last branch of a choice, the bounds of a range), which would
put a fault in nearly every field at once; so each spec is built from one seeded
`random.Random` that Hypothesis draws (and reports with a failing example), with fixed odds per
field: about half the specs are valid.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st

_MISSING = object()

SEGMENTS = ["d", "runs", "a b", "x..y", "..", "model", "t.jsonl", "**/*.jsonl", "é", "k@v", "\t", ""]
URI_PREFIXES = [
    "s3://",
    "s3:///",
    "s3://Bucket/",
    "s3://b/",
    "file://",
    "file:///",
    "file://./",
    "hf://",
    "http://",
    "",
]
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


def _optional(rng: random.Random, make: Any, odds: float = 1 / 3) -> Any:
    """Present with `odds` (a spec sets few fields, so it holds few faults at a time)."""
    return make() if rng.random() < odds else _MISSING


def _mostly(rng: random.Random, good: list[Any], bad: list[Any], odds: float = 0.95) -> Any:
    """A valid value with `odds`, else one of `bad`."""
    return rng.choice(good) if rng.random() < odds or not bad else rng.choice(bad)


GOOD_MODEL_URIS = ["s3://models/pythia-70m/", "file:///models/tiny/", "hf://EleutherAI/pythia-70m"]
GOOD_DATA_URIS = ["s3://d/train.jsonl", "file:///data/a.jsonl", "s3://d/x/**/*.jsonl", "s3://d/b.txt"]
GOOD_RUN_URIS = ["s3://runs/exp/", "file:///runs/x/", "s3://runs/"]


def uri(rng: random.Random, good: list[str], *, folder: bool = False) -> str:
    """One of `good` mostly, else built from prefixes and segments on both sides of the rules."""
    if rng.random() < 0.9:
        return rng.choice(good)
    text = rng.choice(URI_PREFIXES) + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(0, 3)))
    return text + "/" if folder and rng.random() < 0.5 else text


def model_spec(rng: random.Random) -> dict[str, Any]:
    model: dict[str, Any] = {}
    which = _mostly(rng, ["name", "uri"], ["both", "neither"])
    if which in ("name", "both"):
        model["name"] = _mostly(rng, MODEL_NAMES[:4], MODEL_NAMES[4:])
    if which in ("uri", "both"):
        model["uri"] = uri(rng, GOOD_MODEL_URIS)
    if rng.random() < 0.2:
        model["init"] = _mostly(rng, ["pretrained", "scratch"], ["random"])
    if rng.random() < 0.2:
        model["revision"] = _mostly(rng, ["main", "v1.0", "step.1000/v1.0", "refs/pr/1"], REVISIONS)
    return model


def toleration(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < 0.75:
        out["key"] = _mostly(rng, LABEL_KEYS[:5], LABEL_KEYS[5:])
    out["operator"] = _mostly(rng, ["Exists", "Equal"], ["In"])
    if out["operator"] == "Equal" or rng.random() < 0.2:
        out["value"] = _mostly(rng, LABEL_VALUES[:4], LABEL_VALUES[4:])
    if rng.random() < 0.5:
        out["effect"] = rng.choice(["NoSchedule", "PreferNoSchedule", "NoExecute"])
    if rng.random() < 0.25:
        out["tolerationSeconds"] = _mostly(rng, [0, 60], [-1])
    return out


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not _MISSING:
        target[key] = value


def build_spec(rng: random.Random) -> dict[str, Any]:
    """A FineTuneJob spec (camelCase, as a user writes it); about half of them valid."""
    spec: dict[str, Any] = {}
    _put(spec, "mode", _optional(rng, lambda: _mostly(rng, ["Train", "Evaluate"], ["Test"])))
    spec["model"] = model_spec(rng)
    dataset: dict[str, Any] = {}
    if rng.random() < 0.15:
        dataset["name"] = _mostly(rng, ["reuters"], ["Bad_Name"])
    else:
        dataset["train"] = [uri(rng, GOOD_DATA_URIS) for _ in range(rng.randint(1, 2))]
    _put(
        dataset, "eval", _optional(rng, lambda: [uri(rng, GOOD_DATA_URIS) for _ in range(rng.randint(1, 2))])
    )
    spec["dataset"] = dataset

    hp: dict[str, Any] = {}
    for key, good, bad in (
        ("maxSteps", [1, 10], [0]),
        ("learningRate", [5e-5, 1e-4], [0, 1.5]),
        ("lrScheduler", ["linear", "cosine"], ["step"]),
        ("warmupSteps", [0, 10], [-1]),
        ("batchSize", [8, 4], [6, 0]),
        ("microBatchSize", [1, 2], [3]),
        ("dropout", [0.0, 0.1], [1.5]),
        ("gradientCheckpointing", [False, True], []),
    ):
        _put(hp, key, _optional(rng, lambda good=good, bad=bad: _mostly(rng, good, bad)))
    if rng.random() < 0.1:
        hp["epochs"] = _mostly(rng, [1, 0.5], [0])
    _put(spec, "hyperparameters", _optional(rng, lambda: hp, odds=2 / 3))

    if rng.random() < 0.25:
        lora: dict[str, Any] = {"rank": _mostly(rng, [4], [0])}

        def modules() -> list[str]:
            return [_mostly(rng, ["q_proj", "v_proj", "k_proj"], [""]) for _ in range(rng.randint(1, 3))]

        _put(lora, "targetModules", _optional(rng, modules))
        spec["lora"] = lora
    if rng.random() < 1 / 3:
        baselines = [model_spec(rng) for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.25:
            baselines.append(dict(spec["model"]))  # the model itself
        spec["evaluation"] = {"baselines": baselines}
    if rng.random() < 0.2:
        spec["evaluation"] = {**spec.get("evaluation", {}), "everySteps": 10}  # maybe no baselines key
    if rng.random() < 0.25:
        spec["checkpoints"] = {"outputUri": uri(rng, GOOD_RUN_URIS, folder=True)}
        _put(spec["checkpoints"], "everySteps", _optional(rng, lambda: rng.choice([500, 5])))

    resources: dict[str, Any] = {}
    _put(resources, "nodes", _optional(rng, lambda: rng.choice([1, 2])))

    def selector() -> dict[str, str]:
        return {
            _mostly(rng, LABEL_KEYS[:5], LABEL_KEYS[5:]): _mostly(rng, LABEL_VALUES[:4], LABEL_VALUES[4:])
            for _ in range(rng.randint(0, 2))
        }

    _put(resources, "nodeSelector", _optional(rng, selector))
    _put(
        resources, "tolerations", _optional(rng, lambda: [toleration(rng) for _ in range(rng.randint(0, 2))])
    )
    _put(resources, "image", _optional(rng, lambda: _mostly(rng, IMAGES[:2], IMAGES[2:])))
    if resources:
        spec["resources"] = resources
    storage: dict[str, Any] = {}
    _put(storage, "endpoint", _optional(rng, lambda: _mostly(rng, ENDPOINTS[:3], ENDPOINTS[3:])))
    _put(storage, "runsUri", _optional(rng, lambda: uri(rng, GOOD_RUN_URIS, folder=True)))
    if storage:
        spec["storage"] = storage
    if rng.random() < 0.05:
        spec[rng.choice(["learningrate", "bogus"])] = 1
    return spec


def specs() -> st.SearchStrategy[dict[str, Any]]:
    return st.randoms(use_true_random=True).map(build_spec)


# The specs the CRD-vs-Python agreement test (tests/integration/test_operator_validation.py) asks
# the API server about: fixed seeds, so every run and machine sends the same specs, and a
# disagreement printed with its seed is replayed with `seeded_spec(seed)`.
AGREEMENT_SEED = 20261204
AGREEMENT_EXAMPLES = 150


def seeded_spec(seed: int) -> dict[str, Any]:
    """The spec `build_spec` makes from `random.Random(seed)`: the same on every run."""
    return build_spec(random.Random(seed))


def seeded_specs(
    seed: int = AGREEMENT_SEED, count: int = AGREEMENT_EXAMPLES
) -> list[tuple[int, dict[str, Any]]]:
    """(seed, spec) for the seeds seed, seed + 1, …, seed + count - 1."""
    return [(s, seeded_spec(s)) for s in range(seed, seed + count)]
