"""`kubectl finetune shell`: the same commands in an interactive loop (stdlib `cmd`).

`help` / `?` list the commands (`help status` shows a command's options), `history` lists what
was typed, `exit` / `quit` / Ctrl-D leave. Each line is parsed and run by `main.run`, so a
command behaves exactly as on the command line; an error is printed and the shell goes on.
Called by `main`.
"""

from __future__ import annotations

import cmd
import shlex
import sys
from collections.abc import Callable
from typing import IO

COMMANDS = (
    "list",
    "add",
    "experiment",
    "run",
    "status",
    "eval",
    "compare",
    "plot",
    "tensorboard",
    "logs",
    "events",
    "init",
    "version",
)
INTRO = (
    "Welcome to the fine-tuning studio's launchpad (kubectl finetune shell).\n"
    "Type help or ? to list commands, exit to leave. Start with `list`: the models, datasets,\n"
    "checkpoints and hyper-parameters; then `experiment add`, `run`, `status`, `compare`."
)


class StudioShell(cmd.Cmd):
    intro = INTRO
    prompt = "finetune> "

    def __init__(
        self,
        run: Callable[[list[str]], int],
        usage: Callable[[str | None], str],
        *,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is None or stdin is sys.stdin
        self._run = run
        self._usage = usage
        self.history: list[str] = []
        self.last_status = 0
        if not (stdin or sys.stdin).isatty():
            self.prompt = ""
            self.intro = ""

    def precmd(self, line: str) -> str:
        if line.strip() and line.strip() != "EOF":
            self.history.append(line.strip())
        return line

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> None:
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            self.stdout.write(f"error: {exc}\n")
            self.last_status = 2
            return
        if argv and argv[0] not in COMMANDS:
            self.stdout.write(f"error: unknown command {argv[0]!r}; type help for the list\n")
            self.last_status = 2
            return
        self.last_status = self._run(argv)

    def do_help(self, arg: str) -> None:
        """help [COMMAND]: list the commands, or show one command's options."""
        self.stdout.write(self._usage(arg.strip() or None) + "\n")

    def do_history(self, arg: str) -> None:
        """history: the commands typed in this shell."""
        for number, line in enumerate(self.history, start=1):
            self.stdout.write(f"{number:4d}  {line}\n")

    def do_exit(self, arg: str) -> bool:
        """exit: leave the shell."""
        return True

    do_quit = do_exit

    def do_EOF(self, arg: str) -> bool:
        self.stdout.write("\n")
        return True
