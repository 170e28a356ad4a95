"""What every command is handed: the parsed options, the console, and the cluster and dataset
registry opened on first use; and the one place output is printed (tables, `-o json|yaml`,
messages).

Built once per command line by `main.run` (the shell shares one cluster connection between its
lines); the commands in `commands/` take an `App` and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml
from pydantic.alias_generators import to_camel
from rich.console import Console

from finetune_cli import storage, views
from finetune_cli.errors import CliError

if TYPE_CHECKING:
    from finetune_cli.kube import Jobs

# Runs one command line (the argv after `kubectl finetune`); `main.run`, handed to the shell.
LineRunner = Callable[[Sequence[str]], int]
# The shell's `help [TOPIC]` text; `parser.usage`.
Usage = Callable[[str | None], str]


class App:
    """What a command needs: output settings, and the cluster and registry opened on first use."""

    def __init__(
        self,
        args: argparse.Namespace,
        console: Console,
        *,
        run_line: LineRunner | None = None,
        usage: Usage | None = None,
    ) -> None:
        self.args = args
        self.console = console
        self.output: str = args.output
        self.run_line = run_line
        self.usage = usage
        self._jobs: Jobs | None = None

    @property
    def jobs(self) -> Jobs:
        if self._jobs is None:
            from finetune_cli import kube  # the Kubernetes client is slow to import: only when needed

            api, namespace = kube.load(self.args.context)
            self._jobs = kube.Jobs(api, self.args.namespace or namespace)
        return self._jobs

    @property
    def namespace(self) -> str:
        return self.jobs.namespace

    def registry(self) -> storage.Registry:
        return storage.Registry(storage.datasets_uri(getattr(self.args, "datasets_uri", None)))

    def registered(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """(registry URI, the dataset's metadata) when a registry is configured, else None (the
        operator's datasetsUri applies); CliError if the dataset is not in the registry."""
        if not (getattr(self.args, "datasets_uri", None) or os.environ.get(storage.ENV_DATASETS_URI)):
            return None
        registry = self.registry()
        found = registry.get(name)
        if found is None:
            raise CliError(
                f"dataset {name} is not registered in {registry.uri}",
                hint="see `kubectl finetune list datasets`",
            )
        return registry.uri, found

    # ---- printing ----
    def data(self, value: Any) -> bool:
        """Print `value` as JSON or YAML if asked to; True if printed."""
        if self.output == "json":
            self.console.print_json(json.dumps(value, default=str))
            return True
        if self.output == "yaml":
            self.console.print(
                yaml.safe_dump(value, sort_keys=False, allow_unicode=True),
                end="",
                markup=False,
                highlight=False,
            )
            return True
        return False

    def view(self, view: views.View) -> None:
        if self.data(view.structured()):
            return
        if not view.rows:
            self.console.print(view.empty, markup=False, highlight=False)
            return
        self.console.print(views.render(view))

    def say(self, text: str) -> None:
        """A human message: on stdout for tables, on stderr when stdout carries data."""
        target = self.console if self.output == "table" else Console(stderr=True, soft_wrap=True)
        target.print(text, markup=False, highlight=False)


def camel(row: Mapping[str, Any]) -> dict[str, Any]:
    return {to_camel(k): v for k, v in row.items()}
