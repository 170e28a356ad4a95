"""Two processes under torchrun (gloo on CPU) reach the loss of one process with the same global
batch, and only rank 0 writes to the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import contract
from tests.trainer.conftest import (
    TINY_LORA,
    TrainedRun,
    base_config,
    final_eval,
    flip_a_byte,
    run_trainer,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _launch(config: Path, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    """`finetune-trainer` with torchrun's PET_* variables, as the pod runs it: it starts torchrun."""
    env = {
        **os.environ,
        "FINETUNE_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        "FINETUNE_TERMINATION_LOG": str(tmp_path / f"termination-{name}"),
        "OMP_NUM_THREADS": "1",
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_match_one_process_with_the_same_global_batch(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    settings = {"maxSteps": 4, "batchSize": 4, "microBatchSize": 2}
    single = base_config(model_dir("llama"), text_data, tmp_path / "single", hyperparameters=settings)
    code, one = run_trainer(single, tmp_path, "single.json")  # gradient accumulation 2
    assert code == 0

    run = tmp_path / "ddp"
    config = write_config(
        tmp_path / "ddp.json", base_config(model_dir("llama"), text_data, run, hyperparameters=settings)
    )
    result = _launch(config, tmp_path, "ddp")
    assert result.returncode == contract.EXIT_OK, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "termination-ddp").read_text())
    assert [e["step"] for e in two["evaluations"]] == [0, 2, 4]
    for a, b in zip(one["evaluations"], two["evaluations"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["worldSize"] == 2
    # one DCP checkpoint for both ranks (the replicated state once), the manifest written last
    manifest = json.loads((run / "checkpoints" / "step-000004" / "manifest.json").read_text())
    assert manifest["format"] == "dcp"
    assert {"state/.metadata", "state/__0_0.distcp", "train_state.json"} <= {
        f["path"] for f in manifest["files"]
    }
    assert not any(f["path"].startswith(".ranks/") for f in manifest["files"])
    assert result.stdout.count("Step | Accuracy") == 1


def _terminated_after_a_checkpoint(config: Path, run: Path, tmp_path: Path, name: str) -> dict[str, Any]:
    """Start the launcher as `_launch` does, send it SIGTERM once the run folder holds a complete
    checkpoint (any: with `keepLast` the first may already be pruned when the test looks) and
    return the termination message of the exit it must make (143)."""
    import signal
    import time

    env = {
        **os.environ,
        "FINETUNE_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        "FINETUNE_TERMINATION_LOG": str(tmp_path / f"termination-{name}"),
        "OMP_NUM_THREADS": "1",
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "2",
    }
    log = tmp_path / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer", "--config", str(config)],
            env=env,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while not any((run / "checkpoints").glob("step-*/manifest.json")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no checkpoint before the exit or the deadline:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == contract.EXIT_TERMINATED, log.read_text()[-3000:]
    return dict(json.loads((tmp_path / f"termination-{name}").read_text()))


def test_invalid_input_keeps_its_exit_code_through_torchrun(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(
        model_dir("gpt2"), text_data, tmp_path / "run", hyperparameters={"batchSize": 3, "microBatchSize": 1}
    )  # 3 % (1 x 2 processes) != 0
    result = _launch(write_config(tmp_path / "bad.json", config), tmp_path, "bad")
    assert result.returncode == contract.EXIT_INVALID_INPUT, result.stderr[-2000:]
    summary = json.loads((tmp_path / "termination-bad").read_text())
    assert "not a multiple" in summary["message"]


def test_sigterm_to_the_launcher_checkpoints_every_rank_at_the_same_step(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "c.json",
        base_config(
            model_dir("llama"),
            text_data,
            run,
            hyperparameters={"maxSteps": 200, "batchSize": 4, "microBatchSize": 2},
            evaluation={"everySteps": 100},
            checkpoints={"everySteps": 5},
        ),
    )
    summary = _terminated_after_a_checkpoint(config, run, tmp_path, "stopped")
    assert summary["reason"] == "Terminated" and 5 <= summary["step"] < 200
    manifest = json.loads((run / "checkpoints" / f"step-{summary['step']:06d}" / "manifest.json").read_text())
    assert manifest["step"] == summary["step"], "both ranks saved the step they stopped at"
    assert {"state/.metadata", "train_state.json"} <= {f["path"] for f in manifest["files"]}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, False, id="nothing-set"),
        pytest.param({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"}, False, id="one-process"),
        pytest.param({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2"}, True, id="two-processes"),
        pytest.param({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}, True, id="two-nodes"),
        pytest.param({"PET_NNODES": "2", "RANK": "1"}, False, id="already-a-worker"),
    ],
)
def test_wants_launch(env: dict[str, str], expected: bool) -> None:
    from finetune_trainer.launch import wants_launch

    assert wants_launch(env) is expected


def test_worker_exit_codes_map_back_to_the_contract() -> None:
    from finetune_trainer.launch import exit_code_of

    assert exit_code_of([0, 3]) == contract.EXIT_INVALID_INPUT
    assert exit_code_of([143, -15]) == contract.EXIT_TERMINATED
    assert exit_code_of([1, 0]) == contract.EXIT_FAILURE
    assert exit_code_of([0, 0]) == contract.EXIT_OK


# ---- FSDP2 (hyperparameters.sharding: fsdp) ------------------------------------------------------
def _train_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def _assert_same_run(
    a: dict[str, object], b: dict[str, object], run_a: Path, run_b: Path, rel: float
) -> None:
    evaluations_a, evaluations_b = a["evaluations"], b["evaluations"]
    assert isinstance(evaluations_a, list) and isinstance(evaluations_b, list)
    assert [e["step"] for e in evaluations_a] == [e["step"] for e in evaluations_b]
    for x, y in zip(evaluations_a, evaluations_b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel), (x, y)
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9), (x, y)
    losses_a, losses_b = _train_losses(run_a), _train_losses(run_b)
    assert [s for s, _ in losses_a] == [s for s, _ in losses_b] and losses_a
    for (_, x), (_, y) in zip(losses_a, losses_b, strict=True):
        assert y == pytest.approx(x, rel=rel)


FIVE_STEPS = {"maxSteps": 5, "batchSize": 4, "microBatchSize": 1}  # accumulation 4 on 1 process, 2 on 2


def _launched(config: dict[str, Any], tmp_path: Path, name: str) -> dict[str, Any]:
    result = _launch(write_config(tmp_path / f"{name}.json", config), tmp_path, name)
    assert result.returncode == contract.EXIT_OK, result.stdout[-3000:] + result.stderr[-3000:]
    return dict(json.loads((tmp_path / f"termination-{name}").read_text()))


def test_fsdp_on_two_processes_equals_one_process_and_data_parallel(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    """5 steps in fp32 with the same global batch: FSDP on 2 processes equals one process and
    data parallel on 2 processes (training losses and evaluations within 1e-5 relative)."""
    model = model_dir("llama")
    evaluation = {"everySteps": 1, "logEverySteps": 1}

    def config(name: str, sharding: str) -> dict[str, Any]:
        return base_config(
            model,
            text_data,
            tmp_path / name,
            hyperparameters={**FIVE_STEPS, "sharding": sharding},
            evaluation=evaluation,
        )

    code, single = run_trainer(config("single", "data-parallel"), tmp_path, "single.json")
    assert code == contract.EXIT_OK, single
    fsdp = _launched(config("fsdp", "fsdp"), tmp_path, "fsdp")
    ddp = _launched(config("ddp", "data-parallel"), tmp_path, "ddp")
    assert [e["step"] for e in fsdp["evaluations"]] == [0, 1, 2, 3, 4, 5]
    _assert_same_run(single, fsdp, tmp_path / "single", tmp_path / "fsdp", rel=1e-5)
    _assert_same_run(ddp, fsdp, tmp_path / "ddp", tmp_path / "fsdp", rel=1e-5)
    manifest = json.loads((tmp_path / "fsdp" / "checkpoints" / "step-000005" / "manifest.json").read_text())
    assert manifest["format"] == "dcp"
    assert {"state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp", "train_state.json"} == {
        f["path"] for f in manifest["files"]
    }, "each rank's shard, then the manifest; no per-rank listing left behind"
    assert not (tmp_path / "fsdp" / "checkpoints" / "step-000005" / ".ranks").exists()

    # the model state each process holds (measured on its tensors after the first step)
    held = {name: _memory_record(tmp_path / name) for name in ("single", "ddp", "fsdp")}
    assert held["fsdp"]["measured"]["state"] <= 0.55 * held["ddp"]["measured"]["state"], held
    assert held["ddp"]["measured"]["state"] == held["single"]["measured"]["state"], "data parallel replicates"
    for name, record in held.items():  # kubectl finetune list models prints these estimates
        assert record["estimate"]["state"] == pytest.approx(record["measured"]["state"], rel=0.10), (
            name,
            record,
        )


def _memory_record(run: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["kind"] == "memory"]
    return dict(record)


def _fsdp_config(
    model: Path, data: dict[str, str], run: Path, steps: int, schedule: str = "linear"
) -> dict[str, Any]:
    # linear decay with warmup: a resumed run must continue the schedule, not only the weights
    # (constant: maxSteps 4 then 8 is the same run as 8 at once)
    return base_config(
        model,
        data,
        run,
        hyperparameters={
            "sharding": "fsdp",
            "maxSteps": steps,
            "batchSize": 4,
            "microBatchSize": 1,
            "lrScheduler": schedule,
            "warmupSteps": 2 if schedule == "linear" else 0,
            "learningRate": 3e-3,
        },
        evaluation={"everySteps": 4, "logEverySteps": 2},
        checkpoints={"everySteps": 4, "keepLast": 2},
    )


def test_fsdp_checkpoint_of_two_processes_resumes_on_one(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    """DCP reshards on load: a run checkpointed by 2 processes continues on 1 (same global
    batch) and ends where an uninterrupted run ends."""
    model = model_dir("llama")

    def config(run: str, steps: int) -> dict[str, Any]:
        return _fsdp_config(model, text_data, tmp_path / run, steps, schedule="constant")

    code, uninterrupted = run_trainer(config("whole", 8), tmp_path, "whole.json")
    assert code == contract.EXIT_OK, uninterrupted
    _launched(config("parts", 4), tmp_path, "first")
    code, resumed = run_trainer(config("parts", 8), tmp_path, "second.json")
    assert code == contract.EXIT_OK, resumed
    assert [e["step"] for e in resumed["evaluations"]] == [0, 4, 8]
    for a, b in zip(uninterrupted["evaluations"], resumed["evaluations"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_corrupt_shard_of_one_rank_makes_every_rank_resume_from_the_checkpoint_before(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    """Two processes, FSDP: a flipped byte in rank 1's shard of the newest checkpoint. Both ranks
    agree on the checkpoint before it (a rank alone must not resume elsewhere), the skipped one is
    reported, and the run ends as an uninterrupted one (constant schedule: 8 then 12 steps equals
    12 at once)."""
    model = model_dir("llama")

    def config(run: str, steps: int) -> dict[str, Any]:
        return _fsdp_config(model, text_data, tmp_path / run, steps, schedule="constant")

    whole = _launched(config("whole", 12), tmp_path, "whole")
    _launched(config("parts", 8), tmp_path, "first")  # checkpoints at 4 and 8
    flip_a_byte(tmp_path / "parts" / "checkpoints" / "step-000008" / "state" / "__1_0.distcp")
    resumed = _launched(config("parts", 12), tmp_path, "again")
    assert resumed["resumedFrom"]["step"] == 4
    [skipped] = resumed["resumedFrom"]["skipped"]
    assert skipped["step"] == 8 and "__1_0.distcp" in skipped["reason"] and "SHA-256" in skipped["reason"]
    assert [e["step"] for e in resumed["evaluations"]] == [e["step"] for e in whole["evaluations"]]
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(whole)["loss"], rel=1e-5)


def test_sigterm_under_fsdp_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    model = model_dir("llama")
    steps = 40
    code, uninterrupted = run_trainer(
        _fsdp_config(model, text_data, tmp_path / "whole", steps), tmp_path, "whole.json"
    )
    assert code == contract.EXIT_OK, uninterrupted

    run = tmp_path / "killed"
    config = write_config(tmp_path / "killed.json", _fsdp_config(model, text_data, run, steps))
    stopped = _terminated_after_a_checkpoint(config, run, tmp_path, "killed")
    assert stopped["reason"] == "Terminated" and 4 <= stopped["step"] < steps, stopped
    manifest = json.loads((run / "checkpoints" / f"step-{stopped['step']:06d}" / "manifest.json").read_text())
    assert {"state/__0_0.distcp", "state/__1_0.distcp"} <= {f["path"] for f in manifest["files"]}

    resumed = _launched(_fsdp_config(model, text_data, run, steps), tmp_path, "resumed")
    assert final_eval(resumed)["step"] == steps
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("strategy", "world_size", "precision", "lora", "gib"),
    [
        pytest.param("data-parallel", 8, "bf16", False, 90.15, id="gptj-data-parallel-does-not-fit-80gb"),
        pytest.param("fsdp", 8, "bf16", False, 11.27, id="gptj-fsdp-8-processes"),
        pytest.param("fsdp", 8, "bf16", True, 1.41, id="gptj-lora-bf16-base-fsdp"),
        pytest.param("data-parallel", 1, "fp32", True, 22.54, id="gptj-lora-fp32-base"),
    ],
)
def test_memory_estimates_per_process(
    strategy: str, world_size: int, precision: str, lora: bool, gib: float
) -> None:
    from finetune_trainer.memory import catalog_estimate

    estimate = catalog_estimate(
        "6.05B", strategy=strategy, world_size=world_size, precision=precision, lora=lora
    )
    assert estimate.state / 2**30 == pytest.approx(gib, abs=0.01)


def test_auto_shards_only_when_data_parallel_would_not_fit() -> None:
    from finetune_trainer.memory import resolve_strategy

    gpu = 80 * 2**30
    assert resolve_strategy("auto", world_size=8, data_parallel_bytes=97 * 10**9, device_bytes=gpu) == "fsdp"
    assert (
        resolve_strategy("auto", world_size=8, data_parallel_bytes=22 * 10**9, device_bytes=gpu)
        == "data-parallel"
    )
    assert (
        resolve_strategy("auto", world_size=1, data_parallel_bytes=97 * 10**9, device_bytes=gpu)
        == "data-parallel"
    )
    assert (
        resolve_strategy("auto", world_size=2, data_parallel_bytes=97 * 10**9, device_bytes=None)
        == "data-parallel"
    )
    assert resolve_strategy("fsdp", world_size=1, data_parallel_bytes=0, device_bytes=None) == "fsdp"


def _two_nodes(
    config: Path, tmp_path: Path, node1_config: Path | None = None, extra_env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun "nodes" of one process each on this machine, as a 2-pod job runs: node 1's
    only process is its local main but not the global main, and each node has its own cache."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for node in (0, 1):
        env = {
            **os.environ,
            "FINETUNE_CACHE_DIR": str(tmp_path / f"cache-node{node}"),
            "FINETUNE_TERMINATION_LOG": str(tmp_path / f"termination-node{node}"),
            "OMP_NUM_THREADS": "1",
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            **(extra_env or {}),
        }
        (tmp_path / f"termination-node{node}").write_text("")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer", "--config", str(node1_config if node and node1_config else config)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    results = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def _prepared_folders(cache: Path, kind: str) -> list[Path]:
    return [p for p in (cache / kind).iterdir() if not p.name.endswith(".partial")]


@pytest.mark.slow
def test_every_node_imports_the_catalog_gguf_model_in_full(tmp_path: Path) -> None:
    """smollm2-135m-instruct is a GGUF file: each node's local main process dequantizes it into
    its own cache, weights and config.json included, whatever its global rank."""
    data = ROOT / "examples" / "data" / "market-reports"
    config = write_config(tmp_path / "eval.json", {
        "mode": "Evaluate",
        "model": {"name": "smollm2-135m-instruct"},
        "dataset": {"eval": [f"file://{data}/eval.jsonl"], "format": "text"},
        "hyperparameters": {"batchSize": 2, "sequenceLength": 32},
        "evaluation": {"maxBatches": 1},
        "checkpoints": {"outputUri": f"file://{tmp_path / 'run'}/"},
    })  # fmt: skip

    results = _two_nodes(config, tmp_path)

    for node, result in enumerate(results):
        assert result.returncode == contract.EXIT_OK, f"node {node}: {result.stderr[-3000:]}"
    for node in (0, 1):
        [folder] = _prepared_folders(tmp_path / f"cache-node{node}", "gguf")
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, (node, files)
    summary = json.loads((tmp_path / "termination-node0").read_text())
    assert summary["phase"] == "Succeeded" and summary["evaluations"][0]["step"] == 0


def test_every_node_merges_a_lora_checkpoint_for_evaluation(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    """Evaluating a LoRA run's checkpoint on two nodes: each node merges the adapter into its
    own cache in full (not only node 0)."""
    training = trained("llama", lora=TINY_LORA)
    assert training.code == contract.EXIT_OK
    lora_run, text_data = training.run, training.data
    config = write_config(tmp_path / "eval.json", {
        "mode": "Evaluate",
        "model": {"uri": f"file://{lora_run}/checkpoints/step-000004/"},
        "dataset": {"eval": [text_data["eval"]], "format": "text"},
        "hyperparameters": {"batchSize": 2, "sequenceLength": 32},
        "checkpoints": {"outputUri": f"file://{tmp_path / 'eval-run'}/"},
    })  # fmt: skip

    results = _two_nodes(config, tmp_path)

    for node, result in enumerate(results):
        assert result.returncode == contract.EXIT_OK, f"node {node}: {result.stderr[-3000:]}"
    for node in (0, 1):
        [folder] = _prepared_folders(tmp_path / f"cache-node{node}", "merged")
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors"} <= files, (node, files)


def test_the_first_failing_rank_names_the_cause_its_peer_reports_a_lost_peer(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    """Node 1 cannot find its model; node 0 then fails in the next collective. Node 1's summary
    has the cause and the earlier failedAt; node 0's says PeerLost (a symptom)."""
    batch = {"batchSize": 4, "microBatchSize": 2}
    config = write_config(
        tmp_path / "c.json",
        base_config(model_dir("llama"), text_data, tmp_path / "run", hyperparameters=batch),
    )
    missing = base_config(tmp_path / "not-on-node-1", text_data, tmp_path / "run", hyperparameters=batch)
    node1_config = write_config(tmp_path / "c1.json", missing)

    # node 0 waits for node 1's token shards, then gives up after the collective timeout
    results = _two_nodes(config, tmp_path, node1_config, {contract.ENV_COLLECTIVE_TIMEOUT: "30"})

    assert [r.returncode for r in results] == [contract.EXIT_FAILURE, contract.EXIT_INVALID_INPUT]
    node0 = json.loads((tmp_path / "termination-node0").read_text())
    node1 = json.loads((tmp_path / "termination-node1").read_text())
    assert node1["rank"] == 1 and "not-on-node-1 does not exist" in node1["message"], node1
    assert node0["reason"] == "PeerLost" and node0["rank"] == 0, node0
    assert node1["failedAt"] < node0["failedAt"]
