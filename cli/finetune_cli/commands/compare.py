"""`compare` and `plot`: the studio's Table 1 and its chart, over the named jobs or all of them.

Called through `parser`; the PNG is drawn by `plot` (matplotlib, imported only here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune_cli import reading, views
from finetune_cli.app import App
from finetune_cli.errors import CliError


def selected_jobs(app: App, names: Sequence[str]) -> list[dict[str, Any]]:
    if names:
        return [app.jobs.get(n) for n in names]
    return sorted(app.jobs.list(), key=lambda j: j["metadata"].get("creationTimestamp") or "")


def cmd_compare(app: App) -> None:
    app.view(views.compare_view(selected_jobs(app, app.args.jobs)))


def cmd_plot(app: App) -> None:
    from finetune_cli.plot import write_png

    jobs = selected_jobs(app, app.args.jobs)
    series = reading.plot_series(jobs)
    if not series:
        raise CliError(
            "nothing to plot: no job has evaluations yet", hint="jobs report evaluations once training starts"
        )
    names = ", ".join(j["metadata"]["name"] for j in jobs)
    path = write_png(series, Path(app.args.out), title=f"Evaluation on the eval set: {names}")
    if not app.data({"png": str(path), "series": [s.label for s in series]}):
        app.say(f"wrote {path} ({len(series)} series: {', '.join(s.label for s in series)})")
