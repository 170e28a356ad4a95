"""Multi-process launch: `finetune-trainer` starts torchrun itself when asked for several
processes, so the pod's exit code keeps the trainer's meaning.

torchrun alone exits 1 whatever its workers returned, which would turn a permanent "invalid
input" (3) into a retry. Here the workers' exit codes are mapped back: any 3 → 3, a handled
SIGTERM (143, or the agent itself signalled) → 143, anything else → 1.

Configured like Kubeflow's PyTorch runtimes, through torchrun's own environment variables:
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT (and any other
PET_* torchrun reads). Called by `cli.main` in the pod's first process only (not in workers).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_trainer.contract import EXIT_FAILURE, EXIT_INVALID_INPUT, EXIT_OK, EXIT_TERMINATED

log = logging.getLogger(__name__)


def wants_launch(env: Mapping[str, str] = os.environ) -> bool:
    """True in the pod's first process when more than one process in total is asked for."""
    if "RANK" in env or "LOCAL_RANK" in env:  # already a torchrun worker
        return False
    nnodes = env.get("PET_NNODES", "1").split(":")[-1]
    nproc = env.get("PET_NPROC_PER_NODE", "1")
    return int(nnodes) * (int(nproc) if nproc.isdigit() else 2) > 1


def _report_dead_worker(path: str, exc: Any) -> None:
    from datetime import UTC, datetime

    from finetune_trainer import contract
    from finetune_trainer.errors import Reason
    from finetune_trainer.telemetry import write_failure

    rank, failure = exc.get_first_failure()
    how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    summary = contract.TerminationSummary(
        phase="Failed",
        exitCode=EXIT_FAILURE,
        reason=Reason.WORKER_FAILED.value,
        message=f"training process of global rank {rank} died ({how})",
        step=0,
        totalSteps=None,
        runUri=None,
        rank=rank,
        failedAt=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    )
    write_failure(path, summary)


def exit_code_of(worker_codes: Sequence[int]) -> int:
    if EXIT_INVALID_INPUT in worker_codes:
        return EXIT_INVALID_INPUT
    if EXIT_TERMINATED in worker_codes or -signal.SIGTERM in worker_codes:
        return EXIT_TERMINATED
    return EXIT_FAILURE if any(worker_codes) else EXIT_OK


def launch(trainer_args: Sequence[str], *, termination_path: str | None = None) -> int:
    """torchrun with the trainer as its workers; the exit code as the module docstring says.
    A worker that died without a word (killed, out of memory) gets a failure summary in
    `termination_path` from here, unless a worker of this pod wrote one."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["-m", "finetune_trainer", *trainer_args])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        log.error("worker(s) failed with exit codes %s", codes)
        code = exit_code_of(codes)
        if termination_path is not None and code == EXIT_FAILURE:
            _report_dead_worker(termination_path, exc)
        return code
    except SignalException as exc:
        log.warning("launcher got %s; workers were asked to checkpoint and stop", exc.sigval)
        return EXIT_TERMINATED
    return EXIT_OK
