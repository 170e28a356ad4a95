"""The baseline of the trainer benchmark: a plain Hugging Face Trainer script (run_clm style).

Same model, data, packing and settings as finetune-trainer; no project code. Prints one JSON
line: tokens/s of the median timed step, peak RSS, step-0 eval loss, local checkpoint save seconds.

    python bench/plain_hf_trainer.py --model DIR --train FILE --eval FILE --steps 8 --seq 128 --batch 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments


def blocks(path: str, tokenizer, length: int) -> list[dict[str, list[int]]]:  # type: ignore[no-untyped-def]
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    ids: list[int] = []
    for x in tokenizer(texts, return_attention_mask=False)["input_ids"]:
        ids.extend([*x, tokenizer.eos_token_id])
    return [
        {"input_ids": ids[i : i + length], "labels": ids[i : i + length]} for i in range(0, len(ids), length)
    ]


def collate(batch: list[dict[str, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Timer(TrainerCallback):
    """Seconds of each optimizer step after the first `skip` (step end to step end)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.last, self.durations = skip, 0.0, []

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        if state.global_step > self.skip:
            self.durations.append(now - self.last)
        self.last = now


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="/tmp/plain-hf-bench")
    return p


def make_trainer(
    args: argparse.Namespace, callbacks: list[TrainerCallback], model: torch.nn.Module | None = None
) -> Trainer:
    """The plain script's Trainer; also built in-process by bench/interleaved_pair.py, which may
    hand it a model instance that the other side trains too (`model`; loaded from --model if None)."""
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train, evaluation = blocks(args.train, tokenizer, args.seq), blocks(args.eval, tokenizer, args.seq)
    training_args = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
        remove_unused_columns=False,
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,  # type: ignore[arg-type]
        data_collator=lambda b: collate(b, pad),
        callbacks=callbacks,
    )


def main() -> None:
    args = parser().parse_args()
    timer = Timer(skip=1)
    trainer = make_trainer(args, [timer])
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.train()
    started = time.perf_counter()
    trainer._save_checkpoint(trainer.model, trial=None)
    save_seconds = time.perf_counter() - started
    # The median step: robust to a noisy neighbour stealing the CPU for a step or two.
    print(
        json.dumps(
            {
                "tokensPerSecond": args.batch * args.seq / statistics.median(timer.durations),
                "peakRssMiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "step0EvalLoss": eval_loss,
                "saveSeconds": save_seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
