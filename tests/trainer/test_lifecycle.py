"""The trainer as a pod runs it: a separate process, SIGTERM, restart and resume; the progress
endpoint and Prometheus metrics while it runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import contract
from finetune_trainer.telemetry import Progress, serve
from tests.trainer.conftest import TrainedRun, base_config, final_eval, flip_a_byte, write_config

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(config: Path, tmp_path: Path, name: str, port: int = 0) -> tuple[subprocess.Popen[bytes], Path]:
    env = {
        **os.environ,
        "FINETUNE_CONFIG": str(config),
        "FINETUNE_CACHE_DIR": str(tmp_path / "cache"),
        "FINETUNE_TERMINATION_LOG": str(tmp_path / f"termination-{name}"),
        "FINETUNE_PROGRESS_PORT": str(port),
        "POD_IP": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    with (tmp_path / f"{name}.log").open("wb") as log:  # the child keeps its own copy of the file
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return process, tmp_path / f"termination-{name}"


def _wait(predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _slow_config(model: Path, data: dict[str, str], run: Path, steps: int = 60) -> dict[str, Any]:
    # linear decay with warmup: the resumed run must restore the scheduler, not just the weights
    return base_config(
        model,
        data,
        run,
        hyperparameters={"maxSteps": steps, "lrScheduler": "linear", "warmupSteps": 5, "learningRate": 3e-3},
        evaluation={"everySteps": 20, "logEverySteps": 5},
        checkpoints={"everySteps": 10, "keepLast": 2},
    )


def test_sigterm_checkpoints_exits_retryable_and_the_restart_matches_an_uninterrupted_run(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    model = model_dir("llama")
    whole_config = write_config(tmp_path / "whole.json", _slow_config(model, text_data, tmp_path / "whole"))
    process, termination = _start(whole_config, tmp_path, "whole")
    assert process.wait(timeout=180) == contract.EXIT_OK
    uninterrupted = json.loads(termination.read_text())

    run = tmp_path / "killed"
    config = write_config(tmp_path / "killed.json", _slow_config(model, text_data, run))
    process, termination = _start(config, tmp_path, "first")
    _wait(
        lambda: (run / "checkpoints" / "step-000010" / "manifest.json").exists(),
        120,
        "the first checkpoint",
        process,
    )
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == contract.EXIT_TERMINATED
    stopped = json.loads(termination.read_text())
    assert stopped["reason"] == "Terminated" and 10 <= stopped["step"] < 60, stopped
    assert (run / "checkpoints" / f"step-{stopped['step']:06d}" / "manifest.json").exists()

    process, termination = _start(config, tmp_path, "second")
    assert process.wait(timeout=180) == contract.EXIT_OK
    resumed = json.loads(termination.read_text())
    assert final_eval(resumed)["step"] == 60
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-6)


def test_progress_endpoint_and_metrics_while_training(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    port = _free_port()
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.json", _slow_config(model_dir("gpt2"), text_data, run, steps=150))
    process, termination = _start(config, tmp_path, "progress", port=port)
    url = f"http://127.0.0.1:{port}"

    def training_seen() -> bool:
        try:
            report = json.loads(urllib.request.urlopen(url + "/progress", timeout=2).read())
        except OSError:
            return False
        return bool(report["phase"] == "Training" and report["step"] > 0 and report["evaluations"])

    try:
        _wait(training_seen, 120, "phase Training on /progress", process)
        report = json.loads(urllib.request.urlopen(url + "/progress", timeout=2).read())
        assert set(report) == set(contract.ProgressReport.__annotations__)
        assert report["totalSteps"] == 150 and report["evaluations"][0]["step"] == 0
        metrics = urllib.request.urlopen(url + "/metrics", timeout=2).read().decode()
        assert "finetune_step " in metrics and "finetune_eval_loss " in metrics
    finally:
        assert process.wait(timeout=180) == contract.EXIT_OK
    summary = json.loads(termination.read_text())
    assert summary["phase"] == "Succeeded" and summary["finalUri"].endswith("/final/")


def test_progress_report_shape_and_http() -> None:
    progress = Progress()
    progress.update(phase=contract.TrainerPhase.TRAINING, step=3, totalSteps=10, trainLoss=1.5)
    progress.add_evaluation(contract.EvaluationPoint(step=0, loss=2.0, accuracy=0.4, perplexity=7.39))
    server = serve(progress, host="127.0.0.1", port=0)
    try:
        port = server.server_address[1]
        body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2).read())
        assert body["phase"] == "Training" and body["step"] == 3 and body["evaluations"][0]["loss"] == 2.0
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read() == b"ok"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        assert "finetune_train_loss 1.5" in metrics and "finetune_eval_perplexity 7.39" in metrics
    finally:
        server.shutdown()


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before_and_says_so(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    """A file of the newest checkpoint no longer matches its manifest (bit rot, a bad copy):
    resume falls back to the previous complete checkpoint, reports the skipped one, moves its
    manifest aside so nothing lists it again, and the run ends as an uninterrupted one."""
    from tests.trainer.conftest import run_trainer

    first = trained("llama")  # 4 steps, checkpoints at 2 and 4
    model, text_data = first.model, first.data
    whole = base_config(model, text_data, tmp_path / "whole", hyperparameters={"maxSteps": 6})
    code, uninterrupted = run_trainer(whole, tmp_path, "whole.json")
    assert code == contract.EXIT_OK

    run = tmp_path / "run"
    shutil.copytree(first.run, run)  # the first attempt: a copy of the shared run, corrupted here
    assert first.code == contract.EXIT_OK and [c["step"] for c in first.summary["checkpoints"]] == [2, 4]
    shard = flip_a_byte(next((run / "checkpoints" / "step-000004" / "state").glob("*.distcp")))

    code, resumed = run_trainer(
        base_config(model, text_data, run, hyperparameters={"maxSteps": 6}), tmp_path, "again.json"
    )
    assert code == contract.EXIT_OK, resumed
    record = resumed["resumedFrom"]
    assert record["step"] == 2
    [skipped] = record["skipped"]
    assert skipped["step"] == 4 and "corrupt" in skipped["reason"] and shard.name in skipped["reason"]
    assert "SHA-256 mismatch" in skipped["reason"]
    corrupt = json.loads((run / "checkpoints" / "step-000004" / "manifest.corrupt.json").read_text())
    assert corrupt["corrupt"] == skipped["reason"]
    assert [c["step"] for c in resumed["checkpoints"]] == [4, 6], "step 4 trained again and saved anew"
    assert final_eval(resumed)["step"] == 6
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-6)


def test_every_checkpoint_corrupt_fails_once_saying_what_to_do(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    """Nothing intact to resume from: a permanent failure (exit 3, not retried by the Job) that
    names each corrupt checkpoint and what to do — never a silent fresh start over the old run,
    and the manifests stay, so a second attempt says the same."""
    from tests.trainer.conftest import run_trainer

    first = trained("llama")
    run = tmp_path / "run"
    shutil.copytree(first.run, run)
    shards = [
        flip_a_byte(next((run / "checkpoints" / f"step-{step:06d}" / "state").glob("*.distcp")))
        for step in (2, 4)
    ]
    config = base_config(first.model, first.data, run, hyperparameters={"maxSteps": 6})
    for attempt in ("first.json", "second.json"):
        code, summary = run_trainer(config, tmp_path, attempt)
        assert code == contract.EXIT_INVALID_INPUT, summary
        assert summary["reason"] == "CorruptCheckpoints"
        message = summary["message"]
        assert (
            "every checkpoint in the run folder is corrupt" in message and "checkpoints.outputUri" in message
        )
        assert all(f"step {step}: corrupt" in message for step in (2, 4))
        assert all(shard.name in message for shard in shards) and "Traceback" not in message
    assert sorted(p.parent.name for p in (run / "checkpoints").glob("*/manifest.json")) == [
        "step-000002",
        "step-000004",
    ], "nothing retired: the run folder is as it was"
