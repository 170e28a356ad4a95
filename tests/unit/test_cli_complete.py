"""Shell completion: `kubectl_complete-finetune`'s candidates (the bash script that asks it: tests/integration/test_cli_local.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from finetune_cli import complete

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
