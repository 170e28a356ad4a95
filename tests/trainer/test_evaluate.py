"""Mode Evaluate on tiny models: the evaluation equals step 0 of a training run on the same
model and data (and a checkpoint's evaluation equals the training run's at that step), with
no optimizer step and no checkpoint written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import contract
from tests.trainer.conftest import TINY_LORA, TrainedRun, base_config, run_trainer


def _evaluate_config(model_uri: str, data: dict[str, str], run: Path, **overrides: Any) -> dict[str, Any]:
    """An evaluation of `model_uri` with the training tests' data and evaluation settings."""
    config = base_config(Path("/unused"), data, run, mode="Evaluate", **overrides)
    config["model"] = {"uri": model_uri}
    # settings only training uses must stay unset in mode Evaluate
    training_only = ("maxSteps", "learningRate", "lrScheduler")
    config["hyperparameters"] = {k: v for k, v in config["hyperparameters"].items() if k not in training_only}
    config["checkpoints"] = {k: v for k, v in config["checkpoints"].items() if k == "outputUri"}
    return config


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("training_data", "evaluation_data"),
    [
        pytest.param({}, {"train": None}, id="eval-files-only"),
        pytest.param({"eval": None, "evalSize": 8}, {"eval": None, "evalSize": 8}, id="held-out-of-train"),
    ],
)
def test_evaluation_equals_step_zero_of_training_and_writes_no_checkpoint(
    training_data: dict[str, Any],
    evaluation_data: dict[str, Any],
    model_dir: Callable[[str], Path],
    text_data: dict[str, str],
    tmp_path: Path,
) -> None:
    model, baseline = model_dir("gpt2"), model_dir("gpt_neox")
    evaluation = {"baselines": [{"uri": f"file://{baseline}"}]}
    training = base_config(model, text_data, tmp_path / "train", evaluation=evaluation, dataset=training_data)
    code, trained = run_trainer(training, tmp_path, "train.json")
    assert code == contract.EXIT_OK, trained

    run = tmp_path / "eval"
    config = _evaluate_config(
        f"file://{model}", text_data, run, evaluation=evaluation, dataset=evaluation_data
    )
    code, summary = run_trainer(config, tmp_path, "eval.json")

    assert code == contract.EXIT_OK, summary
    assert summary["evaluations"] == [trained["evaluations"][0]]  # bit for bit: the same code path
    assert summary["baselines"] == trained["baselines"]
    assert (summary["phase"], summary["reason"], summary["step"], summary["totalSteps"]) == (
        "Succeeded",
        "Completed",
        0,
        0,
    )
    assert summary["message"].startswith("evaluated: eval loss ")
    assert summary["checkpoints"] == [] and "finalUri" not in summary
    assert not (run / "checkpoints").exists() and not (run / "final").exists()
    assert json.loads((run / "run.json").read_text())["config"]["mode"] == "Evaluate"
    kinds = [r["kind"] for r in _records(run)]
    assert kinds == ["eval", "baseline"], "no optimizer step, no checkpoint"


def test_evaluating_a_checkpoint_equals_the_training_runs_evaluation_at_that_step(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    """What `kubectl finetune eval --checkpoint JOB:STEP` creates: model.uri = the checkpoint."""
    training = trained("llama")
    assert training.code == contract.EXIT_OK
    checkpoint = (training.run / "checkpoints" / "step-000004").as_uri() + "/"
    code, summary = run_trainer(
        _evaluate_config(checkpoint, training.data, tmp_path / "eval"), tmp_path, "eval.json"
    )
    assert code == contract.EXIT_OK, summary
    (step_4,) = [e for e in training.summary["evaluations"] if e["step"] == 4]
    (result,) = summary["evaluations"]
    assert result["step"] == 0
    for metric in ("loss", "accuracy", "perplexity"):
        assert result[metric] == pytest.approx(step_4[metric], abs=1e-6), metric


def test_an_evaluation_refuses_a_training_run_folder(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    training = trained("gpt2")
    assert training.code == contract.EXIT_OK
    run = tmp_path / "run"
    shutil.copytree(training.run, run)  # the shared run stays untouched whatever happens here
    run_json = (run / "run.json").read_text()
    code, summary = run_trainer(
        _evaluate_config(f"file://{training.model}", training.data, run), tmp_path, "e.json"
    )
    assert code == contract.EXIT_INVALID_INPUT
    assert "checkpoints.outputUri: the run folder" in summary["message"]
    assert "holds a training run" in summary["message"]
    assert (run / "run.json").read_text() == run_json, "the training run's record is untouched"


def test_evaluating_a_lora_checkpoint_merges_it_into_the_base_named_by_the_run(
    trained: Callable[..., TrainedRun], tmp_path: Path
) -> None:
    """A LoRA run's checkpoint holds only the adapters; its train_state.json names the base model."""
    training = trained("llama", lora=TINY_LORA)
    assert training.code == contract.EXIT_OK
    checkpoint = training.run / "checkpoints" / "step-000004"
    assert not (checkpoint / "config.json").exists() and (checkpoint / "train_state.json").exists()
    code, summary = run_trainer(
        _evaluate_config(checkpoint.as_uri() + "/", training.data, tmp_path / "eval"), tmp_path, "e.json"
    )
    assert code == contract.EXIT_OK, summary
    (step_4,) = [e for e in training.summary["evaluations"] if e["step"] == 4]
    assert summary["evaluations"][0]["loss"] == pytest.approx(step_4["loss"], abs=1e-5)
    assert summary["evaluations"][0]["accuracy"] == pytest.approx(step_4["accuracy"], abs=1e-6)


def test_a_lora_adapter_without_its_run_folder_is_invalid_input(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    adapter = tmp_path / "loose" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    code, summary = run_trainer(
        _evaluate_config(adapter.as_uri() + "/", text_data, tmp_path / "eval"), tmp_path
    )
    assert code == contract.EXIT_INVALID_INPUT
    assert "is a LoRA adapter" in summary["message"] and "run.json" in summary["message"], summary
