"""Command-line parsing, offline commands and the interactive shell's loop (no cluster)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from finetune_cli import main, parser
from finetune_cli.commands import experiment
from finetune_cli.shell import StudioShell


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["list", "models"], {"what": "models", "output": "table"}, id="list-models"),
        pytest.param(
            ["-o", "json", "list", "datasets"], {"what": "datasets", "output": "json"}, id="output-before"
        ),
        pytest.param(
            ["list", "checkpoints", "-o", "yaml"],
            {"what": "checkpoints", "output": "yaml"},
            id="output-after",
        ),
        pytest.param(
            ["add", "dataset", "--name", "d", "--paths", "a.jsonl", "b.jsonl"],
            {"name": "d", "paths": ["a.jsonl", "b.jsonl"]},
            id="add-dataset",
        ),
        pytest.param(["run"], {"count": 1, "names": []}, id="run-default-one"),
        pytest.param(["run", "-n", "3"], {"count": 3}, id="run-n"),
        pytest.param(["status"], {"status_command": None, "watch": False}, id="status"),
        pytest.param(
            ["status", "view", "--job_id", "j", "--summaries"],
            {"job_id": "j", "summaries": True},
            id="status-view",
        ),
        pytest.param(["status", "cancel", "--job-id", "j"], {"job_id": "j"}, id="status-cancel-dash"),
        pytest.param(["eval", "--checkpoint", "j:100", "--dataset", "d"], {"checkpoint": "j:100"}, id="eval"),
        pytest.param(
            ["--namespace", "team", "compare", "a", "b"],
            {"jobs": ["a", "b"], "namespace": "team"},
            id="compare",
        ),
        pytest.param(["plot", "--out", "x.png"], {"out": "x.png", "jobs": []}, id="plot"),
        pytest.param(["-n", "team", "status"], {"namespace": "team"}, id="kubectl-n-before"),
        pytest.param(["status", "view", "-n", "team", "--job_id", "j"], {"namespace": "team"}, id="kubectl-n-after"),
        pytest.param(["-n", "team", "run", "-n", "2"], {"namespace": "team", "count": 2}, id="run-n-is-the-count"),
    ],
)
def test_parser_accepts_the_studio_commands(argv: list[str], expected: dict[str, object]) -> None:
    args = parser.build_parser().parse_args(argv)
    assert hasattr(args, "handler")
    for key, value in expected.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["list", "gpus"], "invalid choice: 'gpus'", id="unknown-list"),
        pytest.param(["status", "view"], "--job_id", id="view-needs-job"),
        pytest.param(
            ["eval", "--dataset", "d"],
            "one of the arguments --model --checkpoint --uri is required",
            id="eval-target",
        ),
        pytest.param(
            ["status", "view", "--job_id", "j", "--summaries", "--checkpoints"],
            "not allowed with",
            id="one-view",
        ),
    ],
)
def test_usage_errors_exit_2_with_a_hint(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main.run(argv, console=Console(file=io.StringIO())) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "hint: see `kubectl finetune" in err


def test_list_models_as_json_for_scripts() -> None:
    out = io.StringIO()
    assert main.run(["list", "models", "--family", "pythia", "-o", "json"], console=Console(file=out)) == 0
    rows = json.loads(out.getvalue())
    assert [r["name"] for r in rows][:2] == ["pythia-70m", "pythia-160m"]
    assert {"architecture", "parameters", "fullFinetuneGib", "loraGib"} <= set(rows[0])


def test_list_hyperparameters_table() -> None:
    out = io.StringIO()
    assert main.run(["list", "hyperparameters"], console=Console(file=out, width=250)) == 0
    text = out.getvalue()
    for header in ("Name", "Type", "Range", "Default", "Required", "Description"):
        assert header in text
    assert "[0.0, 1.0]" in text


def test_missing_registry_says_how_to_configure_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FINETUNE_DATASETS_URI", raising=False)
    assert main.run(["list", "datasets"], console=Console(file=io.StringIO())) == 1
    err = capsys.readouterr().err
    assert "error: no dataset registry configured" in err
    assert "FINETUNE_DATASETS_URI" in err


@pytest.mark.parametrize(
    ("env", "command"),
    [
        pytest.param({"KUBE_EDITOR": "code -w", "EDITOR": "nano"}, ["code", "-w"], id="kube-editor-first"),
        pytest.param({"EDITOR": "nano"}, ["nano"], id="editor"),
        pytest.param({}, ["vi"], id="default-vi"),
    ],
)
def test_editor_command(env: dict[str, str], command: list[str]) -> None:
    assert experiment.editor_command(env) == command


def _shell(lines: str) -> tuple[list[list[str]], str, StudioShell]:
    calls: list[list[str]] = []

    def run(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    out = io.StringIO()
    shell = StudioShell(run, parser.usage, stdin=io.StringIO(lines), stdout=out)
    shell.cmdloop()
    return calls, out.getvalue(), shell


def test_shell_runs_commands_and_keeps_history() -> None:
    calls, out, shell = _shell("list models\nstatus view --job_id 'my job'\nhistory\nexit\nlist models\n")
    assert calls == [["list", "models"], ["status", "view", "--job_id", "my job"]]
    assert "   1  list models\n   2  status view --job_id 'my job'\n   3  history\n" in out
    assert shell.history[-1] == "exit"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("help\n", "commands (type `help COMMAND` for options)", id="help"),
        pytest.param("?\n", "compare", id="question-mark"),
        pytest.param("bogus\n", "error: unknown command 'bogus'", id="unknown"),
        pytest.param("list 'unclosed\n", "error: No closing quotation", id="bad-quoting"),
    ],
)
def test_shell_help_and_errors(line: str, expected: str) -> None:
    calls, out, _ = _shell(line)
    assert expected in out
    assert calls == []


def test_shell_ends_at_end_of_input() -> None:
    calls, _, _ = _shell("run -n 2")
    assert calls == [["run", "-n", "2"]]
