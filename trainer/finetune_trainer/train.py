"""The training recipe: setup → data → model → evaluate step 0 + baselines → train → export.

In mode Evaluate the recipe stops after step 0 and the baselines: the same data, model loading
and evaluation as a training run's step 0, no optimizer, no checkpoint, no final/.

Called by `cli.main` in every process (torchrun or single). Built on transformers' Trainer, with
three overrides that pin down what docs/trainer.md (Metrics) fixes: the loss (token-weighted over the whole
accumulated, multi-process batch, so gradient accumulation and world size do not change it),
the train-loss window (token-weighted), and evaluation (`evaluation.evaluate_model`). Rank 0 does
all writes to the run folder; checkpoints upload in the background (`checkpoints.Uploader`).

Under `hyperparameters.sharding: fsdp` the training stage runs on our own loop instead
(`_run_sharded`): `wrapping` shards the model with FSDP2, `loop.TrainingLoop` steps it,
`checkpoints.save_sharded` writes DCP checkpoints on every rank and `export` gathers final/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import checkpoints as ckpt
from finetune_trainer import export, memory, wrapping
from finetune_trainer.config import EVALUATE, FSDP, ModelSpec, TrainerConfig
from finetune_trainer.contract import (
    DEFAULT_CACHE_DIR,
    ENV_CACHE_DIR,
    BaselineResult,
    CheckpointRecord,
    EvaluationPoint,
    TrainerPhase,
    collective_timeout_seconds,
)
from finetune_trainer.data import (
    IGNORE,
    Collator,
    DataPlan,
    SequenceDataset,
    ShardSettings,
    TokenDataset,
    node_topology,
    packing_mode,
    plan_data,
    shard_cache_uri,
    token_dataset,
)
from finetune_trainer.errors import InvalidInput
from finetune_trainer.evaluation import EvalResult, evaluate_model
from finetune_trainer.loop import (
    LoopHooks,
    LoopPlan,
    TrainingLoop,
    TrainLog,
    decay_groups,
    input_tokens,
    steps_per_epoch,
    total_steps,
    warmup_steps,
)
from finetune_trainer.models import fetch_model, load_model, load_tokenizer
from finetune_trainer.storage import Store, open_store, sha256_file
from finetune_trainer.telemetry import Progress

log = logging.getLogger(__name__)


class Terminated(Exception):
    """SIGTERM arrived before training started: nothing to save."""


@dataclass
class StopFlag:
    """Set by SIGTERM. While training, the loop checkpoints and stops at the next step end."""

    requested: bool = False
    in_training: bool = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: %s", "checkpointing at the end of this step" if self.in_training else "stopping")
        self.requested = True
        if not self.in_training:
            raise Terminated()


@dataclass
class Outcome:
    terminated: bool
    step: int
    total_steps: int | None
    evaluations: list[EvaluationPoint]
    baselines: list[BaselineResult]
    checkpoints: list[CheckpointRecord]
    final_uri: str | None
    run_uri: str


@dataclass
class RunIO:
    """Rank 0's writes to the run folder (metrics.jsonl, run.json) — no-ops on other ranks."""

    store: Store | None
    local_dir: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def append_metric(self, record: Mapping[str, Any]) -> None:
        if self.store is None:
            return
        with self.lock:
            path = self.local_dir / "metrics.jsonl"
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"time": ckpt.utc_now(), **record}) + "\n")

    def flush(self) -> None:
        """Upload metrics.jsonl and the TensorBoard files (called from both threads)."""
        if self.store is None:
            return
        with self.lock:
            path = self.local_dir / "metrics.jsonl"
            if path.exists():
                self.store.upload_file(path, "metrics.jsonl")
            tb = self.local_dir / "tensorboard"
            if tb.is_dir():
                for file in sorted(tb.rglob("*")):
                    if file.is_file():
                        self.store.upload_file(file, "tensorboard/" + file.relative_to(tb).as_posix())


def _eval_point(step: int, result: EvalResult) -> EvaluationPoint:
    return EvaluationPoint(step=step, loss=result.loss, accuracy=result.accuracy, perplexity=result.perplexity)


class FineTuneTrainer(Trainer):
    """transformers.Trainer with the project's loss, train-loss window and evaluation."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, recipe: Recipe, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        # Our compute_loss normalizes by the token count of the whole accumulated batch.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._window: torch.Tensor | None = None  # loss sum, target tokens, input tokens (on the device)
        self._window_started = time.perf_counter()
        self._window_steps_start: int | None = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        # every input the collator made (position_ids restart per document when packing is
        # document-aware or padding-free; then there is no attention mask)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        # Shift the labels, not the logits: position t predicts label t+1 and the last position
        # predicts nothing. Slicing the logits instead would copy the (batch, seq, vocab) tensor
        # (100 MB for SmolLM2 at 4x128) forward and backward on every micro-batch.
        logits = outputs.logits.float()  # a no-op in fp32; bf16/fp16 logits are upcast
        targets = F.pad(inputs["labels"], (0, 1), value=IGNORE)[:, 1:]
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        tokens = (targets != IGNORE).sum()
        if model.training:
            if self._window is None or self._window_steps_start is None:  # first micro-batch (also after resume)
                self._window = torch.zeros(3, dtype=torch.float64, device=loss_sum.device)
                self._window_started, self._window_steps_start = time.perf_counter(), self.state.global_step
            # no .item() here: no host-device sync per micro-batch
            self._window += torch.stack(
                [loss_sum.detach().double(), tokens.double(), input_tokens(inputs).double()]
            )
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1)
        # DDP averages gradients over processes; the denominator already counts all of them.
        loss = loss_sum / denominator * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window is not None and self._window_steps_start is not None:
            # Trainer's window log (called on every rank): replace by the token-weighted mean
            window = self._window.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(window)
            window = window.cpu()
            elapsed = max(time.perf_counter() - self._window_started, 1e-9)
            steps = self.state.global_step - self._window_steps_start
            if window[1] > 0:
                logs["loss"] = float(window[0] / window[1])
            logs["tokens_per_second"] = float(window[2]) / elapsed
            self.recipe.progress.metrics.tokens.inc(float(window[2]))
            logs["seconds_per_step"] = elapsed / max(steps, 1)
            self._window.zero_()
            self._window_started = time.perf_counter()
            self._window_steps_start = self.state.global_step
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        result = self.recipe.evaluate(self.model, self.recipe.eval_dataset)
        metrics = {"eval_loss": result.loss, "eval_accuracy": result.accuracy, "eval_perplexity": result.perplexity}
        self.recipe.record_evaluation(self.state.global_step, result)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load full-model weights through `from_pretrained`, which applies transformers' key
        renames (Trainer's raw state-dict load leaves GPT-NeoX's `embed_out` → `lm_head`
        unloaded in transformers 5.23, silently resuming with the wrong output layer)."""
        from peft import PeftModel

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        reloaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config, dtype=torch.float32)
        target.load_state_dict(reloaded.state_dict(), strict=True)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.recipe.progress.update(phase=TrainerPhase.CHECKPOINTING)
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's RNG state is on disk
        self.recipe.checkpoint_saved(
            self.recipe.local_run / f"checkpoint-{self.state.global_step}",
            self.state.global_step,
            time.perf_counter() - started,
        )
        self.recipe.progress.update(phase=TrainerPhase.TRAINING)


class RecipeCallback(TrainerCallback):
    """Progress, SIGTERM and the final-step evaluation."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self._measured = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.recipe.total_steps = state.max_steps
        self.recipe.progress.update(phase=TrainerPhase.TRAINING, totalSteps=state.max_steps, step=state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self._measured:  # after the first optimizer step, before the gradients are cleared
            self.recipe.record_memory(kw["model"], kw["optimizer"])
            self._measured = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.recipe.progress.update(step=state.global_step, epoch=state.epoch)
        if self.recipe.stop_agreed():
            control.should_save = True
            control.should_training_stop = True
            self.recipe.terminated = True
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return
        seconds_per_step = logs.get("seconds_per_step")
        eta = (state.max_steps - state.global_step) * seconds_per_step if seconds_per_step else None
        self.recipe.progress.update(
            trainLoss=logs["loss"],
            learningRate=logs.get("learning_rate"),
            tokensPerSecond=logs.get("tokens_per_second"),
            etaSeconds=eta,
        )
        self.recipe.io.append_metric(
            {
                "kind": "train",
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": logs["loss"],
                "learningRate": logs.get("learning_rate"),
                "gradNorm": logs.get("grad_norm"),
                "tokensPerSecond": logs.get("tokens_per_second"),
            }
        )


class Recipe:
    """One run in one process."""

    def __init__(self, config: TrainerConfig, *, progress: Progress, stop: StopFlag, env: Mapping[str, str]):
        self.config = config
        self.progress = progress
        self.stop = stop
        self.env = env
        self.terminated = False
        self.total_steps: int | None = None
        self.evaluations: list[EvaluationPoint] = []
        self.baselines: list[BaselineResult] = []
        self.checkpoint_records: list[CheckpointRecord] = []
        self.eval_dataset: TokenDataset | SequenceDataset = SequenceDataset([])
        self.cache_dir = Path(env.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)
        run_key = hashlib.sha256(config.run_uri.encode()).hexdigest()[:16]
        self.local_run = self.cache_dir / "runs" / run_key
        self.args = self._training_args()
        self.rank = self.args.process_index
        self.world_size = self.args.world_size
        self.is_main = self.rank == 0
        self.device = self.args.device
        self.store_settings = {"endpoint": config.run.storage_endpoint, "region": config.run.storage_region}
        self.run_store = open_store(config.run_uri, **self.store_settings)
        self.io = RunIO(self.run_store if self.is_main else None, self.local_run)
        self.uploader: ckpt.Uploader | None = None
        self._resume_manifest: dict[str, Any] = {}
        self.strategy: str = self.config.hyperparameters.sharding
        self._last_train_loss: float | None = None

    # ---- setup ----------------------------------------------------------------------------
    def _training_args(self) -> TrainingArguments:
        hp = self.config.hyperparameters
        world_size = int(self.env.get("WORLD_SIZE", "1"))
        try:
            accumulation = hp.gradient_accumulation(world_size)
            micro = hp.micro_batch(world_size)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        cuda = torch.cuda.is_available()
        if hp.precision == "fp16" and not cuda:
            raise InvalidInput("hyperparameters.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        warmup: float = hp.warmup_steps if hp.warmup_steps else hp.warmup_ratio
        if isinstance(warmup, float) and warmup >= 1.0:
            warmup = 0.999999
        scheduler = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[hp.lr_scheduler]
        self.local_run.mkdir(parents=True, exist_ok=True)
        return TrainingArguments(
            output_dir=str(self.local_run),
            per_device_train_batch_size=micro,
            per_device_eval_batch_size=micro,
            gradient_accumulation_steps=accumulation,
            max_steps=hp.max_steps if hp.max_steps is not None else -1,
            num_train_epochs=hp.epochs if hp.epochs is not None else 1.0,
            learning_rate=hp.learning_rate,
            lr_scheduler_type=scheduler,
            warmup_steps=warmup,
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm if hp.max_grad_norm > 0 else 1e9,
            bf16=hp.precision == "bf16",
            fp16=hp.precision == "fp16",
            seed=hp.seed,
            data_seed=hp.seed,
            activation_checkpointing=hp.gradient_checkpointing,
            logging_strategy="steps",
            logging_steps=self.config.evaluation.log_every_steps,
            eval_strategy="steps",
            eval_steps=self.config.evaluation.every_steps,
            save_strategy="steps",
            save_steps=self.config.checkpoints.every_steps,
            save_total_limit=None,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            ddp_backend="gloo" if world_size > 1 and not cuda else None,
            ddp_find_unused_parameters=False,
            # A dead or hung peer fails every collective after this long, not transformers' 30 min.
            ddp_timeout=collective_timeout_seconds(self.env),
            log_level="warning",
        )

    def load_data(self) -> DataPlan:
        self.progress.update(phase=TrainerPhase.PREFLIGHT)
        return plan_data(
            self.config.dataset,
            seed=self.config.hyperparameters.seed,
            need_train=self.config.mode != EVALUATE,
            datasets_uri=self.config.run.datasets_uri,
            **self.store_settings,
        )

    def sequences(self, raw: DataPlan, tokenizer: Any, split: str) -> TokenDataset:
        """Token shards are made (or fetched) by local rank 0 of each node, then mapped by all."""
        node_rank, nodes = node_topology(self.env)
        settings = ShardSettings(
            local_root=self.cache_dir / "tokens",
            remote_uri=shard_cache_uri(datasets_uri=self.config.run.datasets_uri, run_uri=self.config.run_uri),
            node_rank=node_rank,
            nodes=nodes,
            endpoint=self.config.run.storage_endpoint,
            region=self.config.run.storage_region,
        )
        with self.args.main_process_first(local=True, desc=f"tokenize {split}"):
            return token_dataset(
                raw,
                self.config.dataset,
                tokenizer,
                split=split,
                length=self.config.hyperparameters.sequence_length,
                settings=settings,
            )

    def fetch(self, spec: ModelSpec) -> Path:
        with self.args.main_process_first(local=True, desc=f"fetch {spec.display_name}"):
            return fetch_model(spec, cache_dir=self.cache_dir, **self.store_settings)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: Any, dataset: TokenDataset | SequenceDataset) -> EvalResult:
        phase = self.progress.report()["phase"]
        self.progress.update(phase=TrainerPhase.EVALUATING)
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.hyperparameters.precision == "bf16"
        )
        with autocast:
            result = evaluate_model(
                model,
                dataset,
                collator=Collator(self.pad_id, mode=packing_mode(self.config.dataset)),
                micro_batch=self.args.per_device_eval_batch_size,
                max_batches=self.config.evaluation.max_batches,
                device=self.device,
                rank=self.rank,
                world_size=self.world_size,
            )
        self.progress.update(phase=phase)
        return result

    def record_evaluation(self, step: int, result: EvalResult) -> None:
        point = _eval_point(step, result)
        self.evaluations = [*(e for e in self.evaluations if e["step"] != step), point]
        self.progress.add_evaluation(point)
        self.io.append_metric({"kind": "eval", **point, "tokens": result.tokens})
        log.info("eval step %d: loss %.4f accuracy %.4f perplexity %.3f", step, result.loss, result.accuracy, result.perplexity)

    def evaluate_baselines(self, raw: DataPlan) -> None:
        done = {b["model"] for b in self.baselines}
        for spec in self.config.evaluation.baselines:
            if spec.display_name in done:
                continue
            folder = self.fetch(spec)
            tokenizer = load_tokenizer(folder)
            dataset = self.sequences(raw, tokenizer, "eval")
            model = load_model(folder, init="pretrained", dropout=None, seed=0).to(self.device)
            result = self.evaluate(model, dataset)
            del model
            baseline = BaselineResult(
                model=spec.display_name, loss=result.loss, accuracy=result.accuracy, perplexity=result.perplexity
            )
            self.baselines.append(baseline)
            self.progress.add_baseline(baseline)
            self.io.append_metric({"kind": "baseline", **baseline, "tokens": result.tokens})

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_saved(self, local: Path, step: int, seconds: float, *, sharded: bool = False) -> None:
        self.progress.metrics.checkpoint_save_seconds.set(seconds)
        if self.uploader is None:
            return
        if not self.is_main:
            if sharded:  # every rank uploads its own shard; rank 0 writes the manifest
                self.uploader.submit(local, step, {}, remove_after=True, sharded=True)
            return
        metrics = {}
        last = next((e for e in reversed(self.evaluations) if e["step"] == step), None)
        if last is not None:
            metrics = {"evalLoss": last["loss"], "evalAccuracy": last["accuracy"], "evalPerplexity": last["perplexity"]}
        train_loss = self.progress.report()["trainLoss"]
        if train_loss is not None:
            metrics["trainLoss"] = train_loss
        self.io.append_metric({"kind": "checkpointSaved", "step": step, "saveSeconds": seconds})
        self.uploader.submit(local, step, metrics, remove_after=True, sharded=sharded)

    def _uploaded(self, manifest: dict[str, Any], seconds: float) -> None:
        self.progress.metrics.checkpoint_bytes.inc(manifest["bytes"])
        self.progress.metrics.checkpoint_seconds.set(seconds)
        self.checkpoint_records = [ckpt.record_of(m) for m in ckpt.list_complete(self.run_store)]
        self.progress.set_checkpoints(self.checkpoint_records)
        self.io.append_metric(
            {"kind": "checkpoint", "step": manifest["step"], "uri": manifest["uri"], "bytes": manifest["bytes"], "uploadSeconds": seconds}
        )
        self.io.flush()

    def resume_point(self) -> Path | None:
        """Download the newest complete checkpoint (local rank 0 per node) and return its folder."""
        manifests = ckpt.list_complete(self.run_store)
        self.checkpoint_records = [ckpt.record_of(m) for m in manifests]
        self.progress.set_checkpoints(self.checkpoint_records)
        if not manifests:
            return None
        newest = self._resume_manifest = manifests[-1]
        local = self.local_run / f"checkpoint-{newest['step']}"
        with self.args.main_process_first(local=True, desc="download checkpoint"):
            marker = local / ".downloaded"
            if not marker.exists():
                ckpt.download_checkpoint(self.run_store, newest, local)
                marker.write_text(newest["time"])
        log.info("resuming from %s", newest["uri"])
        return local

    def stop_agreed(self) -> bool:
        """Every rank stops at the same step: a SIGTERM seen by any process counts for all."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _restore_history(self) -> None:
        """Evaluations and baselines of an earlier attempt of this run (from metrics.jsonl)."""
        if not self.run_store.exists("metrics.jsonl"):
            return
        text = self.run_store.read_bytes("metrics.jsonl").decode()
        if self.is_main:
            (self.local_run / "metrics.jsonl").write_text(text)
        for line in text.splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval":
                point = EvaluationPoint(
                    step=record["step"], loss=record["loss"], accuracy=record["accuracy"], perplexity=record["perplexity"]
                )
                self.evaluations = [*(e for e in self.evaluations if e["step"] != point["step"]), point]
                self.progress.add_evaluation(point)
            elif record.get("kind") == "baseline":
                baseline = BaselineResult(
                    model=record["model"], loss=record["loss"], accuracy=record["accuracy"], perplexity=record["perplexity"]
                )
                self.baselines = [*(b for b in self.baselines if b["model"] != baseline["model"]), baseline]
                self.progress.add_baseline(baseline)

    def _write_run_json(
        self,
        raw: DataPlan,
        model_folder: Path,
        train: TokenDataset | SequenceDataset,
        evaluation: TokenDataset | SequenceDataset,
    ) -> None:
        if not self.is_main:
            return
        config_file = model_folder / "config.json"
        record = {
            "config": self.config.to_dict(),
            "model": {
                "uri": self.config.model.uri or self.config.model.name,
                "configSha256": sha256_file(config_file) if config_file.exists() else None,
                "weights": {
                    p.name: p.stat().st_size for p in sorted(model_folder.glob("*.safetensors"))
                },
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
            "worldSize": self.world_size,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
            },
            "startedAt": ckpt.utc_now(),
        }
        self.run_store.write_bytes("run.json", json.dumps(record, indent=1).encode())

    # ---- the recipe -----------------------------------------------------------------------------
    def run(self) -> Outcome:
        cfg = self.config
        evaluate_only = cfg.mode == EVALUATE
        if evaluate_only:
            self._refuse_training_run_folder()
            self.total_steps = 0
            self.progress.update(totalSteps=0)
            self.progress.set_checkpoints([])  # an evaluation writes none
        raw = self._raw = self.load_data()
        self.progress.update(phase=TrainerPhase.STARTING)
        model_folder = self.fetch(cfg.model)
        tokenizer = load_tokenizer(model_folder)
        self.pad_id = int(tokenizer.pad_token_id)
        self.progress.update(phase=TrainerPhase.PREFLIGHT)
        train_dataset = SequenceDataset([]) if evaluate_only else self.sequences(raw, tokenizer, "train")
        self.eval_dataset = self.sequences(raw, tokenizer, "eval")
        log.info(
            "data: %d train sequences (%d trained tokens), %d eval sequences (%d tokens)",
            len(train_dataset),
            train_dataset.trained_tokens(),
            len(self.eval_dataset),
            self.eval_dataset.trained_tokens(),
        )
        self._restore_history()
        resume = None if evaluate_only else self.resume_point()
        if resume is None:
            self._write_run_json(raw, model_folder, train_dataset, self.eval_dataset)
        model = load_model(
            model_folder, init=cfg.model.init, dropout=cfg.hyperparameters.dropout, seed=cfg.hyperparameters.seed
        )
        self.strategy = self._resolve_strategy(model)
        if resume is not None:
            self._check_resume_format()
        if self.strategy == FSDP and not evaluate_only:
            return self._run_sharded(model, model_folder, tokenizer, train_dataset, resume)
        if cfg.lora is not None:
            model = self._wrap_lora(model)
        model.to(self.device)
        if resume is None and cfg.evaluation.at_start:
            self.record_evaluation(0, self.evaluate(model, self.eval_dataset))
        if evaluate_only:
            del model  # free its memory for the baselines
            return self._finish_evaluation(raw)
        self.evaluate_baselines(raw)
        self.io.flush()

        if self.is_main:
            self.uploader = ckpt.Uploader(
                self.run_store,
                cfg.checkpoints.keep_last,
                self._uploaded,
                on_failure=lambda _: self.progress.metrics.checkpoint_upload_failures.inc(),
            )
            self.uploader.start()
        trainer = FineTuneTrainer(
            model=model,
            args=self.args,
            train_dataset=train_dataset,  # type: ignore[arg-type]
            eval_dataset=self.eval_dataset,  # type: ignore[arg-type]
            data_collator=Collator(self.pad_id, mode=packing_mode(cfg.dataset)),
            processing_class=tokenizer,
            callbacks=[RecipeCallback(self)],
            recipe=self,
        )
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.local_run / "tensorboard"))))
        self.stop.in_training = True
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        finally:
            self.stop.in_training = False
        step = trainer.state.global_step
        final_uri = None
        if not self.terminated:
            final_uri = self._export(trainer, tokenizer)
        if self.uploader is not None:
            self.uploader.wait()
            self.uploader.close()
        self.io.flush()
        self.progress.update(
            phase=TrainerPhase.TERMINATED if self.terminated else TrainerPhase.SUCCEEDED, step=step
        )
        return Outcome(
            terminated=self.terminated,
            step=step,
            total_steps=self.total_steps,
            evaluations=self.evaluations,
            baselines=self.baselines,
            checkpoints=self.checkpoint_records,
            final_uri=final_uri,
            run_uri=cfg.run_uri,
        )

    # ---- sharded training (FSDP2) on our own loop ------------------------------------------------
    def _resolve_strategy(self, model: Any) -> str:
        """`hyperparameters.sharding`, with `auto` decided from the data-parallel estimate."""
        hp = self.config.hyperparameters
        parameters = sum(p.numel() for p in model.parameters())
        data_parallel = memory.estimate(
            trained_parameters=parameters, strategy="data-parallel", world_size=self.world_size, precision=hp.precision
        )
        device_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        strategy = memory.resolve_strategy(
            hp.sharding, world_size=self.world_size, data_parallel_bytes=data_parallel.state, device_bytes=device_bytes
        )
        log.info("sharding: %s (requested %s; %d processes; data parallel would hold %.2f GiB of model state per process)",
                 strategy, hp.sharding, self.world_size, data_parallel.state / 2**30)
        if hp.cpu_offload and self.device.type != "cuda":
            raise InvalidInput("hyperparameters.cpuOffload: offloading to host memory needs a GPU run (on the CPU the "
                               "model already lives in host memory); leave it false")
        return strategy

    def _check_resume_format(self) -> None:
        """A run folder's checkpoints are resumed by the strategy that wrote them."""
        written = self._resume_manifest.get("format", ckpt.FORMAT_TRAINER)
        wanted = ckpt.FORMAT_DCP if self.strategy == FSDP else ckpt.FORMAT_TRAINER
        if written != wanted:
            by = {ckpt.FORMAT_DCP: "sharding fsdp", ckpt.FORMAT_TRAINER: "sharding data-parallel"}.get(written, written)
            raise InvalidInput(
                f"hyperparameters.sharding: the run folder's newest checkpoint (step {self._resume_manifest['step']}) "
                f"was written with {by}, and this run resolved to {self.strategy}; resume it with the same "
                "sharding, or start a new run folder"
            )

    @contextlib.contextmanager
    def _process_group(self) -> Iterator[None]:
        """FSDP needs a process group, also for one process: a private in-memory one then,
        destroyed at the end of the run (the cleanup stage)."""
        if torch.distributed.is_initialized():
            yield
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()

    def _run_sharded(self, model: Any, model_folder: Path, tokenizer: Any, train_dataset: TokenDataset | SequenceDataset,
                     resume: Path | None) -> Outcome:
        """setup (wrap, shard, optimizer, resume) → evaluate step 0 + baselines → train → export
        → cleanup."""
        with self._process_group():
            return self._train_sharded(model, model_folder, tokenizer, train_dataset, resume)

    def _train_sharded(self, model: Any, model_folder: Path, tokenizer: Any, train_dataset: TokenDataset | SequenceDataset,
                       resume: Path | None) -> Outcome:
        cfg, hp = self.config, self.config.hyperparameters
        lora = cfg.lora is not None
        if lora:
            assert cfg.lora is not None
            frozen = torch.bfloat16 if hp.precision == "bf16" else torch.float32
            model = wrapping.wrap_lora(model, cfg.lora, seed=hp.seed, frozen_dtype=frozen)
        if hp.gradient_checkpointing:
            wrapping.enable_activation_checkpointing(model, lora=lora)
        model = wrapping.shard(model, device=self.device, precision=hp.precision,
                               reshard_after_forward=hp.reshard_after_forward, cpu_offload=hp.cpu_offload)
        optimizer = torch.optim.AdamW(decay_groups(model, hp.weight_decay), lr=hp.learning_rate, betas=(0.9, 0.999),
                                      eps=1e-8, foreach=True)
        start = 0
        if resume is not None:
            state = ckpt.load_sharded(model, optimizer, resume, adapters_only=lora)
            start = int(state["step"])
            log.info("resumed at step %d (saved by %d processes, now %d)", start, state["worldSize"], self.world_size)
        elif cfg.evaluation.at_start:
            self.record_evaluation(0, self.evaluate(model, self.eval_dataset))
        self.evaluate_baselines(self._raw)
        self.io.flush()

        micro = hp.micro_batch(self.world_size)
        total = total_steps(max_steps=hp.max_steps, epochs=hp.epochs, dataset_size=len(train_dataset), batch_size=hp.batch_size)
        self.total_steps = total
        plan = LoopPlan(
            total_steps=total, batch_size=hp.batch_size, micro_batch=micro,
            accumulation=hp.gradient_accumulation(self.world_size), rank=self.rank, world_size=self.world_size,
            seed=hp.seed, peak_lr=hp.learning_rate,
            warmup=warmup_steps(steps=hp.warmup_steps, ratio=hp.warmup_ratio, total=total),
            schedule=hp.lr_scheduler, max_grad_norm=hp.max_grad_norm, log_every=cfg.evaluation.log_every_steps,
            eval_every=cfg.evaluation.every_steps, save_every=cfg.checkpoints.every_steps, dataset_size=len(train_dataset),
        )
        self.uploader = ckpt.Uploader(self.run_store, cfg.checkpoints.keep_last, self._uploaded,
                                      rank=self.rank, world_size=self.world_size)
        self.uploader.start()
        board = self._tensorboard()
        collator = Collator(self.pad_id)

        def save(step: int) -> None:
            self.progress.update(phase=TrainerPhase.CHECKPOINTING)
            started = time.perf_counter()
            local = self.local_run / f"checkpoint-{step}"
            ckpt.save_sharded(
                model, optimizer, local, adapters_only=lora, is_main=self.is_main,
                train_state={"step": step, "epoch": step / steps_per_epoch(len(train_dataset), hp.batch_size),
                             "worldSize": self.world_size, "sharding": FSDP, "config": cfg.to_dict()},
            )
            self.checkpoint_saved(local, step, time.perf_counter() - started, sharded=True)
            self.progress.update(phase=TrainerPhase.TRAINING)

        def evaluate(step: int) -> None:
            result = self.evaluate(model, self.eval_dataset)
            self.record_evaluation(step, result)
            if board is not None:
                for name, value in (("loss", result.loss), ("accuracy", result.accuracy), ("perplexity", result.perplexity)):
                    board.add_scalar(f"eval/{name}", value, step)

        def stop_requested() -> bool:
            self.terminated = self.terminated or self.stop_agreed()
            return self.terminated

        loop = TrainingLoop(
            model, optimizer, plan,
            LoopHooks(
                collate=lambda ids: collator([train_dataset[i] for i in ids]),
                empty_batch=lambda: collator([{"input_ids": [self.pad_id], "labels": [IGNORE]}]),
                on_step=lambda step, epoch: self.progress.update(step=step, epoch=epoch),
                on_log=lambda entry: self._log_train(entry, board, total),
                evaluate=evaluate, save=save, stop_requested=stop_requested,
                measure=lambda: self.record_memory(model, optimizer),
            ),
            device=self.device, autocast_dtype=None, sync_context=lambda last: contextlib.nullcontext(),
        )
        self.progress.update(phase=TrainerPhase.TRAINING, totalSteps=total, step=start)
        self.stop.in_training = True
        try:
            step, _ = loop.run(start)
        finally:
            self.stop.in_training = False
        if board is not None:
            board.close()
        final_uri = None if self.terminated else self._export_sharded(model, model_folder, tokenizer, step)
        self.uploader.wait()
        self.uploader.close()
        self.io.flush()
        self.progress.update(phase=TrainerPhase.TERMINATED if self.terminated else TrainerPhase.SUCCEEDED, step=step)
        return Outcome(terminated=self.terminated, step=step, total_steps=total, evaluations=self.evaluations,
                       baselines=self.baselines, checkpoints=self.checkpoint_records, final_uri=final_uri,
                       run_uri=cfg.run_uri)

    def record_memory(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        """The model state this process holds after its first optimizer step, measured on the
        tensors, beside `memory.estimate` for the strategy (metrics.jsonl kind "memory")."""
        measured = wrapping.local_state_bytes(model, optimizer)
        parameters = list(model.parameters())
        trained = sum(p.numel() for p in parameters if p.requires_grad)
        frozen = sum(p.numel() for p in parameters if not p.requires_grad)
        blocks = wrapping.transformer_blocks(wrapping.unwrap(model)) if self.strategy == FSDP else []
        estimate = memory.estimate(
            trained_parameters=trained, frozen_parameters=frozen, strategy=self.strategy, world_size=self.world_size,
            precision=self.config.hyperparameters.precision,
            largest_block_parameters=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        )
        log.info("model state per process: %.1f MiB measured, %.1f MiB estimated (%s, %d processes)",
                 sum(measured.values()) / 2**20, estimate.state / 2**20, self.strategy, self.world_size)
        self.io.append_metric({
            "kind": "memory", "strategy": self.strategy, "worldSize": self.world_size, "rank": self.rank,
            "trainedParameters": trained, "frozenParameters": frozen,
            "measured": {**measured, "state": sum(measured.values())},
            "estimate": {"parameters": estimate.parameters, "gradients": estimate.gradients,
                         "optimizer": estimate.optimizer, "state": estimate.state,
                         "gatheredBlock": estimate.gathered_block_bytes},
        })

    def _tensorboard(self) -> Any:
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.local_run / "tensorboard"))

    def _log_train(self, entry: TrainLog, board: Any, total: int) -> None:
        self.progress.metrics.tokens.inc(entry.input_tokens)
        self.progress.update(
            trainLoss=entry.loss, learningRate=entry.learning_rate, tokensPerSecond=entry.tokens_per_second,
            etaSeconds=(total - entry.step) * entry.seconds_per_step,
        )
        self.io.append_metric({
            "kind": "train", "step": entry.step, "epoch": entry.epoch, "loss": entry.loss,
            "learningRate": entry.learning_rate, "gradNorm": entry.grad_norm, "tokensPerSecond": entry.tokens_per_second,
        })
        if board is not None:
            for name, value in (("loss", entry.loss), ("learning_rate", entry.learning_rate),
                                ("grad_norm", entry.grad_norm), ("tokens_per_second", entry.tokens_per_second)):
                if value is not None:
                    board.add_scalar(f"train/{name}", value, entry.step)

    def _export_sharded(self, model: Any, model_folder: Path, tokenizer: Any, step: int) -> str | None:
        """final/ gathered from the shards (every process joins the gathers; rank 0 writes)."""
        local = self.local_run / "final"
        if self.is_main:
            shutil.rmtree(local, ignore_errors=True)
        if self.config.lora is not None:
            export.export_lora(model, local, is_main=self.is_main, base_folder=model_folder, lora=self.config.lora,
                               merge=self.config.lora.merge_on_export)
        else:
            export.export_full(model, local, is_main=self.is_main)
        torch.distributed.barrier()
        if not self.is_main:
            return None
        tokenizer.save_pretrained(local)
        return self._upload_final(local, step)

    # ---- mode Evaluate --------------------------------------------------------------------------
    def _refuse_training_run_folder(self) -> None:
        """An evaluation writes run.json and metrics.jsonl, never checkpoints: it must not share
        a run folder with a training run (it would overwrite that run's run.json)."""
        trained = bool(ckpt.list_complete(self.run_store))
        if not trained and self.run_store.exists("run.json"):
            recorded = json.loads(self.run_store.read_bytes("run.json")).get("config") or {}
            trained = recorded.get("mode", "Train") != EVALUATE
        if trained:
            field = "checkpoints.outputUri" if self.config.checkpoints.output_uri else "run.uri"
            raise InvalidInput(
                f"{field}: the run folder {self.config.run_uri} holds a training run; an evaluation "
                "needs a run folder of its own (another checkpoints.outputUri, or another job name)"
            )

    def _finish_evaluation(self, raw: DataPlan) -> Outcome:
        self.evaluate_baselines(raw)
        self.io.flush()
        self.progress.update(phase=TrainerPhase.SUCCEEDED, step=0)
        return Outcome(
            terminated=False,
            step=0,
            total_steps=0,
            evaluations=self.evaluations,
            baselines=self.baselines,
            checkpoints=[],
            final_uri=None,
            run_uri=self.config.run_uri,
        )

    def _wrap_lora(self, model: Any) -> Any:
        assert self.config.lora is not None
        peft_model = wrapping.wrap_lora(model, self.config.lora, seed=self.config.hyperparameters.seed)
        if self.config.hyperparameters.gradient_checkpointing:
            peft_model.enable_input_require_grads()
        return peft_model

    def _export(self, trainer: FineTuneTrainer, tokenizer: Any) -> str | None:
        """final/: the model in HF format (LoRA merged when asked) + tokenizer; final/adapter/."""
        trainer.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        local = self.local_run / "final"
        shutil.rmtree(local, ignore_errors=True)
        if self.config.lora is not None:
            model.save_pretrained(local / "adapter")
            if self.config.lora.merge_on_export:
                model = model.merge_and_unload()
                model.save_pretrained(local, safe_serialization=True)
        else:
            model.save_pretrained(local, safe_serialization=True)
        tokenizer.save_pretrained(local)
        return self._upload_final(local, trainer.state.global_step)

    def _upload_final(self, local: Path, step: int) -> str:
        final = self.evaluations[-1] if self.evaluations else None
        metrics = {} if final is None else {"evalLoss": final["loss"], "evalAccuracy": final["accuracy"], "evalPerplexity": final["perplexity"]}
        self.run_store.delete_prefix("final/manifest.json")
        manifest = ckpt.upload_folder(self.run_store, local, "final/", step=step, metrics=metrics, fmt="final")
        return str(manifest["uri"])


def configure_threads() -> None:
    """Share the CPU cores among this node's training processes, only when they would
    oversubscribe them (torchrun sets OMP_NUM_THREADS itself; so may the user).

    `torch.set_num_threads` is called only to lower the count: calling it at all, even with the
    count PyTorch already uses, made every SmolLM2-135M training step ~11 % slower on the 2-vCPU
    test machine (measured; docs/trainer.md). No
    `torch.use_deterministic_algorithms`: on CPU the default kernels are already reproducible for
    a given seed and thread count (runs, resumed runs and 1 vs 2 processes agree — tests/trainer),
    and the deterministic variants cost ~7 % per step (measured); on GPUs they would cost more, as
    in the HF Trainer's default."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if share < torch.get_num_threads():
        torch.set_num_threads(share)


def run(config: TrainerConfig, *, progress: Progress, stop: StopFlag, env: Mapping[str, str] = os.environ) -> Outcome:
    configure_threads()
    recipe = Recipe(config, progress=progress, stop=stop, env=env)
    return recipe.run()


def is_main_process(env: Mapping[str, str] = os.environ) -> bool:
    return int(env.get("RANK", "0")) == 0


def format_table(outcome: Outcome) -> str:
    """The studio's table: Step | Accuracy | Loss | Perplexity, then the baselines."""
    lines = [f"{'Step':>10} | {'Accuracy':>8} | {'Loss':>8} | {'Perplexity':>10}", "-" * 46]
    for e in sorted(outcome.evaluations, key=lambda e: e["step"]):
        lines.append(f"{e['step']:>10} | {e['accuracy']:8.4f} | {e['loss']:8.4f} | {_ppl(e['perplexity'])}")
    for b in outcome.baselines:
        lines.append(f"{b['model'][:10]:>10} | {b['accuracy']:8.4f} | {b['loss']:8.4f} | {_ppl(b['perplexity'])}")
    return "\n".join(lines)


def _ppl(value: float) -> str:
    return f"{value:10.3f}" if math.isfinite(value) else f"{'inf':>10}"
