"""`shell`: the same commands in an interactive loop (`shell.StudioShell`).

Each line runs through `App.run_line` (that is `main.run`) with the shell's `-o`, `--namespace`
and `--context` passed on, sharing one cluster connection. Called through `parser`.
"""

from __future__ import annotations

from finetune_cli.app import App
from finetune_cli.errors import CliError


def cmd_shell(app: App) -> None:
    from finetune_cli.shell import StudioShell

    if app.run_line is None or app.usage is None:
        raise CliError("the shell runs only from `kubectl finetune shell`")
    run_line, usage = app.run_line, app.usage

    def run_in_shell(argv: list[str]) -> int:
        if argv and argv[0] == "shell":
            app.console.print("already in the shell", markup=False)
            return 1
        passthrough = [f"--output={app.output}"]
        if app.args.namespace:
            passthrough.append(f"--namespace={app.args.namespace}")
        for option in ("context", "kubeconfig", "operator_namespace"):
            value = getattr(app.args, option, None)
            if value:
                passthrough.append(f"--{option.replace('_', '-')}={value}")
        return run_line([*passthrough, *argv])

    StudioShell(run_in_shell, usage).cmdloop()
