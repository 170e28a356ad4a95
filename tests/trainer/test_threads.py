"""CPU threads: the training processes of one node share its cores, and a single process keeps
PyTorch's own thread setting (calling `torch.set_num_threads` at all, even with the count it
already had, made every training step ~11 % slower; docs/trainer.md).

Each case runs in a fresh interpreter: the thread count is process-wide state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
import torch

calls = []
real = torch.set_num_threads
torch.set_num_threads = lambda n: (calls.append(n), real(n))[1]
from finetune_trainer.train import configure_threads

before = torch.get_num_threads()
configure_threads()
print(json.dumps({"before": before, "after": torch.get_num_threads(), "calls": calls}))
"""


def probe(**env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_single_process_keeps_pytorchs_thread_count_untouched() -> None:
    result = probe()
    assert result["calls"] == []
    assert result["after"] == result["before"]


def test_processes_sharing_a_node_split_its_cores() -> None:
    result = probe(LOCAL_WORLD_SIZE=str(2 * (os.cpu_count() or 1)))  # more processes than cores
    assert result["after"] == 1
    assert result["calls"] == ([] if result["before"] == 1 else [1])


def test_an_explicit_omp_num_threads_wins() -> None:
    """torchrun (and a user) set OMP_NUM_THREADS; the trainer keeps it even when oversubscribed."""
    result = probe(OMP_NUM_THREADS="1", LOCAL_WORLD_SIZE=str(4 * (os.cpu_count() or 1)))
    assert result["calls"] == []
    assert result["after"] == 1
