"""GPU check: the sharded and the data-parallel paths on one GPU, at the seed's scale.

Needs nothing from the network and no files beyond this repository: the models are random-init
from configs written here (the published shapes of Pythia-1.4B and GPT-J-6B), the batches are
random token ids. Each case runs in a fresh process (clean peak-memory counters) through the
trainer's own code: `wrapping.shard` (FSDP2, bf16 parameters, fp32 reduction) or the unwrapped
model under bf16 autocast (data parallel on one process), `loop.TrainingLoop.train_step`
(token-weighted loss, clipping, AdamW).

Cases:
1. pythia-1.4b, bf16, sequence 2048, sharding fsdp and data-parallel: tokens/s, MFU = 6 · N ·
   tokens/s ÷ the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM; `--peak-tflops`), and
   peak memory (torch.cuda.max_memory_allocated), with their ratio fsdp ÷ data-parallel;
2. gpt-j-6b full fine-tune, bf16, sequence 2048, micro-batch 1, activation checkpointing, fsdp:
   does it run `--steps` optimizer steps on one GPU (a 141 GB H200), and at what peak memory.

    python bench/gpu_check.py                    # on the GPU machine, all cases
    python bench/gpu_check.py --case pythia-1.4b:fsdp --steps 20
    python bench/gpu_check.py --tiny --device cpu  # a seconds-long run of the same code on CPU

Prints one line per case and a summary; exits 1 if a case fails (for GPT-J: did not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ["pythia-1.4b:fsdp", "pythia-1.4b:data-parallel", "gpt-j-6b:fsdp"]


def model_config(name: str, tiny: bool) -> Any:
    from transformers import GPTJConfig, GPTNeoXConfig

    if name == "pythia-1.4b":
        shape = {
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 8192,
        }
        if tiny:
            shape = {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 256,
            }
        return GPTNeoXConfig(
            vocab_size=50304,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            use_cache=False,
            tie_word_embeddings=False,
            **shape,
        )
    if name == "gpt-j-6b":
        shape = {"n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64}
        if tiny:
            shape = {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}
        return GPTJConfig(vocab_size=50400, n_positions=2048, use_cache=False, **shape)
    raise SystemExit(f"unknown model {name}")


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer import wrapping
    from finetune_trainer.loop import LoopHooks, LoopPlan, TrainingLoop, decay_groups, loss_scaler

    name, sharding = case.split(":")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    gptj = name == "gpt-j-6b"
    sequence = args.sequence_length
    micro = 1 if gptj else args.micro_batch
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(model_config(name, args.tiny), dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    if gptj:
        wrapping.enable_activation_checkpointing(model, lora=False)
    if sharding == "fsdp":
        model = wrapping.shard(
            model, device=device, precision="bf16", reshard_after_forward=True, cpu_offload=False
        )
        autocast = None
    else:
        model = wrapping.replicate(model, device=device)
        autocast = torch.bfloat16
    optimizer = torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-5, fused=True)  # as the trainer does
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)

    def batch(_: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (micro, sequence), generator=generator)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    plan = LoopPlan(
        total_steps=args.steps,
        batch_size=micro,
        micro_batch=micro,
        accumulation=1,
        rank=0,
        world_size=1,
        seed=0,
        peak_lr=1e-5,
        warmup=0,
        schedule="constant",
        max_grad_norm=1.0,
        log_every=10**9,
        eval_every=10**9,
        save_every=10**9,
        dataset_size=10**6,
    )
    nothing = lambda *a: None  # noqa: E731
    hooks = LoopHooks(
        collate=batch,
        empty_batch=lambda: batch([]),
        on_step=nothing,
        on_log=nothing,
        evaluate=nothing,
        save=nothing,
        stop_requested=lambda: False,
        measure=lambda: None,
    )
    import contextlib

    loop = TrainingLoop(
        model,
        optimizer,
        plan,
        hooks,
        device=device,
        autocast_dtype=autocast,
        sync_context=lambda last: contextlib.nullcontext(),
        scaler=loss_scaler(device, autocast),
    )
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps):
        synchronize()
        started = time.perf_counter()
        loop.train_step(step, 1e-5)
        synchronize()
        times.append(time.perf_counter() - started)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    tokens_per_second = micro * sequence / steady
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    torch.distributed.destroy_process_group()
    return {
        "case": case,
        "parameters": parameters,
        "tokensPerSecond": tokens_per_second,
        "mfu": 6 * parameters * tokens_per_second / (args.peak_tflops * 1e12),
        "peakMemoryGiB": peak / 2**30,
        "steps": args.steps,
        "microBatch": micro,
        "sequenceLength": sequence,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=CASES, action="append", help="default: all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a check of the script itself)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.one:
        print("GPUCHECK " + json.dumps(run_case(args.one, args)), flush=True)
        return
    results, failed = {}, []
    for case in args.case or CASES:
        command = [
            sys.executable,
            __file__,
            "--one",
            case,
            "--steps",
            str(args.steps),
            "--micro-batch",
            str(args.micro_batch),
            "--sequence-length",
            str(args.sequence_length),
            "--peak-tflops",
            str(args.peak_tflops),
            "--device",
            args.device,
            *(["--tiny"] if args.tiny else []),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), os.environ.get("PYTHONPATH", "")]),
        }
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        lines = [line[9:] for line in out.stdout.splitlines() if line.startswith("GPUCHECK ")]
        if out.returncode or not lines:
            failed.append(case)
            print(f"{case}: FAILED (exit {out.returncode})\n{out.stderr[-2000:]}", flush=True)
            continue
        result = results[case] = json.loads(lines[0])
        print(
            f"{case}: {result['parameters'] / 1e9:.2f}B parameters, micro-batch {result['microBatch']} x "
            f"{result['sequenceLength']}: {result['tokensPerSecond']:.0f} tokens/s, MFU {100 * result['mfu']:.1f} %, "
            f"peak memory {result['peakMemoryGiB']:.1f} GiB",
            flush=True,
        )
    fsdp, dp = results.get("pythia-1.4b:fsdp"), results.get("pythia-1.4b:data-parallel")
    if fsdp and dp:
        memory = fsdp["peakMemoryGiB"] / dp["peakMemoryGiB"] if dp["peakMemoryGiB"] else float("nan")
        print(
            f"pythia-1.4b fsdp / data-parallel: tokens/s {fsdp['tokensPerSecond'] / dp['tokensPerSecond']:.3f}x, "
            f"peak memory {memory:.3f}x"
        )
    if "gpt-j-6b:fsdp" in results:
        print(
            f"gpt-j-6b full fine-tune with activation checkpointing: ran {args.steps} steps, "
            f"peak {results['gpt-j-6b:fsdp']['peakMemoryGiB']:.1f} GiB"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
