"""`logs JOB` and `events JOB`: what a job's pods print, and what Kubernetes says about them.

`logs` prints the trainer log of node rank 0 (or `--rank N`, or every rank with its prefix),
`--follow` keeps printing while it grows; `events` lists the events of the FineTuneJob, its batch
Job and its pods. The pods are found by the operator's labels (`reading.trainer_selector`).
Called through `parser`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

from finetune_cli import reading, views
from finetune_cli.app import App
from finetune_cli.errors import CliError
from finetune_operator.builders import CONTAINER_NAME


def cmd_logs(app: App) -> None:
    args = app.args
    if args.tail is not None and args.tail < 0:
        raise CliError(f"--tail {args.tail}: the number of lines must be 0 or more")
    if args.rank < 0:
        raise CliError(f"--rank {args.rank}: node ranks start at 0")
    job = app.jobs.get(args.job)
    ranks = reading.pods_by_rank(app.core.pods(reading.trainer_selector(args.job)))
    if not ranks:
        raise CliError(
            f"{args.job} has no pods ({reading.phase_of(job)})",
            hint="a job has pods once it runs (`kubectl finetune run`); finished pods may have been removed "
            "(runPolicy.ttlSecondsAfterFinished); see `kubectl finetune events " + args.job + "`",
        )
    if args.all_ranks:
        if args.follow:
            raise CliError(
                "--follow follows one rank", hint="pass --rank N with --follow, or leave out --follow"
            )
        for rank, pod in ranks.items():
            for line in b"".join(_log(app, pod, follow=False)).decode(errors="replace").splitlines():
                app.console.print(f"[rank {rank}] {line}", markup=False, highlight=False, soft_wrap=True)
        return
    if args.rank not in ranks:
        raise CliError(
            f"--rank {args.rank}: {args.job} has no pod of that rank",
            hint=f"its ranks: {', '.join(str(r) for r in ranks)}",
        )
    out = sys.stdout.buffer
    try:
        for chunk in _log(app, ranks[args.rank], follow=args.follow):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass


def _log(app: App, pod: Mapping[str, Any], *, follow: bool) -> Iterator[bytes]:
    return app.core.log(
        str(pod["metadata"]["name"]), container=CONTAINER_NAME, follow=follow, tail=app.args.tail
    )


def cmd_events(app: App) -> None:
    job = app.jobs.get(app.args.job)
    pods = app.core.pods(reading.trainer_selector(app.args.job))
    names = [str(p["metadata"]["name"]) for p in pods]
    rows = reading.event_rows(app.core.events(), job, names)
    app.view(views.events_view(rows, job=app.args.job))
