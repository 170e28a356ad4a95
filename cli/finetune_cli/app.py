"""What every command is handed: the parsed options, the console, the cluster, its storage
defaults and the dataset registry opened on first use; and the one place output is printed
(tables, `-o wide|name|json|yaml`, messages).

Each setting comes from its flag, else its environment variable, else the cluster's defaults
ConfigMap (`defaults`), read only when a command needs it.

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

from finetune_cli import defaults, storage, views
from finetune_cli.errors import CliError

if TYPE_CHECKING:
    from finetune_cli.kube import Core, Jobs

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
        self._core: Core | None = None
        self._defaults: defaults.ClusterDefaults | None = None
        self._keys_checked = False

    # ---- the cluster ----
    def _connect(self) -> None:
        from finetune_cli import kube  # the Kubernetes client is slow to import: only when needed

        api, namespace = kube.load(self.args.context, getattr(self.args, "kubeconfig", None))
        namespace = self.args.namespace or namespace
        self._jobs = kube.Jobs(api, namespace)
        self._core = kube.Core(api, namespace)

    def share_connection(self, other: App) -> None:
        """Take `other`'s cluster connection and defaults where this one has none and both name
        the same namespace (how the shell's lines share one connection)."""
        if self._jobs is None and other._jobs is not None and self.args.namespace in (None, other.namespace):
            self._jobs, self._core = other._jobs, other._core
        same_operator = getattr(self.args, "operator_namespace", None) == getattr(
            other.args, "operator_namespace", None
        )
        if self._defaults is None and same_operator:
            self._defaults = other._defaults

    @property
    def jobs(self) -> Jobs:
        if self._jobs is None:
            self._connect()
        assert self._jobs is not None
        return self._jobs

    @property
    def core(self) -> Core:
        if self._core is None:
            self._connect()
        assert self._core is not None
        return self._core

    @property
    def namespace(self) -> str:
        return self.jobs.namespace

    @property
    def all_namespaces(self) -> bool:
        return bool(getattr(self.args, "all_namespaces", False))

    @property
    def defaults(self) -> defaults.ClusterDefaults:
        """The operator's storage defaults from its ConfigMap (empty if it cannot be read)."""
        if self._defaults is None:
            namespace = defaults.operator_namespace(
                getattr(self.args, "operator_namespace", None), os.environ
            )
            source = f"ConfigMap {namespace}/{defaults.CONFIGMAP}"
            try:
                data = self.core.config_map(namespace, defaults.CONFIGMAP)
            except (
                CliError
            ) as exc:  # no kubeconfig, cluster unreachable: the command says so if it needs the cluster
                self._defaults = defaults.ClusterDefaults(source=f"{source} not read: {exc}")
            else:
                self._defaults = defaults.ClusterDefaults.from_configmap(
                    data, source=source if data is not None else f"no readable {source}"
                )
        return self._defaults

    # ---- object storage ----
    def location(self) -> storage.Location:
        """The S3 endpoint and region: AWS_ENDPOINT_URL / AWS_REGION, else the cluster's defaults."""
        endpoint, region = storage.env_endpoint(), os.environ.get("AWS_REGION")
        if endpoint and region:
            return storage.Location(endpoint, region)
        return storage.Location(
            endpoint=defaults.pick(endpoint, self.defaults.endpoint),
            region=defaults.pick(region, self.defaults.region),
        )

    def storage_keys(self) -> None:
        """Without S3 keys of the user's own, take the namespace's credentials Secret (what
        `kubectl finetune init` made from them)."""
        if self._keys_checked or storage.has_own_keys():
            return
        self._keys_checked = True
        name = self.defaults.credentials_secret
        if name:
            keys = self.core.secret_data(name)
            if keys:
                storage.use_keys(keys)

    def _datasets_flag_or_env(self) -> str | None:
        return getattr(self.args, "datasets_uri", None) or os.environ.get(storage.ENV_DATASETS_URI)

    def registry(self) -> storage.Registry:
        given = self._datasets_flag_or_env()
        if given:
            uri = storage.datasets_uri(given)
        else:
            uri = storage.datasets_uri(None, default=self.defaults.datasets_uri, source=self.defaults.source)
        if uri.startswith("s3://"):
            self.storage_keys()
        return storage.Registry(uri, self.location())

    def registered(self, name: str) -> tuple[str | None, dict[str, Any]] | None:
        """(the registry URI a job must name, or None when it is the operator's own; the
        dataset's metadata) when a registry is known, else None (the operator's datasetsUri
        applies); CliError if the dataset is not in the registry."""
        given = self._datasets_flag_or_env()
        if not given and not self.defaults.datasets_uri:
            return None
        registry = self.registry()
        found = registry.get(name)
        if found is None:
            raise CliError(
                f"dataset {name} is not registered in {registry.uri}",
                hint="see `kubectl finetune list datasets`",
            )
        return (registry.uri if given else None), found

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
        if self.output == "name":
            try:
                names = view.names()
            except ValueError as exc:
                raise CliError(str(exc), hint="use -o table, wide, json or yaml") from None
            for name in names:
                self.console.print(name, markup=False, highlight=False, soft_wrap=True)
            return
        if not view.rows:
            self.console.print(view.empty, markup=False, highlight=False)
            return
        self.console.print(views.render(view, wide=self.output == "wide"))

    def say(self, text: str) -> None:
        """A human message: on stdout for tables, on stderr when stdout carries data."""
        target = self.console if self.output in ("table", "wide") else Console(stderr=True, soft_wrap=True)
        target.print(text, markup=False, highlight=False)


def camel(row: Mapping[str, Any]) -> dict[str, Any]:
    return {to_camel(k): v for k, v in row.items()}
