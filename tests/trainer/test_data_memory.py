"""Memory does not grow with the corpus: peak RSS of tokenizing 20,000 documents, and of a 20-step
training run reading their shards, within 1.2x of the same at 2,000 documents. Each figure is
measured in a fresh process by bench/data_bench.py's probe (memory is not noisy the way time is;
the full-size benchmark is bench/data_bench.py run)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
LARGE, SMALL = 20_000, 2_000
MAX_RATIO = 1.2


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("data_bench", ROOT / "bench" / "data_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_peak_rss_does_not_grow_with_the_corpus(tmp_path: Path, model_dir: Callable[[str], Path]) -> None:
    bench = _bench()
    model = model_dir("llama")
    figures = {}
    for docs in (SMALL, LARGE):
        corpus = bench.make_corpus(tmp_path / f"corpus-{docs}.jsonl", docs, median_words=12)
        shards = tmp_path / f"shards-{docs}"
        tokenize = bench.run_probe("tokenize", corpus, model, shards, workers=1)
        train = bench.run_probe("train", corpus, model, shards, steps=20, micro=4, length=128)
        assert tokenize["documents"] == train["documents"] == docs - 16  # evalSize held out
        figures[docs] = (tokenize, train)
    (small_tok, small_train), (large_tok, large_train) = figures[SMALL], figures[LARGE]
    assert large_tok["tokens"] > 9 * small_tok["tokens"]  # the large corpus really is ten times larger
    tokenize_ratio = large_tok["peak_rss_mb"] / small_tok["peak_rss_mb"]
    train_ratio = large_train["peak_rss_mb"] / small_train["peak_rss_mb"]
    print(f"peak RSS ratio {LARGE}/{SMALL} docs: tokenize {tokenize_ratio:.3f}, train {train_ratio:.3f}")
    assert tokenize_ratio <= MAX_RATIO, figures
    assert train_ratio <= MAX_RATIO, figures
