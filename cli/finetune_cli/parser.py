"""The command line of `kubectl finetune`: every command, its options and help, as argparse.

`build_parser` maps each command to its `cmd_*` function in `commands/` (`args.handler`);
`usage` is the shell's `help`. Options kubectl users expect (`-o`, `-n/--namespace`,
`--context`) are accepted before or after the command. Parsing only: called by `main`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any, NoReturn

from finetune_cli import catalog, defaults, storage
from finetune_cli.app import App
from finetune_cli.commands.add import cmd_add_dataset
from finetune_cli.commands.compare import cmd_compare, cmd_plot
from finetune_cli.commands.completion import cmd_completion
from finetune_cli.commands.evaluate import cmd_eval
from finetune_cli.commands.experiment import (
    DEFAULT_MODEL,
    cmd_experiment_add,
    cmd_experiment_delete,
    cmd_experiment_view,
)
from finetune_cli.commands.init import cmd_init
from finetune_cli.commands.listing import (
    cmd_list_checkpoints,
    cmd_list_datasets,
    cmd_list_hyperparameters,
    cmd_list_models,
    cmd_list_overview,
)
from finetune_cli.commands.pods import cmd_events, cmd_logs
from finetune_cli.commands.run import cmd_run
from finetune_cli.commands.shell import cmd_shell
from finetune_cli.commands.status import cmd_status, cmd_status_cancel, cmd_status_view
from finetune_cli.commands.tensorboard import cmd_tensorboard
from finetune_cli.commands.version import cmd_version
from finetune_cli.errors import CliError

OUTPUTS = ("table", "wide", "name", "json", "yaml")
SHELL_HIDDEN = ("shell", "completion")  # commands that make no sense inside the shell
REGISTRY_HELP = f"the registry (default ${storage.ENV_DATASETS_URI}, else the cluster's defaults ConfigMap)"


class Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so the shell survives a typo."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`", code=2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _common(*, top: bool, short_namespace: bool = True) -> argparse.ArgumentParser:
    """Options accepted before or after the command (defaults only on the top parser). `-n` is
    kubectl's namespace flag everywhere except after `run`, where it is the studio's count."""
    parser = argparse.ArgumentParser(add_help=False)
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table" if top else argparse.SUPPRESS,
        help="table (default), wide (more columns), name (one name a line), json or yaml",
    )
    flags = ("-n", "--namespace") if short_namespace else ("--namespace",)
    parser.add_argument(*flags, default=default, help="namespace (default: the kubeconfig context's)")
    parser.add_argument("--context", default=default, help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument(
        "--operator-namespace",
        default=default,
        help=f"where the operator's defaults ConfigMap is (default ${defaults.ENV_OPERATOR_NAMESPACE}, "
        f"else {defaults.DEFAULT_OPERATOR_NAMESPACE})",
    )
    return parser


def _all_namespaces(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="jobs of every namespace")


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="stop watching after this many seconds (0: until done)"
    )


def build_parser() -> Parser:
    common = _common(top=False)
    common_without_n = _common(top=False, short_namespace=False)
    parser = Parser(
        prog="kubectl finetune",
        description="The fine-tuning studio: models, datasets, experiments, runs, evaluations.",
        parents=[_common(top=True)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(group: Any, name: str, handler: Callable[[App], None] | None, help: str, **kwargs: Any) -> Parser:
        parents = [common_without_n if name == "run" else common]
        sub: Parser = group.add_parser(name, help=help, description=help, parents=parents, **kwargs)
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    # list
    listing = add(
        commands,
        "list",
        cmd_list_overview,
        "models, datasets, checkpoints and hyper-parameters (bare `list`: all four at a glance)",
    )
    what = listing.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser)
    models = add(what, "models", cmd_list_models, "the model catalog with memory estimates")
    models.add_argument("--family", help="only this family, e.g. pythia, codegen, llama")
    models.add_argument(
        "--precision", choices=list(catalog.PRECISIONS), default="bf16", help="hyperparameters.precision"
    )
    models.add_argument(
        "--sharding",
        choices=list(catalog.STRATEGIES),
        default="data-parallel",
        help="hyperparameters.sharding",
    )
    models.add_argument(
        "--processes", type=_positive_int, default=1, metavar="N",
        help="training processes of the job (resources.nodes x processesPerNode); fsdp splits the state over them",
    )  # fmt: skip
    data = add(what, "datasets", cmd_list_datasets, "registered datasets")
    data.add_argument("--datasets-uri", help=REGISTRY_HELP)
    checkpoints = add(
        what, "checkpoints", cmd_list_checkpoints, "complete checkpoints with ID, time and step"
    )
    checkpoints.add_argument("--job_id", "--job-id", dest="job_id", help="only this job's")
    _all_namespaces(checkpoints)
    hyper = add(
        what,
        "hyperparameters",
        cmd_list_hyperparameters,
        "every field with type, range, default, description",
    )
    hyper.add_argument(
        "--section",
        action="append",
        choices=list(catalog.SECTIONS),
        help="spec section (repeatable; default hyperparameters)",
    )
    hyper.add_argument("--all", action="store_true", help="every section")

    # add dataset
    adding = add(commands, "add", None, "register a dataset")
    add_what = adding.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser, required=True)
    dataset = add(
        add_what, "dataset", cmd_add_dataset, "validate, count and upload a dataset to the registry"
    )
    dataset.add_argument("--name", required=True, help="dataset name (lower case, digits, . _ -)")
    dataset.add_argument(
        "--paths",
        nargs="+",
        required=True,
        help="training files or folders: local paths, file:// or s3:// (globs allowed)",
    )
    dataset.add_argument(
        "--eval-paths", nargs="+", help="evaluation files (default: evalSize records held out of train)"
    )
    dataset.add_argument("--format", choices=["text", "prompt-completion", "chat"], help="default: detected")
    dataset.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="count tokens with this model's tokenizer: a catalog name (found in the local Hugging Face cache) "
        f"or a local model folder with tokenizer.json (default {DEFAULT_MODEL}, the experiment template's model)",
    )
    dataset.add_argument("--replace", action="store_true", help="overwrite a dataset of the same name")
    dataset.add_argument("--datasets-uri", help=REGISTRY_HELP)

    # experiment
    experiment = add(commands, "experiment", None, "add, view or delete experiments (suspended FineTuneJobs)")
    exp = experiment.add_subparsers(dest="what", metavar="ACTION", parser_class=Parser, required=True)
    exp_add = add(
        exp, "add", cmd_experiment_add, "write an experiment in $EDITOR (validated by a server-side dry run)"
    )
    exp_add.add_argument("--name", help="metadata.name (default: exp-<model>-<time>)")
    exp_add.add_argument("--model", help=f"catalog model for the template (default {DEFAULT_MODEL})")
    exp_add.add_argument("--dataset", help="registered dataset for the template")
    exp_add.add_argument("--datasets-uri", help=REGISTRY_HELP)
    exp_add.add_argument(
        "-f", "--filename", help="take the manifest from this file (- for stdin) instead of an editor"
    )
    exp_view = add(exp, "view", cmd_experiment_view, "list experiments, or show one")
    exp_view.add_argument("name", nargs="?", help="experiment to show")
    _all_namespaces(exp_view)
    exp_delete = add(exp, "delete", cmd_experiment_delete, "delete experiments (FineTuneJobs)")
    exp_delete.add_argument("names", nargs="+", metavar="NAME")

    # run
    running = add(commands, "run", cmd_run, "start the newest N experiments (or the named ones)")
    running.add_argument(
        "-n", "--count", type=int, default=1, help="how many of the newest waiting experiments (default 1)"
    )
    running.add_argument("names", nargs="*", metavar="NAME", help="start these instead")
    running.add_argument(
        "-w", "--watch", action="store_true", help="show live progress bars until they finish"
    )
    _watch_options(running)

    # status
    status = add(commands, "status", cmd_status, "jobs with ID, model, start, end, phase and progress")
    status.add_argument(
        "-w", "--watch", action="store_true", help="live progress bars until every job finishes"
    )
    _watch_options(status)
    _all_namespaces(status)
    status_sub = status.add_subparsers(dest="status_command", metavar="view|cancel", parser_class=Parser)
    view = add(
        status_sub, "view", cmd_status_view, "one job: summary, evaluations, hyper-parameters or checkpoints"
    )
    view.add_argument("--job_id", "--job-id", dest="job_id", required=True)
    shown = view.add_mutually_exclusive_group()
    shown.add_argument("--summaries", action="store_true", help="evaluations and baselines by step")
    shown.add_argument("--hyperparams", action="store_true", help="hyper-parameters with defaults filled in")
    shown.add_argument("--checkpoints", action="store_true", help="complete checkpoints")
    cancel = add(status_sub, "cancel", cmd_status_cancel, "stop a job for good (it checkpoints first)")
    cancel.add_argument("--job_id", "--job-id", dest="job_id", required=True)

    # eval
    evaluate = add(
        commands, "eval", cmd_eval, "evaluate a checkpoint or a catalog model on a dataset (no training)"
    )
    target = evaluate.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="catalog model name")
    target.add_argument(
        "--checkpoint",
        help="checkpoint ID <job>:<step> (see list checkpoints); without --dataset/--data, on its job's eval set",
    )
    target.add_argument("--uri", help="model URI: s3://…, file://… or hf://org/name")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="registered dataset (its eval/ files, else held-out records)")
    source.add_argument("--data", nargs="+", help="eval files: paths or URIs the trainer can read")
    evaluate.add_argument("--format", choices=["text", "prompt-completion", "chat"])
    evaluate.add_argument("--max-batches", type=int, help="evaluate at most this many micro-batches")
    evaluate.add_argument("--name", help="the evaluation job's name")
    evaluate.add_argument("--datasets-uri", help=REGISTRY_HELP)
    evaluate.add_argument("--wait", action="store_true", help="wait for the result and print it")
    evaluate.add_argument("--interval", type=float, default=2.0)
    evaluate.add_argument("--timeout", type=float, default=1800.0)

    # compare, plot, shell
    compare = add(
        commands,
        "compare",
        cmd_compare,
        "Model | Step | Accuracy | Loss | Perplexity of baselines and checkpoints",
    )
    compare.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to compare (default: all)")
    plot = add(commands, "plot", cmd_plot, "PNG of eval metrics against steps for jobs and baselines")
    plot.add_argument("jobs", nargs="*", metavar="JOB", help="jobs to plot (default: all)")
    plot.add_argument(
        "--out", default="finetune-plot.png", help="PNG file to write (default finetune-plot.png)"
    )

    # a job's pods, events and TensorBoard
    tensorboard = add(
        commands,
        "tensorboard",
        cmd_tensorboard,
        "serve a job's TensorBoard on a local port (refreshed while it runs)",
    )
    tensorboard.add_argument("job", metavar="JOB")
    tensorboard.add_argument(
        "--port", type=int, default=6006, help="local port (default 6006; 0: any free one)"
    )
    tensorboard.add_argument(
        "--interval", type=float, default=10.0, help="seconds between refreshes (default 10)"
    )
    tensorboard.add_argument(
        "--timeout", type=float, default=0.0, help="stop serving after this many seconds (0: Ctrl-C)"
    )
    logs = add(commands, "logs", cmd_logs, "a job's training log (rank 0 unless --rank or --all-ranks)")
    logs.add_argument("job", metavar="JOB")
    ranks = logs.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, default=0, help="the pod of this node rank (default 0)")
    ranks.add_argument("--all-ranks", action="store_true", help="every pod, each line prefixed with its rank")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    events = add(commands, "events", cmd_events, "Kubernetes events of a job, its batch Job and its pods")
    events.add_argument("job", metavar="JOB")

    # setup and the plugin itself
    init = add(
        commands,
        "init",
        cmd_init,
        "prepare the namespace for jobs: the storage credentials Secret from your keys",
    )
    init.add_argument(
        "--profile", help="take the keys of this AWS profile (default: AWS_ACCESS_KEY_ID/… or ~/.aws)"
    )
    init.add_argument(
        "--secret-name", help="the Secret's name (default: the operator's storage.credentialsSecret)"
    )
    add(commands, "version", cmd_version, "versions of the plugin, the operator and the cluster")
    completion = add(commands, "completion", cmd_completion, "shell completion script: bash or zsh")
    completion.add_argument("shell_name", metavar="SHELL", choices=["bash", "zsh"])
    add(commands, "shell", cmd_shell, "an interactive shell with the same commands")
    return parser


HELP_HEADER = "Documented commands (type help <topic>):"


def usage(topic: str | None) -> str:
    """The shell's `help`: every command with what it does (as the studio's Launchpad listed
    them), or one command's options."""
    parser = build_parser()
    if topic is None:
        lines = ["", HELP_HEADER, "=" * len(HELP_HEADER)]
        actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for choice in actions._choices_actions:
            if choice.dest in SHELL_HIDDEN:
                continue
            lines.append(f"{choice.dest:<12} {choice.help}")
        lines += [
            f"{'history':<12} the commands typed in this shell",
            f"{'exit':<12} leave the shell (also quit, Ctrl-D)",
            "",
        ]
        return "\n".join(lines)
    with contextlib.suppress(SystemExit):
        parser.parse_args([*topic.split(), "--help"])
    return ""
