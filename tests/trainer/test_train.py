"""The real trainer entry point on tiny models: every family trains, evaluates, checkpoints and
reloads; gradient accumulation, resume and LoRA give the numbers they must."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_trainer import contract
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import Collator, ShardSettings, plan_data, token_dataset
from finetune_trainer.evaluation import evaluate_model
from finetune_trainer.models import load_model, load_tokenizer
from tests.trainer.conftest import TrainedRun, base_config, final_eval, run_trainer
from tests.trainer.factories import FAMILIES


def _reevaluate(
    folder: Path, data: dict[str, str], length: int = 32, checkpoint: Path | None = None
) -> float:
    tokenizer = load_tokenizer(folder)
    spec = DatasetSpec(train=[data["train"]], eval=[data["eval"]])
    settings = ShardSettings(
        local_root=Path(tempfile.mkdtemp(prefix="reevaluate-")), remote_uri=None, workers=1
    )
    dataset = token_dataset(
        plan_data(spec, seed=42), spec, tokenizer, split="eval", length=length, settings=settings
    )
    model = load_model(folder, init="pretrained", dropout=None, seed=0)
    if checkpoint is not None:  # the weights of a training checkpoint on the model folder's config
        from finetune_trainer.checkpoints import load_weights

        load_weights(model, checkpoint)
    result = evaluate_model(
        model,
        dataset,
        collator=Collator(tokenizer.pad_token_id),
        micro_batch=4,
        max_batches=None,
        device=torch.device("cpu"),
    )
    return result.loss


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_family_trains_evaluates_checkpoints_and_reloads(
    family: str, trained: Callable[..., TrainedRun]
) -> None:
    result = trained(family)
    run, summary, text_data = result.run, result.summary, result.data
    assert result.code == contract.EXIT_OK, summary
    assert [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]
    manifest = json.loads((run / "checkpoints" / "step-000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["format"] == "dcp"
    assert {f["path"] for f in manifest["files"]} == {
        "state/.metadata",
        "state/__0_0.distcp",
        "train_state.json",
    }
    recorded = manifest["metrics"]["evalLoss"]
    assert recorded == pytest.approx(final_eval(summary)["loss"], abs=0)
    checkpoint = run / "checkpoints" / "step-000004"
    assert _reevaluate(result.model, text_data, checkpoint=checkpoint) == pytest.approx(recorded, abs=1e-6)
    assert _reevaluate(run / "final", text_data) == pytest.approx(recorded, abs=1e-6)
    assert (run / "run.json").exists() and (run / "metrics.jsonl").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    eval_steps = sorted(e.step for e in board.Scalars("eval/loss"))
    assert eval_steps == sorted(e["step"] for e in summary["evaluations"]), (
        "every evaluation, step 0 included"
    )


def test_keep_last_deletes_older_checkpoints(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = base_config(
        model_dir("gpt2"),
        text_data,
        run,
        hyperparameters={"maxSteps": 6},
        checkpoints={"everySteps": 1, "keepLast": 2},
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000005", "step-000006"]
    # the summary (= the last progress report) lists exactly the checkpoints that still exist
    assert [(c["step"], c["uri"]) for c in summary["checkpoints"]] == [
        (5, f"file://{run}/checkpoints/step-000005/"),
        (6, f"file://{run}/checkpoints/step-000006/"),
    ]


def test_gradient_accumulation_equals_the_full_batch(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    results = []
    for micro in (4, 1):
        config = base_config(
            model_dir("llama"),
            text_data,
            tmp_path / f"run-{micro}",
            hyperparameters={"microBatchSize": micro},
            dataset={"packing": False},
        )
        code, summary = run_trainer(config, tmp_path, f"config-{micro}.json")
        assert code == 0
        results.append(final_eval(summary)["loss"])
    assert results[0] == pytest.approx(results[1], abs=1e-5)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "length-grouped"])
def test_resume_continues_where_the_checkpoint_left_off(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path, packing: bool
) -> None:
    """A run stopped at step 3 and started again (same run folder) ends where an uninterrupted
    run ends. (The constant schedule makes maxSteps=3 then 6 the same run as 6 at once.)"""
    model = model_dir("gpt_neox")

    def config(folder: str, steps: int) -> dict[str, Any]:
        return base_config(
            model,
            text_data,
            tmp_path / folder,
            hyperparameters={"maxSteps": steps},
            checkpoints={"everySteps": 3},
            dataset={"packing": packing},
        )

    code, uninterrupted = run_trainer(config("whole", 6), tmp_path, "whole.json")
    assert code == 0
    assert run_trainer(config("parts", 3), tmp_path, "first.json")[0] == 0
    second = config("parts", 6)
    code, resumed = run_trainer(second, tmp_path, "second.json")
    assert code == 0
    assert final_eval(resumed)["step"] == 6
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-6)
    assert resumed["evaluations"][0]["step"] == 0  # history kept across attempts
    assert [c["step"] for c in resumed["checkpoints"]] == [3, 6], (
        "the first attempt's checkpoint still exists"
    )


def test_lora_trains_exports_merged_and_adapter_and_resumes(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    model = model_dir("llama")
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0}
    whole = base_config(
        model,
        text_data,
        tmp_path / "whole",
        hyperparameters={"maxSteps": 6},
        lora=lora,
        checkpoints={"everySteps": 3},
    )
    code, uninterrupted = run_trainer(whole, tmp_path, "whole.json")
    assert code == 0
    final = tmp_path / "whole" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    assert (final / "model.safetensors").exists()
    assert _reevaluate(final, text_data) == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-5)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(
        str(tmp_path / "whole" / "checkpoints" / "step-000003" / "state")
    ).read_metadata()
    weights = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert weights and all("lora_" in key for key in weights), (
        "a LoRA checkpoint holds the adapters, not the base"
    )

    first = base_config(
        model,
        text_data,
        tmp_path / "parts",
        hyperparameters={"maxSteps": 3},
        lora=lora,
        checkpoints={"everySteps": 3},
    )
    assert run_trainer(first, tmp_path, "first.json")[0] == 0
    second = base_config(
        model,
        text_data,
        tmp_path / "parts",
        hyperparameters={"maxSteps": 6},
        lora=lora,
        checkpoints={"everySteps": 3},
    )
    code, resumed = run_trainer(second, tmp_path, "second.json")
    assert code == 0
    assert final_eval(resumed)["step"] == 6  # resumed, not restarted at step 0
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-6)


def test_scratch_init_trains_from_random_weights(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(
        model_dir("gpt2"),
        text_data,
        tmp_path / "run",
        model={"uri": f"file://{model_dir('gpt2')}", "init": "scratch"},
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        pytest.param({"hyperparameters": {"dropout": 2.0}}, "hyperparameters.dropout", id="out-of-range"),
        pytest.param(
            {"hyperparameters": {"batchSize": 4, "microBatchSize": 3}}, "multiple", id="micro-batch"
        ),
        pytest.param({"model": {"uri": "file:///nonexistent/model"}}, "does not exist", id="missing-model"),
        pytest.param({"model": {"name": "no-such-model"}}, "unknown model", id="unknown-catalog-name"),
        pytest.param(
            {"hyperparameters": {"sharding": "zero3"}}, "hyperparameters.sharding", id="unknown-sharding"
        ),
        pytest.param(
            {"hyperparameters": {"sharding": "data-parallel", "cpuOffload": True}},
            "cpuOffload apply to sharding fsdp",
            id="offload-without-fsdp",
        ),
        pytest.param(
            {"hyperparameters": {"sharding": "fsdp", "cpuOffload": True}},
            "hyperparameters.cpuOffload",
            id="offload-on-cpu",
        ),
    ],
)
def test_invalid_config_exits_with_the_permanent_code(
    patch: dict[str, object],
    expected: str,
    model_dir: Callable[[str], Path],
    text_data: dict[str, str],
    tmp_path: Path,
) -> None:
    config = base_config(model_dir("gpt2"), text_data, tmp_path / "run")
    for key, value in patch.items():
        config[key] = {**config[key], **value} if key != "model" else value
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_INVALID_INPUT
    assert summary["reason"] == "InvalidConfig" and expected in summary["message"], summary


def test_invalid_data_exits_with_the_permanent_code_and_names_the_line(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    config = base_config(model_dir("gpt2"), {**text_data, "train": f"file://{bad}"}, tmp_path / "run")
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_INVALID_INPUT
    assert summary["reason"] == "InvalidData" and "bad.jsonl:2: missing field 'text'" in summary["message"]


def test_baselines_are_evaluated_zero_shot_on_the_same_eval_set(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    baseline = model_dir("gptj")
    config = base_config(
        model_dir("gpt2"),
        text_data,
        tmp_path / "run",
        evaluation={"baselines": [{"uri": f"file://{baseline}"}]},
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0
    (result,) = summary["baselines"]
    assert result["model"] == baseline.name
    assert result["loss"] == pytest.approx(_reevaluate(baseline, text_data), abs=1e-6)


@pytest.mark.parametrize(
    ("fmt", "records"),
    [
        pytest.param(
            "prompt-completion",
            [{"prompt": f"what did oil do {i}?", "completion": f" oil rose {i} percent"} for i in range(24)],
            id="prompt-completion",
        ),
        pytest.param(
            "chat",
            [
                {
                    "messages": [
                        {"role": "user", "content": f"price {i}?"},
                        {"role": "assistant", "content": "it rose"},
                    ]
                }
                for i in range(24)
            ],
            id="chat",
        ),
    ],
)
def test_masked_formats_train_end_to_end(
    fmt: str, records: list[dict[str, object]], model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from tests.trainer.factories import write_jsonl

    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", records[:20]),
        "eval": write_jsonl(tmp_path / "eval.jsonl", records[20:]),
    }
    config = base_config(
        model_dir("llama"), data, tmp_path / "run", dataset={"format": fmt, "packing": False}
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0, summary
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]


def test_epochs_set_the_number_of_steps(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(
        model_dir("gpt2"),
        text_data,
        tmp_path / "run",
        hyperparameters={"maxSteps": None, "epochs": 1.0, "batchSize": 8, "microBatchSize": 8},
        evaluation={"everySteps": 100},
        checkpoints={"everySteps": 100},
    )
    config["hyperparameters"] = {k: v for k, v in config["hyperparameters"].items() if v is not None}
    code, summary = run_trainer(config, tmp_path)
    assert code == 0
    assert summary["totalSteps"] == summary["step"] == 5  # 33 packed blocks / 8 per step, rounded up
    assert [e["step"] for e in summary["evaluations"]] == [0, 5]


def test_check_mode_validates_without_training(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    from finetune_trainer.cli import main
    from tests.trainer.conftest import write_config

    good = write_config(tmp_path / "good.json", base_config(model_dir("gpt2"), text_data, tmp_path / "run"))
    assert main(["--config", str(good), "--check"]) == 0
    assert not (tmp_path / "run").exists()
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text("{oops\n")
    bad = write_config(
        tmp_path / "bad.json",
        base_config(model_dir("gpt2"), {**text_data, "train": f"file://{bad_data}"}, tmp_path / "run"),
    )
    assert main(["--config", str(bad), "--check"]) == contract.EXIT_INVALID_INPUT


def test_gradient_checkpointing_gives_the_same_result(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    losses = []
    for flag in (False, True):
        config = base_config(
            model_dir("gpt_neox"),
            text_data,
            tmp_path / f"run-{flag}",
            hyperparameters={"gradientCheckpointing": flag},
        )
        code, summary = run_trainer(config, tmp_path, f"c-{flag}.json")
        assert code == 0
        losses.append(final_eval(summary)["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(
        model_dir("llama"), text_data, tmp_path / "run", hyperparameters={"precision": "bf16"}
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# ---- sharding: fsdp (FSDP2 on our own loop; one process here, two in test_distributed.py) --------
FSDP = {"sharding": "fsdp"}


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_every_family_trains_under_fsdp_and_exports_a_folder_that_reloads(
    family: str, model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = base_config(model_dir(family), text_data, run, hyperparameters={**FSDP, "maxSteps": 2})
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_OK, summary
    assert [e["step"] for e in summary["evaluations"]] == [0, 2]
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]
    manifest = json.loads((run / "checkpoints" / "step-000002" / "manifest.json").read_text())
    assert manifest["format"] == "dcp" and "state/__0_0.distcp" in {f["path"] for f in manifest["files"]}
    # final/ is a plain Hugging Face folder, and evaluates to the last in-training evaluation
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "config.json").exists()
    assert _reevaluate(run / "final", text_data) == pytest.approx(final_eval(summary)["loss"], abs=1e-6)


def test_lora_under_fsdp_trains_resumes_and_exports_merged(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    model = model_dir("llama")
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0}

    def config(run: str, steps: int) -> dict[str, object]:
        return base_config(
            model,
            text_data,
            tmp_path / run,
            hyperparameters={**FSDP, "maxSteps": steps},
            lora=lora,
            checkpoints={"everySteps": 3},
        )

    code, uninterrupted = run_trainer(config("whole", 6), tmp_path, "whole.json")
    assert code == contract.EXIT_OK, uninterrupted
    final = tmp_path / "whole" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    assert _reevaluate(final, text_data) == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-5)
    manifest = json.loads((tmp_path / "whole" / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["format"] == "dcp"
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(
        str(tmp_path / "whole" / "checkpoints" / "step-000003" / "state")
    ).read_metadata()
    weights = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert weights and all("lora_" in key for key in weights), (
        "a LoRA checkpoint holds the adapters, not the base"
    )

    assert run_trainer(config("parts", 3), tmp_path, "first.json")[0] == contract.EXIT_OK
    code, resumed = run_trainer(config("parts", 6), tmp_path, "second.json")
    assert code == contract.EXIT_OK, resumed
    assert final_eval(resumed)["step"] == 6 and resumed["evaluations"][0]["step"] == 0
    assert final_eval(resumed)["loss"] == pytest.approx(final_eval(uninterrupted)["loss"], abs=1e-6)


def test_bf16_under_fsdp_trains_with_a_bf16_frozen_lora_base(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(
        model_dir("llama"),
        text_data,
        tmp_path / "run",
        hyperparameters={**FSDP, "precision": "bf16"},
        lora={"rank": 4, "alpha": 8, "dropout": 0.0},
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_OK, summary
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (held,) = [r for r in records if r["kind"] == "memory"]
    assert 0 < held["trainedParameters"] < held["frozenParameters"]
    # the frozen base in bf16 (2 bytes a weight), the adapters in fp32 (master weights)
    assert held["measured"]["parameters"] == 2 * held["frozenParameters"] + 4 * held["trainedParameters"], (
        held
    )


def test_a_sharded_export_has_an_index_and_reloads(model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune_trainer import export

    model = AutoModelForCausalLM.from_pretrained(model_dir("gpt_neox"), dtype=torch.float32)
    export.export_full(model, tmp_path / "out", is_main=True, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.arange(12).reshape(1, 12)
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_activation_checkpointing_under_fsdp_gives_the_same_result(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    losses = []
    for flag in (False, True):
        config = base_config(
            model_dir("gpt_neox"),
            text_data,
            tmp_path / f"run-{flag}",
            hyperparameters={**FSDP, "gradientCheckpointing": flag},
        )
        code, summary = run_trainer(config, tmp_path, f"c-{flag}.json")
        assert code == contract.EXIT_OK, summary
        losses.append(final_eval(summary)["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_a_checkpoint_of_the_earlier_trainer_format_is_refused_naming_what_to_do(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    """Run folders resumed after the upgrade: transformers-Trainer checkpoints are not resumed."""
    run = tmp_path / "run"
    old = run / "checkpoints" / "step-000002"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(
        json.dumps(
            {
                "step": 2,
                "time": "2026-11-01T00:00:00Z",
                "uri": old.as_uri() + "/",
                "format": "trainer",
                "metrics": {},
                "files": [],
                "bytes": 0,
            }
        )
    )
    code, summary = run_trainer(base_config(model_dir("gpt2"), text_data, run), tmp_path)
    assert code == contract.EXIT_INVALID_INPUT, summary
    message = summary["message"]
    assert message.startswith("checkpoints.outputUri:") and "format 'trainer'" in message, message
    assert "new run folder" in message and f"model.uri: {old.as_uri()}/" in message, message
    assert not (run / "final").exists()
