"""`finetune-trainer`: the training pod's entry point (also `python -m finetune_trainer`).

Reads the config, serves progress on rank 0, runs the recipe, prints the result table, writes
the termination message and maps outcomes to the exit codes of `contract`:
0 done, 3 invalid config/data (permanent), 143 SIGTERM handled (checkpoint saved), 1 otherwise.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from pydantic import ValidationError

from finetune_trainer import contract
from finetune_trainer.config import EVALUATE, PATTERN_MESSAGES, TRAIN, TrainerConfig
from finetune_trainer.errors import InvalidInput, Reason
from finetune_trainer.launch import launch, wants_launch
from finetune_trainer.telemetry import Progress, serve, write_failure, write_termination_message

log = logging.getLogger("finetune_trainer")


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per error, naming the field by its camelCase path."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(config)"
        message = str(error["msg"])
        if error.get("type") == "string_pattern_mismatch":  # what is allowed, not the regex
            message = PATTERN_MESSAGES.get(str((error.get("ctx") or {}).get("pattern")), message)
        lines.append(f"{where}: {message}")
    return lines


def load_config(path: str) -> TrainerConfig:
    try:
        return TrainerConfig.from_file(path)
    except FileNotFoundError as exc:
        raise InvalidInput(f"config file {path} not found") from exc
    except ValidationError as exc:
        raise InvalidInput(f"invalid config {path}", details=format_validation_error(exc)) from exc
    except Exception as exc:  # YAML syntax and the like
        raise InvalidInput(f"cannot read config {path}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-trainer", description=__doc__)
    parser.add_argument(
        "--config", default=None, help=f"default: ${contract.ENV_CONFIG} or {contract.DEFAULT_CONFIG_PATH}"
    )
    parser.add_argument("--check", action="store_true", help="validate config and data only (exit 0 or 3)")
    args = parser.parse_args(argv)
    if not args.check and wants_launch():
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s launcher %(levelname)s %(name)s: %(message)s"
        )
        return launch(
            ["--config", args.config] if args.config else [],
            termination_path=contract.termination_message_path(),
        )
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    progress = Progress()
    termination_path = contract.termination_message_path()
    config: TrainerConfig | None = None
    try:
        config = load_config(args.config or contract.config_path())
        if args.check:
            return check(config)
        if is_main:
            serve(progress, host=contract.bind_address(), port=contract.progress_port())
        return train(config, progress, termination_path, is_main=is_main)
    except InvalidInput as exc:
        log.error("%s", exc)
        progress.update(phase="Failed")
        write_failure(
            termination_path, _summary(config, progress, contract.EXIT_INVALID_INPUT, exc.reason, str(exc))
        )
        return contract.EXIT_INVALID_INPUT


def check(config: TrainerConfig) -> int:
    from finetune_trainer.data import plan_data, preflight

    settings = {"endpoint": config.run.storage_endpoint, "region": config.run.storage_region}
    plan = plan_data(
        config.dataset,
        seed=config.hyperparameters.seed,
        need_train=config.mode == TRAIN,
        datasets_uri=config.run.datasets_uri,
        **settings,
    )
    report = preflight([*plan.train_files, *(plan.eval_files or ())], config.dataset, **settings)
    print(f"config and data are valid ({report.total} records in {len(report.records)} files)")
    return contract.EXIT_OK


def train(config: TrainerConfig, progress: Progress, termination_path: str, *, is_main: bool) -> int:
    from finetune_trainer.train import StopFlag, Terminated, format_table, run

    stop = StopFlag()
    stop.install()
    try:
        outcome = run(config, progress=progress, stop=stop)
    except (InvalidInput, KeyboardInterrupt):
        raise
    except Terminated:
        progress.update(phase="Terminated")
        if is_main:
            before = "during the evaluation" if config.mode == EVALUATE else "before training"
            write_termination_message(
                termination_path,
                _summary(
                    config, progress, contract.EXIT_TERMINATED, Reason.TERMINATED, f"terminated {before}"
                ),
            )
        return contract.EXIT_TERMINATED
    except Exception as exc:
        # what the user can act on is said in one line; anything else with its traceback
        named = disk_full(exc) or storage_unreachable(exc)
        if named is not None:
            log.error("%s", named)
        else:
            log.exception("training failed")
        progress.update(phase="Failed")
        message = named or f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        reason = Reason.PEER_LOST if lost_peer(exc) else Reason.ERROR
        write_failure(termination_path, _summary(config, progress, contract.EXIT_FAILURE, reason, message))
        return contract.EXIT_FAILURE
    if outcome.terminated:
        code, reason, message = (
            contract.EXIT_TERMINATED,
            Reason.TERMINATED,
            f"terminated at step {outcome.step}; checkpoint saved",
        )
    elif config.mode == EVALUATE:
        code, reason, message = contract.EXIT_OK, Reason.COMPLETED, _evaluated(outcome.evaluations)
    else:
        code, reason, message = contract.EXIT_OK, Reason.COMPLETED, f"trained {outcome.step} steps"
    if is_main:
        print(format_table(outcome), flush=True)
        summary = _summary(config, progress, code, reason, message)
        if outcome.final_uri:
            summary["finalUri"] = outcome.final_uri
        write_termination_message(termination_path, summary)
    return code


def lost_peer(exc: BaseException) -> bool:
    """Whether a failure is a collective that lost its peer (a symptom), not a cause:
    torch.distributed's errors (DistError: a backend or the rendezvous store failed), and the
    words gloo, NCCL and c10d use for a peer that went away."""
    import torch.distributed as dist

    from finetune_trainer.shards import NodesLost

    if isinstance(exc, NodesLost):
        return True
    text = str(exc).lower()
    words = ("connection closed by peer", "connection reset by peer", "gloo", "nccl", "c10d")
    return isinstance(exc, getattr(dist, "DistError", ())) or any(word in text for word in words)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it, outermost first."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def storage_unreachable(exc: BaseException) -> str | None:
    """The message of `storage.StorageUnreachable` if `exc` is (or was caused by) one."""
    from finetune_trainer.storage import StorageUnreachable

    return next((str(e) for e in _causes(exc) if isinstance(e, StorageUnreachable)), None)


def disk_full(exc: BaseException) -> str | None:
    """A clear message if `exc` (or what caused it) is ENOSPC, the local disk being full."""
    for seen in _causes(exc):
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            where = f" writing {seen.filename}" if seen.filename else ""
            return (
                f"no space left on the pod's local disk{where}: the model cache ({contract.ENV_CACHE_DIR}) "
                "and checkpoints staged before upload need room for the model about 3 times over; give "
                "the pod more ephemeral storage (a larger node disk or emptyDir) or use a smaller model"
            )
    return None


def _evaluated(evaluations: Sequence[contract.EvaluationPoint]) -> str:
    point = next((e for e in evaluations if e["step"] == 0), None)
    if point is None:
        return "evaluated"
    return (
        f"evaluated: eval loss {point['loss']:.4f}, token accuracy {point['accuracy']:.4f}, "
        f"perplexity {point['perplexity']:.3f}"
    )


def _summary(
    config: TrainerConfig | None, progress: Progress, code: int, reason: Reason, message: str
) -> contract.TerminationSummary:
    report = progress.report()
    phase = {contract.EXIT_OK: "Succeeded", contract.EXIT_TERMINATED: "Terminated"}.get(code, "Failed")
    summary = contract.TerminationSummary(
        phase=phase,
        exitCode=code,
        reason=reason.value,
        message=message,
        step=report["step"],
        totalSteps=report["totalSteps"],
        runUri=config.run_uri if config is not None else None,
    )
    if code not in (contract.EXIT_OK, contract.EXIT_TERMINATED):
        summary["rank"] = int(os.environ.get("RANK", "0"))
        summary["failedAt"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if report["checkpoints"] is not None:  # the same list as the progress report's
        summary["checkpoints"] = report["checkpoints"]
    if report["evaluations"]:
        summary["evaluations"] = report["evaluations"]
    if report["baselines"]:
        summary["baselines"] = report["baselines"]
    if report["resumedFrom"] is not None:
        summary["resumedFrom"] = report["resumedFrom"]
    return summary


if __name__ == "__main__":
    sys.exit(main())
