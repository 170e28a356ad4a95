"""The training recipe: setup → evaluate (step 0, baselines) → train → save (final/) → cleanup.

One code path for every strategy and device: data parallel (a single process, or DDP over
gloo/NCCL) and FSDP2 (`hyperparameters.sharding: fsdp`) alike run on `loop.TrainingLoop`;
`wrapping` adds LoRA and activation checkpointing and then shards (FSDP2) or replicates (DDP)
the model; `checkpoints.save_sharded` writes `torch.distributed.checkpoint` checkpoints on every
rank (uploaded in the background by `checkpoints.Uploader`); `export` writes final/;
`runfolder` holds metrics.jsonl, run.json, TensorBoard and the earlier attempts' records.

In mode Evaluate the recipe stops after step 0 and the baselines: the same data, model loading
and evaluation as a training run's step 0, no optimizer, no checkpoint, no final/.

Called by `cli.main` in every process (torchrun or single). Rank 0 does all writes to the run
folder (checkpoint shards aside: each rank uploads its own).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from finetune_trainer import attention, export, memory, runfolder, wrapping
from finetune_trainer import checkpoints as ckpt
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
    node_topology,
    packing_mode,
    plan_data,
    shard_cache_uri,
    token_dataset,
)
from finetune_trainer.errors import InvalidInput, Reason
from finetune_trainer.evaluation import EvalResult, evaluate_model
from finetune_trainer.loop import (
    LoopHooks,
    LoopPlan,
    TrainingLoop,
    TrainLog,
    decay_groups,
    loss_scaler,
    steps_per_epoch,
    total_steps,
    warmup_steps,
)
from finetune_trainer.models import fetch_model, load_model, load_tokenizer
from finetune_trainer.packing import TokenDataset, collator_for
from finetune_trainer.storage import open_store
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
        log.warning(
            "SIGTERM: %s", "checkpointing at the end of this step" if self.in_training else "stopping"
        )
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


def _eval_point(step: int, result: EvalResult) -> EvaluationPoint:
    return EvaluationPoint(
        step=step, loss=result.loss, accuracy=result.accuracy, perplexity=result.perplexity
    )


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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
        self.board: Any = None  # rank 0's TensorBoard writer while training
        self.baselines: list[BaselineResult] = []
        self.checkpoint_records: list[CheckpointRecord] = []
        self.eval_dataset: TokenDataset | SequenceDataset = SequenceDataset([])
        self.cache_dir = Path(env.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)
        run_key = hashlib.sha256(config.run_uri.encode()).hexdigest()[:16]
        self.local_run = self.cache_dir / "runs" / run_key
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.is_main = self.rank == 0
        hp = config.hyperparameters
        try:
            self.accumulation = hp.gradient_accumulation(self.world_size)
            self.micro = hp.micro_batch(self.world_size)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        cuda = torch.cuda.is_available()
        if hp.precision == "fp16" and not cuda:
            raise InvalidInput("hyperparameters.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        self.local_run.mkdir(parents=True, exist_ok=True)
        self.store_settings = {"endpoint": config.run.storage_endpoint, "region": config.run.storage_region}
        self.run_store = open_store(config.run_uri, **self.store_settings)
        self.io = runfolder.RunFolder(self.run_store if self.is_main else None, self.local_run)
        self.uploader: ckpt.Uploader | None = None
        self._resume_manifest: dict[str, Any] = {}
        self.strategy: str = hp.sharding
        self.pad_id = 0

    # ---- setup ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def process_group(self) -> Iterator[None]:
        """Every run has a process group: torchrun's processes join one (NCCL on CUDA, gloo on
        the CPU; a dead peer fails every collective after the collective timeout); a single
        process gets a private in-memory one. Destroyed at the end of the run (cleanup)."""
        if torch.distributed.is_initialized():
            yield
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = timedelta(seconds=collective_timeout_seconds(self.env))
        if self.world_size > 1:
            torch.distributed.init_process_group(backend, timeout=timeout)
        else:
            # torch.distributed.HashStore is this class, re-exported only on POSIX (typed here)
            from torch._C._distributed_c10d import HashStore

            torch.distributed.init_process_group(
                backend, store=HashStore(), rank=0, world_size=1, timeout=timeout
            )
        try:
            yield
            if self.world_size > 1:
                torch.distributed.barrier()  # no rank tears the group down under a peer still using it
        finally:
            # Collect the run's reference cycles (modules, DTensors, pending collective work) while
            # the interpreter is whole: a gloo work object that outlives the group into interpreter
            # shutdown aborts the process ("terminate called without an active exception").
            gc.collect()
            torch.distributed.destroy_process_group()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 of each node does the work first (downloads, tokenization); the other
        processes then find it done."""
        leader = self.local_rank == 0
        distributed = self.world_size > 1
        if distributed and not leader:
            torch.distributed.barrier()
        try:
            yield
        finally:
            if distributed and leader:
                torch.distributed.barrier()

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
            remote_uri=shard_cache_uri(
                datasets_uri=self.config.run.datasets_uri, run_uri=self.config.run_uri
            ),
            node_rank=node_rank,
            nodes=nodes,
            endpoint=self.config.run.storage_endpoint,
            region=self.config.run.storage_region,
        )
        with self.local_main_first():
            return token_dataset(
                raw,
                self.config.dataset,
                tokenizer,
                split=split,
                length=self.config.hyperparameters.sequence_length,
                settings=settings,
            )

    def fetch(self, spec: ModelSpec) -> Path:
        with self.local_main_first():
            return fetch_model(spec, cache_dir=self.cache_dir, **self.store_settings)

    def attend(self, model: Any) -> Any:
        """`packingStrategy: documents` on sdpa: each document attends to itself in its own causal
        call (`attention.use_document_attention`), not through a dense block-diagonal mask."""
        if packing_mode(self.config.dataset) == "documents" and attention.use_document_attention(model):
            log.info("attention: document-causal sdpa (one causal call per packed document)")
        return model

    def collator(self, model: Any) -> Collator:
        """The batch maker for `model`: `packing: false` batches go padding-free only where the
        attention has a variable-length kernel (`packing.collator_for`), padded elsewhere."""
        config = getattr(wrapping.unwrap(model), "config", None)
        attention = getattr(config, "_attn_implementation", None)
        return collator_for(self.pad_id, packing_mode(self.config.dataset), attention)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: Any, dataset: TokenDataset | SequenceDataset) -> EvalResult:
        phase = self.progress.report()["phase"]
        self.progress.update(phase=TrainerPhase.EVALUATING)
        bf16 = self.config.hyperparameters.precision == "bf16"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
            result = evaluate_model(
                model,
                dataset,
                collator=self.collator(model),
                micro_batch=self.micro,
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
        if self.board is not None:  # step 0 (zero-shot) included
            for name, value in (
                ("loss", result.loss),
                ("accuracy", result.accuracy),
                ("perplexity", result.perplexity),
            ):
                self.board.add_scalar(f"eval/{name}", value, step)
        log.info(
            "eval step %d: loss %.4f accuracy %.4f perplexity %.3f",
            step,
            result.loss,
            result.accuracy,
            result.perplexity,
        )

    def evaluate_baselines(self, raw: DataPlan) -> None:
        done = {b["model"] for b in self.baselines}
        for spec in self.config.evaluation.baselines:
            if spec.display_name in done:
                continue
            folder = self.fetch(spec)
            tokenizer = load_tokenizer(folder)
            dataset = self.sequences(raw, tokenizer, "eval")
            model = self.attend(load_model(folder, init="pretrained", dropout=None, seed=0)).to(self.device)
            result = self.evaluate(model, dataset)
            del model
            baseline = BaselineResult(
                model=spec.display_name,
                loss=result.loss,
                accuracy=result.accuracy,
                perplexity=result.perplexity,
            )
            self.baselines.append(baseline)
            self.progress.add_baseline(baseline)
            self.io.append_metric({"kind": "baseline", **baseline, "tokens": result.tokens})

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_saved(self, local: Path, step: int, seconds: float) -> None:
        """Hand the checkpoint written locally to this rank's background uploader."""
        self.progress.metrics.checkpoint_save_seconds.set(seconds)
        if self.uploader is None:
            return
        if not self.is_main:  # every rank uploads its own shard; rank 0 writes the manifest
            self.uploader.submit(local, step, {}, remove_after=True, sharded=True)
            return
        metrics = {}
        last = next((e for e in reversed(self.evaluations) if e["step"] == step), None)
        if last is not None:
            metrics = {
                "evalLoss": last["loss"],
                "evalAccuracy": last["accuracy"],
                "evalPerplexity": last["perplexity"],
            }
        train_loss = self.progress.report()["trainLoss"]
        if train_loss is not None:
            metrics["trainLoss"] = train_loss
        self.io.append_metric({"kind": "checkpointSaved", "step": step, "saveSeconds": seconds})
        self.uploader.submit(local, step, metrics, remove_after=True, sharded=True)

    def _uploaded(self, manifest: dict[str, Any], seconds: float) -> None:
        self.progress.metrics.checkpoint_bytes.inc(manifest["bytes"])
        self.progress.metrics.checkpoint_seconds.set(seconds)
        self.checkpoint_records = [ckpt.record_of(m) for m in ckpt.list_complete(self.run_store)]
        self.progress.set_checkpoints(self.checkpoint_records)
        self.io.append_metric(
            {
                "kind": "checkpoint",
                "step": manifest["step"],
                "uri": manifest["uri"],
                "bytes": manifest["bytes"],
                "uploadSeconds": seconds,
            }
        )
        self.io.flush()

    def resume_point(self) -> Path | None:
        """Download the newest complete checkpoint (local rank 0 per node) and return its folder."""
        manifests = ckpt.list_complete(self.run_store)
        self.checkpoint_records = [ckpt.record_of(m) for m in manifests]
        self.progress.set_checkpoints(self.checkpoint_records)
        if not manifests:
            return None
        self._resume_manifest = manifests[-1]
        self._check_resume_format()
        by_step = {int(m["step"]): m for m in manifests}
        local_for = self._checkpoint_folder
        choice = self.local_run / "resume-choice.json"
        with self.local_main_first():  # each node's local rank 0 downloads, the others read its choice
            if self.local_rank == 0:
                step, skipped = ckpt.download_newest_intact(self.run_store, manifests, local_for)
                choice.write_text(json.dumps({"step": step, "skipped": skipped}))
        mine = json.loads(choice.read_text())
        step = self._agree_on_resume_step(mine["step"])
        if step != mine["step"]:  # another node found our choice corrupt: take theirs
            with self.local_main_first():
                if self.local_rank == 0 and step is not None:
                    ckpt.download_newest_intact(self.run_store, [by_step[step]], local_for)
        skipped = [s for s in mine["skipped"] if step is None or s["step"] > step]
        if step is None:  # permanent: a retry would find the same files
            raise InvalidInput(
                "every checkpoint in the run folder is corrupt (its files do not match its manifest), so "
                "there is nothing to resume from: to start afresh, set checkpoints.outputUri to a new "
                "folder (or delete this run folder's checkpoints/)",
                reason=Reason.CORRUPT_CHECKPOINTS,
                details=[f"step {s['step']}: {s['reason']}" for s in skipped],
            )
        if skipped:
            if self.is_main:
                for entry in skipped:
                    ckpt.retire_corrupt(self.run_store, int(entry["step"]), str(entry["reason"]))
            self.checkpoint_records = [r for r in self.checkpoint_records if r["step"] <= step]
            self.progress.set_checkpoints(self.checkpoint_records)
        self.progress.set_resumed(step=step, skipped=skipped)
        log.info(
            "resuming from %s%s",
            by_step[step]["uri"],
            f" (skipped {len(skipped)} corrupt)" if skipped else "",
        )
        return local_for(step)

    def _checkpoint_folder(self, step: int) -> Path:
        return self.local_run / f"checkpoint-{step}"

    def _agree_on_resume_step(self, step: int | None) -> int | None:
        """The oldest of the nodes' choices: every rank resumes from the same checkpoint."""
        agreed = int(self._reduce(float(step) if step is not None else -1.0, torch.distributed.ReduceOp.MIN))
        return None if agreed < 0 else agreed

    def _check_resume_format(self) -> None:
        """Checkpoints of the transformers-Trainer era (format `trainer`, data parallel before
        this trainer ran every strategy on its own loop) are refused, naming what to do."""
        written = self._resume_manifest.get("format", ckpt.FORMAT_TRAINER)
        if written != ckpt.FORMAT_DCP:
            raise InvalidInput(
                f"checkpoints.outputUri: the run folder's newest checkpoint (step {self._resume_manifest['step']}) "
                f"has format {written!r}, written by an earlier trainer version (transformers' Trainer); this "
                "trainer resumes only its own 'dcp' checkpoints. Start a new run folder (another "
                "checkpoints.outputUri or job name), or fine-tune further from that checkpoint's weights with "
                f"model.uri: {self._resume_manifest.get('uri', '')}"
            )

    def stop_agreed(self) -> bool:
        """Every rank stops at the same step: a SIGTERM seen by any process counts for all."""
        return self._reduce(1.0 if self.stop.requested else 0.0, torch.distributed.ReduceOp.MAX) > 0

    def _reduce(self, value: float, op: Any) -> float:
        """`value` reduced over every rank with `op` (itself when there is one process)."""
        tensor = torch.tensor([value])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            if torch.distributed.get_backend() == "nccl":
                tensor = tensor.cuda()
            torch.distributed.all_reduce(tensor, op=op)
        return float(tensor.item())

    def _restore_history(self) -> None:
        """Evaluations and baselines of an earlier attempt of this run (from metrics.jsonl)."""
        history = runfolder.earlier_attempts(self.run_store, self.local_run, is_main=self.is_main)
        self.evaluations, self.baselines = history.evaluations, history.baselines
        for point in self.evaluations:
            self.progress.add_evaluation(point)
        for baseline in self.baselines:
            self.progress.add_baseline(baseline)

    # ---- the recipe -----------------------------------------------------------------------------
    def run(self) -> Outcome:
        with self.process_group():
            return self._run()

    def _run(self) -> Outcome:
        cfg = self.config
        evaluate_only = cfg.mode == EVALUATE
        if evaluate_only:
            runfolder.refuse_training_run_folder(self.run_store, cfg)
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
            self.io.write_run_json(
                cfg, raw, model_folder, train_dataset, self.eval_dataset, world_size=self.world_size
            )
        model = self.attend(
            load_model(
                model_folder,
                init=cfg.model.init,
                dropout=cfg.hyperparameters.dropout,
                seed=cfg.hyperparameters.seed,
            )
        )
        self.strategy = self._resolve_strategy(model)
        if evaluate_only:
            model.to(self.device)
            if cfg.evaluation.at_start:
                self.record_evaluation(0, self.evaluate(model, self.eval_dataset))
            del model  # free its memory for the baselines
            return self._finish_evaluation(raw)
        return self._train(model, model_folder, tokenizer, train_dataset, resume)

    def _resolve_strategy(self, model: Any) -> str:
        """`hyperparameters.sharding`, with `auto` decided from the data-parallel estimate."""
        hp = self.config.hyperparameters
        parameters = sum(p.numel() for p in model.parameters())
        data_parallel = memory.estimate(
            trained_parameters=parameters,
            strategy="data-parallel",
            world_size=self.world_size,
            precision=hp.precision,
        )
        device_bytes = (
            torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        )
        strategy = memory.resolve_strategy(
            hp.sharding,
            world_size=self.world_size,
            data_parallel_bytes=data_parallel.state,
            device_bytes=device_bytes,
        )
        log.info(
            "sharding: %s (requested %s; %d processes; data parallel would hold %.2f GiB of model state per process)",
            strategy,
            hp.sharding,
            self.world_size,
            data_parallel.state / 2**30,
        )
        if hp.cpu_offload and self.device.type != "cuda":
            raise InvalidInput(
                "hyperparameters.cpuOffload: offloading to host memory needs a GPU run (on the CPU the "
                "model already lives in host memory); leave it false"
            )
        return strategy

    def _wrap(self, model: Any) -> Any:
        """LoRA, activation checkpointing, then FSDP2 shards or a DDP replica (`wrapping`)."""
        hp, lora = self.config.hyperparameters, self.config.lora
        sharded = self.strategy == FSDP
        if lora is not None:
            # under FSDP a bf16 run keeps the frozen base in bf16 (half its memory); data parallel
            # autocasts from fp32 weights
            frozen = torch.bfloat16 if sharded and hp.precision == "bf16" else torch.float32
            model = wrapping.wrap_lora(model, lora, seed=hp.seed, frozen_dtype=frozen)
        if hp.gradient_checkpointing:
            wrapping.enable_activation_checkpointing(model, lora=lora is not None)
        if sharded:
            return wrapping.shard(
                model,
                device=self.device,
                precision=hp.precision,
                reshard_after_forward=hp.reshard_after_forward,
                cpu_offload=hp.cpu_offload,
            )
        return wrapping.replicate(model, device=self.device)

    def _sync_context(self, model: Any) -> Any:
        """DDP all-reduces the gradients only at the step's last micro-batch (`no_sync` before)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return lambda last: contextlib.nullcontext() if last else model.no_sync()
        return lambda last: contextlib.nullcontext()

    def _train(
        self,
        model: Any,
        model_folder: Path,
        tokenizer: Any,
        train_dataset: TokenDataset | SequenceDataset,
        resume: Path | None,
    ) -> Outcome:
        """setup (wrap, optimizer, resume) → evaluate step 0 + baselines → train → export."""
        cfg, hp = self.config, self.config.hyperparameters
        lora = cfg.lora is not None
        model = self._wrap(model)
        optimizer = torch.optim.AdamW(
            decay_groups(model, hp.weight_decay),
            lr=hp.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            # the fused kernel (one pass over each parameter, on the CPU and on CUDA, also for
            # FSDP's DTensors), as transformers' Trainer uses it (its default optim
            # adamw_torch_fused): for SmolLM2-135M on the CPU it takes less than half of the
            # per-parameter loop's time, which the multi-tensor kernels exceed there
            fused=True,
        )
        board = self.board = self.io.tensorboard()
        autocast = None if self.strategy == FSDP else AUTOCAST[hp.precision]  # FSDP: its MixedPrecisionPolicy
        scaler = loss_scaler(self.device, autocast)  # fp16 only; checkpointed with the model
        start = 0
        if resume is not None:
            state = ckpt.load_sharded(model, optimizer, resume, adapters_only=lora, scaler=scaler)
            start = int(state["step"])
            log.info(
                "resumed at step %d (saved by %d processes, now %d)",
                start,
                state["worldSize"],
                self.world_size,
            )
        elif cfg.evaluation.at_start:
            self.record_evaluation(0, self.evaluate(model, self.eval_dataset))
        self.evaluate_baselines(self._raw)
        self.io.flush()

        total = total_steps(
            max_steps=hp.max_steps,
            epochs=hp.epochs,
            dataset_size=len(train_dataset),
            batch_size=hp.batch_size,
        )
        self.total_steps = total
        plan = LoopPlan(
            total_steps=total,
            batch_size=hp.batch_size,
            micro_batch=self.micro,
            accumulation=self.accumulation,
            rank=self.rank,
            world_size=self.world_size,
            seed=hp.seed,
            peak_lr=hp.learning_rate,
            warmup=warmup_steps(steps=hp.warmup_steps, ratio=hp.warmup_ratio, total=total),
            schedule=hp.lr_scheduler,
            max_grad_norm=hp.max_grad_norm,
            log_every=cfg.evaluation.log_every_steps,
            eval_every=cfg.evaluation.every_steps,
            save_every=cfg.checkpoints.every_steps,
            dataset_size=len(train_dataset),
            lengths=(
                torch.from_numpy(train_dataset.index.lengths)
                if cfg.dataset.grouped_by_length and isinstance(train_dataset, TokenDataset)
                else None
            ),
        )
        self.uploader = ckpt.Uploader(
            self.run_store,
            cfg.checkpoints.keep_last,
            self._uploaded,
            rank=self.rank,
            world_size=self.world_size,
            on_failure=lambda _: self.progress.metrics.checkpoint_upload_failures.inc(),
        )
        self.uploader.start()
        collator = self.collator(model)

        def save(step: int) -> None:
            self.progress.update(phase=TrainerPhase.CHECKPOINTING)
            started = time.perf_counter()
            local = self.local_run / f"checkpoint-{step}"
            ckpt.save_sharded(
                model,
                optimizer,
                local,
                adapters_only=lora,
                is_main=self.is_main,
                scaler=scaler,
                train_state={
                    "step": step,
                    "epoch": step / steps_per_epoch(len(train_dataset), hp.batch_size),
                    "worldSize": self.world_size,
                    "sharding": self.strategy,
                    "config": cfg.to_dict(),
                },
            )
            self.checkpoint_saved(local, step, time.perf_counter() - started)
            self.progress.update(phase=TrainerPhase.TRAINING)

        def evaluate(step: int) -> None:
            result = self.evaluate(model, self.eval_dataset)
            self.record_evaluation(step, result)

        def stop_requested() -> bool:
            self.terminated = self.terminated or self.stop_agreed()
            return self.terminated

        loop = TrainingLoop(
            model,
            optimizer,
            plan,
            LoopHooks(
                collate=lambda ids: collator([train_dataset[i] for i in ids]),
                empty_batch=lambda: collator([{"input_ids": [self.pad_id], "labels": [IGNORE]}]),
                on_step=lambda step, epoch: self.progress.update(step=step, epoch=epoch),
                on_log=lambda entry: self._log_train(entry, board, total),
                evaluate=evaluate,
                save=save,
                stop_requested=stop_requested,
                measure=lambda: self.record_memory(model, optimizer),
            ),
            device=self.device,
            autocast_dtype=autocast,
            sync_context=self._sync_context(model),
            scaler=scaler,
        )
        self.progress.update(phase=TrainerPhase.TRAINING, totalSteps=total, step=start)
        self.stop.in_training = True
        try:
            step, _ = loop.run(start)
        finally:
            self.stop.in_training = False
        if board is not None:
            board.close()
            self.board = None
        final_uri = None if self.terminated else self._export(model, model_folder, tokenizer, step)
        self.uploader.wait()
        self.uploader.close()
        self.io.flush()
        self.progress.update(
            phase=TrainerPhase.TERMINATED if self.terminated else TrainerPhase.SUCCEEDED, step=step
        )
        return Outcome(
            terminated=self.terminated,
            step=step,
            total_steps=total,
            evaluations=self.evaluations,
            baselines=self.baselines,
            checkpoints=self.checkpoint_records,
            final_uri=final_uri,
            run_uri=cfg.run_uri,
        )

    def record_memory(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        """The model state this process holds after its first optimizer step, measured on the
        tensors, beside `memory.estimate` for the strategy (metrics.jsonl kind "memory")."""
        measured = wrapping.local_state_bytes(model, optimizer)
        parameters = list(model.parameters())
        trained = sum(p.numel() for p in parameters if p.requires_grad)
        frozen = sum(p.numel() for p in parameters if not p.requires_grad)
        blocks = wrapping.transformer_blocks(wrapping.unwrap(model)) if self.strategy == FSDP else []
        estimate = memory.estimate(
            trained_parameters=trained,
            frozen_parameters=frozen,
            strategy=self.strategy,
            world_size=self.world_size,
            precision=self.config.hyperparameters.precision,
            largest_block_parameters=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        )
        log.info(
            "model state per process: %.1f MiB measured, %.1f MiB estimated (%s, %d processes)",
            sum(measured.values()) / 2**20,
            estimate.state / 2**20,
            self.strategy,
            self.world_size,
        )
        self.io.append_metric(
            {
                "kind": "memory",
                "strategy": self.strategy,
                "worldSize": self.world_size,
                "rank": self.rank,
                "trainedParameters": trained,
                "frozenParameters": frozen,
                "measured": {**measured, "state": sum(measured.values())},
                "estimate": {
                    "parameters": estimate.parameters,
                    "gradients": estimate.gradients,
                    "optimizer": estimate.optimizer,
                    "state": estimate.state,
                    "gatheredBlock": estimate.gathered_block_bytes,
                },
            }
        )

    def _log_train(self, entry: TrainLog, board: Any, total: int) -> None:
        self.progress.metrics.tokens.inc(entry.input_tokens)
        self.progress.update(
            trainLoss=entry.loss,
            learningRate=entry.learning_rate,
            tokensPerSecond=entry.tokens_per_second,
            etaSeconds=(total - entry.step) * entry.seconds_per_step,
        )
        self.io.append_metric(
            {
                "kind": "train",
                "step": entry.step,
                "epoch": entry.epoch,
                "loss": entry.loss,
                "learningRate": entry.learning_rate,
                "gradNorm": entry.grad_norm,
                "tokensPerSecond": entry.tokens_per_second,
            }
        )
        if board is not None:
            for name, value in (
                ("loss", entry.loss),
                ("learning_rate", entry.learning_rate),
                ("grad_norm", entry.grad_norm),
                ("tokens_per_second", entry.tokens_per_second),
            ):
                if value is not None:
                    board.add_scalar(f"train/{name}", value, entry.step)

    # ---- save -----------------------------------------------------------------------------------
    def _export(self, model: Any, model_folder: Path, tokenizer: Any, step: int) -> str | None:
        """final/: a plain Hugging Face folder (LoRA: final/adapter/, merged into final/ when
        asked) + tokenizer. Every process joins the gathers (FSDP); rank 0 writes."""
        local = self.local_run / "final"
        if self.is_main:
            shutil.rmtree(local, ignore_errors=True)
        inner = wrapping.unwrap(model)
        if self.config.lora is not None:
            export.export_lora(
                inner,
                local,
                is_main=self.is_main,
                base_folder=model_folder,
                lora=self.config.lora,
                merge=self.config.lora.merge_on_export,
            )
        else:
            export.export_full(inner, local, is_main=self.is_main)
        torch.distributed.barrier()
        if not self.is_main:
            return None
        tokenizer.save_pretrained(local)
        final = self.evaluations[-1] if self.evaluations else None
        metrics = (
            {}
            if final is None
            else {
                "evalLoss": final["loss"],
                "evalAccuracy": final["accuracy"],
                "evalPerplexity": final["perplexity"],
            }
        )
        self.run_store.delete_prefix("final/manifest.json")
        manifest = ckpt.upload_folder(
            self.run_store, local, "final/", step=step, metrics=metrics, fmt="final"
        )
        return str(manifest["uri"])

    # ---- mode Evaluate --------------------------------------------------------------------------
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


def run(
    config: TrainerConfig, *, progress: Progress, stop: StopFlag, env: Mapping[str, str] = os.environ
) -> Outcome:
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
        lines.append(
            f"{b['model'][:10]:>10} | {b['accuracy']:8.4f} | {b['loss']:8.4f} | {_ppl(b['perplexity'])}"
        )
    return "\n".join(lines)


def _ppl(value: float) -> str:
    return f"{value:10.3f}" if math.isfinite(value) else f"{'inf':>10}"
