"""The run folder's records besides checkpoints: metrics.jsonl, run.json, TensorBoard files, and
what an earlier attempt of the same run left there (its evaluations and baselines).

Rank 0 writes (`RunFolder` is built with `store=None` on the other ranks: every write is then a
no-op); every rank may read. Called by the recipe (`train.py`); the training loop does no I/O.
"""

from __future__ import annotations

import json
import platform
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints import list_complete, utc_now
from finetune_trainer.config import EVALUATE, TrainerConfig
from finetune_trainer.contract import BaselineResult, EvaluationPoint
from finetune_trainer.data import DataPlan, SequenceDataset
from finetune_trainer.errors import InvalidInput
from finetune_trainer.packing import TokenDataset
from finetune_trainer.storage import Store, sha256_file

METRICS = "metrics.jsonl"
RUN_JSON = "run.json"
TENSORBOARD = "tensorboard"


@dataclass
class RunFolder:
    """Rank 0's writes to the run folder — no-ops where `store` is None (the other ranks).
    metrics.jsonl is appended locally (under `local_dir`) and uploaded whole by `flush`."""

    store: Store | None
    local_dir: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def append_metric(self, record: Mapping[str, Any]) -> None:
        if self.store is None:
            return
        with self.lock, (self.local_dir / METRICS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": utc_now(), **record}) + "\n")

    def flush(self) -> None:
        """Upload metrics.jsonl and the TensorBoard files (called from both threads)."""
        if self.store is None:
            return
        with self.lock:
            path = self.local_dir / METRICS
            if path.exists():
                self.store.upload_file(path, METRICS)
            board = self.local_dir / TENSORBOARD
            if board.is_dir():
                for file in sorted(board.rglob("*")):
                    if file.is_file():
                        self.store.upload_file(file, f"{TENSORBOARD}/" + file.relative_to(board).as_posix())

    def tensorboard(self) -> Any:
        """A SummaryWriter on rank 0 (None elsewhere)."""
        if self.store is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.local_dir / TENSORBOARD))

    def write_run_json(
        self,
        config: TrainerConfig,
        raw: DataPlan,
        model_folder: Path,
        train: TokenDataset | SequenceDataset,
        evaluation: TokenDataset | SequenceDataset,
        *,
        world_size: int,
    ) -> None:
        """run.json: the config, the model's files, the data's fingerprint and sizes, versions."""
        if self.store is None:
            return
        import torch
        import transformers

        config_file = model_folder / "config.json"
        record = {
            "config": config.to_dict(),
            "model": {
                "uri": config.model.uri or config.model.name,
                "configSha256": sha256_file(config_file) if config_file.exists() else None,
                "weights": {p.name: p.stat().st_size for p in sorted(model_folder.glob("*.safetensors"))},
            },
            "dataset": {
                "fingerprint": raw.fingerprint,
                "trainRecords": train.documents if isinstance(train, TokenDataset) else 0,
                "evalRecords": evaluation.documents if isinstance(evaluation, TokenDataset) else 0,
                "trainSequences": len(train),
                "evalSequences": len(evaluation),
                "trainTokens": train.trained_tokens(),
                "evalTokens": evaluation.trained_tokens(),
            },
            "worldSize": world_size,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "startedAt": utc_now(),
        }
        self.store.write_bytes(RUN_JSON, json.dumps(record, indent=1).encode())


@dataclass
class History:
    """What earlier attempts of this run recorded in metrics.jsonl."""

    evaluations: list[EvaluationPoint]
    baselines: list[BaselineResult]


def earlier_attempts(store: Store, local_dir: Path, *, is_main: bool) -> History:
    """Evaluations and baselines of earlier attempts (the last record per step / per model);
    rank 0 also continues the earlier metrics.jsonl locally."""
    history = History(evaluations=[], baselines=[])
    if not store.exists(METRICS):
        return history
    text = store.read_bytes(METRICS).decode()
    if is_main:
        (local_dir / METRICS).write_text(text)
    evaluations: dict[int, EvaluationPoint] = {}
    baselines: dict[str, BaselineResult] = {}
    for line in text.splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            evaluations.pop(record["step"], None)
            evaluations[record["step"]] = EvaluationPoint(
                step=record["step"],
                loss=record["loss"],
                accuracy=record["accuracy"],
                perplexity=record["perplexity"],
            )
        elif record.get("kind") == "baseline":
            baselines.pop(record["model"], None)
            baselines[record["model"]] = BaselineResult(
                model=record["model"],
                loss=record["loss"],
                accuracy=record["accuracy"],
                perplexity=record["perplexity"],
            )
    history.evaluations, history.baselines = list(evaluations.values()), list(baselines.values())
    return history


def refuse_training_run_folder(store: Store, config: TrainerConfig) -> None:
    """An evaluation writes run.json and metrics.jsonl, never checkpoints: it must not share a
    run folder with a training run (it would overwrite that run's run.json)."""
    trained = bool(list_complete(store))
    if not trained and store.exists(RUN_JSON):
        recorded = json.loads(store.read_bytes(RUN_JSON)).get("config") or {}
        trained = recorded.get("mode", "Train") != EVALUATE
    if trained:
        name = "checkpoints.outputUri" if config.checkpoints.output_uri else "run.uri"
        raise InvalidInput(
            f"{name}: the run folder {config.run_uri} holds a training run; an evaluation "
            "needs a run folder of its own (another checkpoints.outputUri, or another job name)"
        )
