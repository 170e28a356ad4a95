"""`kubectl_complete-finetune`: shell completion candidates for `kubectl finetune …`.

kubectl (1.26 and later) runs `kubectl_complete-finetune ARG… PARTIAL` when a user presses TAB
after `kubectl finetune`, and expects Cobra's answer: one candidate a line (`value<TAB>help`),
then `:<directive>` (4: no file names; 0: the shell may offer file names). The bash and zsh
scripts of `kubectl finetune completion` ask the same. Candidates come from the parser itself
(commands, options, choices) and, for job arguments, from the cluster (best effort: no cluster,
no job names). `main`'s sibling: it reads `parser`, never runs a command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from finetune_cli.errors import CliError
from finetune_cli.parser import build_parser

NO_FILES = 4
FILES = 0
# Options whose value is a file; positional arguments that name jobs.
FILE_OPTIONS = {"-f", "--filename", "--paths", "--eval-paths", "--out", "--kubeconfig", "--data"}
JOB_OPTIONS = {"--job_id", "--job-id"}
JOB_ARGUMENTS = {"job", "jobs", "names", "name"}

JobNames = Callable[[Sequence[str]], list[str]]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _option(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    return next((a for a in parser._actions if word in a.option_strings), None)


def candidates(words: Sequence[str], job_names: JobNames) -> tuple[list[str], int]:
    """(candidates, directive) for the command line `words`, the last one being completed."""
    *done, partial = list(words) or [""]
    parser: argparse.ArgumentParser = build_parser()
    positionals: list[str] = []
    expecting: argparse.Action | None = None
    for word in done:
        if expecting is not None:
            expecting = None
            continue
        if word.startswith("-"):
            action = _option(parser, word.split("=", 1)[0])
            if action is not None and action.nargs != 0 and "=" not in word:
                expecting = action
            continue
        subcommands = _subcommands(parser)
        if word in subcommands:
            parser = subcommands[word][0]
            positionals = []
        else:
            positionals.append(word)
    if expecting is not None:
        return _values(expecting, partial, done, job_names)
    if partial.startswith("-"):
        options = sorted({s for a in parser._actions for s in a.option_strings if s.startswith(partial)})
        return options, NO_FILES
    found = [
        f"{name}\t{help}" for name, (_, help) in _subcommands(parser).items() if name.startswith(partial)
    ]
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        if action.choices:
            found += [str(c) for c in action.choices if str(c).startswith(partial)]
        elif action.dest in JOB_ARGUMENTS:
            found += [n for n in job_names(done) if n.startswith(partial) and n not in positionals]
    return found, NO_FILES


def _values(
    action: argparse.Action, partial: str, done: Sequence[str], job_names: JobNames
) -> tuple[list[str], int]:
    if action.choices:
        return [str(c) for c in action.choices if str(c).startswith(partial)], NO_FILES
    if set(action.option_strings) & JOB_OPTIONS:
        return [n for n in job_names(done) if n.startswith(partial)], NO_FILES
    if set(action.option_strings) & FILE_OPTIONS:
        return [], FILES
    return [], NO_FILES


def cluster_job_names(words: Sequence[str]) -> list[str]:
    """The FineTuneJobs of the namespace the command line names (or the context's); none when
    the cluster cannot be asked."""
    namespace = context = kubeconfig = None
    for flag, value in zip(words, [*words[1:], ""], strict=True):
        name, _, inline = flag.partition("=")
        value = inline or value
        if name in ("-n", "--namespace") and not (name == "-n" and "run" in words):
            namespace = value
        elif name == "--context":
            context = value
        elif name == "--kubeconfig":
            kubeconfig = value
    from finetune_cli import kube

    try:
        api, default_namespace = kube.load(context, kubeconfig)
        jobs = kube.Jobs(api, namespace or default_namespace).list()
    except CliError:  # no cluster to ask: no names (a completion prints no errors)
        return []
    return sorted(str(j["metadata"]["name"]) for j in jobs)


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["__complete"]:  # Cobra's spelling, when called through a plugin's own __complete
        words = words[1:]
    found, directive = candidates(words, cluster_job_names)
    sys.stdout.write("".join(f"{c}\n" for c in found) + f":{directive}\n")


if __name__ == "__main__":
    main()
