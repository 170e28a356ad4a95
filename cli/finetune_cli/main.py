"""`kubectl finetune`: the entry point — parse one command line, run its command, report errors.

The console script `kubectl-finetune` (so `kubectl finetune …` works as a kubectl plugin) calls
`main`; the shell runs each of its lines through `run`. The command line is defined in `parser`,
the commands live in `commands/`, what they share in `app`. Every failure is a `CliError` that
says what to do; it is printed here, with the exit status (0 ok, 1 failed, 2 usage).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.console import Console

from finetune_cli.app import App
from finetune_cli.errors import CliError
from finetune_cli.parser import build_parser, usage


def run(argv: Sequence[str], *, console: Console | None = None, shared: App | None = None) -> int:
    """Run one command; the exit status (0 ok, 1 failed, 2 usage)."""
    console = console or Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        args = build_parser().parse_args(list(argv))
        if not hasattr(args, "handler"):
            if args.command is None:
                build_parser().print_help()
                return 0
            raise CliError(
                f"`{args.command}` needs a subcommand",
                hint=f"see `kubectl finetune {args.command} --help`",
                code=2,
            )
        app = App(args, console, usage=usage)
        app.run_line = lambda line: run(line, console=console, shared=app)  # the shell's lines
        if shared is not None:  # a shell line: the shell's connection, if it is the same namespace
            app.share_connection(shared)
        args.handler(app)
        if shared is not None:
            shared.share_connection(app)
        return 0
    except CliError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        for detail in exc.details:
            errors.print(f"  {detail}", markup=False, highlight=False)
        if exc.hint:
            errors.print(f"hint: {exc.hint}", markup=False, highlight=False)
        return exc.code
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def make_console() -> Console:
    """Tables keep their width when piped (rich would assume 80 columns)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=160)


# An interactive command waits this long for an S3 server that does not answer, then says so
# (finetune_trainer.storage.StorageUnreachable); the trainer's 600 s default is for pods, which
# must outlast a storage restart. FINETUNE_STORAGE_RETRY_SECONDS, when set, wins.
CLI_STORAGE_RETRY_SECONDS = "20"


def main(argv: Sequence[str] | None = None) -> None:
    from finetune_trainer.storage import ENV_RETRY_SECONDS

    os.environ.setdefault(ENV_RETRY_SECONDS, CLI_STORAGE_RETRY_SECONDS)
    sys.exit(run(sys.argv[1:] if argv is None else argv, console=make_console()))


if __name__ == "__main__":
    main()
