"""Shell completion: `kubectl_complete-finetune`'s candidates and the bash script that asks it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from finetune_cli import complete
from finetune_cli.commands.completion import SCRIPTS

JOBS = ["studio", "slowpoke"]


def jobs(words: Sequence[str]) -> list[str]:
    return list(JOBS)


@pytest.mark.parametrize(
    ("words", "expected", "directive"),
    [
        pytest.param(["li"], ["list"], complete.NO_FILES, id="command"),
        pytest.param(
            ["list", ""],
            ["models", "datasets", "checkpoints", "hyperparameters"],
            complete.NO_FILES,
            id="list-what",
        ),
        pytest.param(
            ["-o", ""], ["table", "wide", "name", "json", "yaml"], complete.NO_FILES, id="output-choices"
        ),
        pytest.param(
            ["status", "view", "--job_id", "s"], ["studio", "slowpoke"], complete.NO_FILES, id="job-option"
        ),
        pytest.param(["logs", ""], ["studio", "slowpoke"], complete.NO_FILES, id="job-argument"),
        pytest.param(["compare", "studio", ""], ["slowpoke"], complete.NO_FILES, id="jobs-not-repeated"),
        pytest.param(["completion", ""], ["bash", "zsh"], complete.NO_FILES, id="shell-choices"),
        pytest.param(["add", "dataset", "--paths", ""], [], complete.FILES, id="file-option"),
        pytest.param(["logs", "studio", "--ra"], ["--rank"], complete.NO_FILES, id="option-prefix"),
        pytest.param(["-n", "team", "st"], ["status"], complete.NO_FILES, id="after-a-global-option"),
    ],
)
def test_candidates(words: list[str], expected: list[str], directive: int) -> None:
    found, got = complete.candidates(words, jobs)
    assert [c.split("\t")[0] for c in found] == expected
    assert got == directive


def test_commands_come_with_their_help_as_cobra_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    complete.main(["__complete", "tensor"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tensorboard\tserve a job's TensorBoard")
    assert lines[-1] == f":{complete.NO_FILES}"


def test_bash_script_completes_through_kubectl_complete_finetune(tmp_path: Path) -> None:
    """The real bash, the script as `completion bash` prints it, and a `kubectl_complete-finetune`
    on PATH that runs this checkout's module (as the installed console script does)."""
    helper = tmp_path / "kubectl_complete-finetune"
    helper.write_text(f'#!/bin/sh\nexec {sys.executable} -m finetune_cli.complete "$@"\n')
    helper.chmod(0o755)
    script = tmp_path / "completion.bash"
    script.write_text(SCRIPTS["bash"])
    probe = (
        f"source {script}; COMP_WORDS=(kubectl-finetune list ch); COMP_CWORD=2; _kubectl_finetune; "
        'echo "${COMPREPLY[@]}"; '
        "COMP_WORDS=(kubectl-finetune -o j); COMP_CWORD=2; _kubectl_finetune; "
        'echo "${COMPREPLY[@]}"'
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "KUBECONFIG": str(tmp_path / "none")}
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["checkpoints", "json"]
