"""`tensorboard JOB`: serve a job's TensorBoard on a local port, as the studio linked it.

The trainer writes TensorBoard event files into the job's run folder (`<runUri>tensorboard/`).
This command copies them into a temporary folder, starts TensorBoard (the `tensorboard` package,
in-process, on 127.0.0.1) on it and prints the URL; while the job runs it fetches what the
trainer added every `--interval` seconds (TensorBoard reloads on its own). Ctrl-C (or
`--timeout`) stops it and removes the copy. Called through `parser`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from finetune_cli import defaults, reading, storage
from finetune_cli.app import App
from finetune_cli.errors import CliError

RELOAD_SECONDS = 5


def cmd_tensorboard(app: App) -> None:
    args = app.args
    if args.port < 0 or args.port > 65535:
        raise CliError(f"--port {args.port}: a port is 0 (any free one) to 65535")
    if args.interval <= 0:
        raise CliError(f"--interval {args.interval:g}: must be more than 0 seconds")
    if args.timeout < 0:
        raise CliError(f"--timeout {args.timeout:g}: must be 0 (serve until Ctrl-C) or more seconds")
    job = app.jobs.get(args.job)
    run_uri = (job.get("status") or {}).get("runUri")
    if not run_uri:
        raise CliError(
            f"{args.job} has no run folder yet ({reading.phase_of(job)})",
            hint=f"its TensorBoard files appear once it trains: kubectl finetune run {args.job}",
        )
    spec_storage = (job.get("spec") or {}).get("storage") or {}
    where = app.location()
    where = storage.Location(
        endpoint=defaults.pick(spec_storage.get("endpoint"), where.endpoint),
        region=defaults.pick(spec_storage.get("region"), where.region),
    )
    source = run_uri.rstrip("/") + "/tensorboard/"
    if source.startswith("s3://"):
        app.storage_keys()
    store = storage.open_folder(source, where)
    logdir = Path(tempfile.mkdtemp(prefix="kubectl-finetune-tensorboard-"))
    try:
        if not storage.sync_folder(store, logdir / args.job):
            app.say(
                f"{source} has no event files yet; they appear as the job logs (refreshed every {args.interval:g}s)"
            )
        url = _serve(logdir, args.port)
        app.say(f"TensorBoard of {args.job}: {url}")
        app.say(f"(from {source}; refreshed every {args.interval:g}s while the job runs; Ctrl-C stops)")
        deadline = time.monotonic() + args.timeout if args.timeout else None
        finished = reading.phase_of(job) in reading.TERMINAL_PHASES
        while deadline is None or time.monotonic() < deadline:
            time.sleep(
                args.interval
                if deadline is None
                else max(0.0, min(args.interval, deadline - time.monotonic()))
            )
            if not finished:
                finished = reading.phase_of(app.jobs.get(args.job)) in reading.TERMINAL_PHASES
                storage.sync_folder(store, logdir / args.job)  # once more after it finished: its last records
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def _serve(logdir: Path, port: int) -> str:
    """Start TensorBoard on 127.0.0.1:`port` in a background thread; its URL."""
    try:
        from tensorboard import program
    except ImportError:
        raise CliError(
            "TensorBoard is not installed with this kubectl-finetune",
            hint="install the CLI with its extra: pipx install 'finetune-operator[cli]' (see docs/cli.md)",
        ) from None
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    board = program.TensorBoard()
    board.configure(
        argv=[
            "tensorboard",
            f"--logdir={logdir}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--reload_interval={RELOAD_SECONDS}",
            "--load_fast=false",
        ]
    )
    try:
        return str(board.launch())
    except program.TensorBoardServerException as exc:
        raise CliError(
            f"TensorBoard cannot start: {exc}", hint="choose another --port (0: any free one)"
        ) from None
