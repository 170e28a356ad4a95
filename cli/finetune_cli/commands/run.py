"""`run`: start the newest N waiting experiments (or the named ones), optionally watching them.

Starting is `spec.suspend: false`; the operator does the rest. Called through `parser`.
"""

from __future__ import annotations

from finetune_cli import experiments
from finetune_cli.app import App
from finetune_cli.commands.status import watch
from finetune_cli.errors import CliError


def cmd_run(app: App) -> None:
    names = app.args.names or experiments.to_run(app.jobs.list(), app.args.count)
    if not names:
        raise CliError("no experiment waiting to run", hint="add one with: kubectl finetune experiment add")
    for name in names:
        app.jobs.patch_spec(name, {"suspend": False})
    if not app.data({"started": names}):
        app.say(f"started: {', '.join(names)}")
        if not app.args.watch:
            app.say("follow them with: kubectl finetune status --watch")
    if app.args.watch:
        watch(app, names)
