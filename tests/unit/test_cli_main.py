"""Command-line parsing, offline commands and the interactive shell's loop (no cluster)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from finetune_cli import __version__, main, parser, shell
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
        pytest.param(
            ["status", "view", "-n", "team", "--job_id", "j"], {"namespace": "team"}, id="kubectl-n-after"
        ),
        pytest.param(
            ["-n", "team", "run", "-n", "2"], {"namespace": "team", "count": 2}, id="run-n-is-the-count"
        ),
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


def test_list_models_prints_memory_per_process_for_the_strategy() -> None:
    out = io.StringIO()
    argv = ["list", "models", "--family", "gptj", "--sharding", "fsdp", "--processes", "8"]
    assert main.run(argv, console=Console(file=out, width=250)) == 0
    text = " ".join(out.getvalue().split())  # the title may wrap
    assert "per training process" in text and "split over 8 processes" in text
    assert "11.2" in text, "GPT-J 6B full fine-tuning: 16 bytes a parameter split 8 ways"


def test_list_models_refuses_a_process_count_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.run(["list", "models", "--processes", "0"], console=Console(file=io.StringIO())) == 2
    assert "--processes: 0 is not at least 1" in capsys.readouterr().err


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
        pytest.param("help\n", "Documented commands (type help <topic>):", id="help"),
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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["list"], {"what": None}, id="bare-list"),
        pytest.param(["-o", "wide", "status"], {"output": "wide"}, id="output-wide"),
        pytest.param(["status", "-o", "name"], {"output": "name"}, id="output-name"),
        pytest.param(["status", "-A"], {"all_namespaces": True}, id="status-all-namespaces"),
        pytest.param(
            ["list", "checkpoints", "--all-namespaces"],
            {"all_namespaces": True},
            id="checkpoints-all-namespaces",
        ),
        pytest.param(["experiment", "view", "-A"], {"all_namespaces": True}, id="experiments-all-namespaces"),
        pytest.param(["--kubeconfig", "/k", "status"], {"kubeconfig": "/k"}, id="kubeconfig-before"),
        pytest.param(["status", "--kubeconfig=/k"], {"kubeconfig": "/k"}, id="kubeconfig-after"),
        pytest.param(["logs", "j"], {"job": "j", "rank": 0, "follow": False}, id="logs-rank-0"),
        pytest.param(["logs", "j", "--rank", "1", "-f"], {"rank": 1, "follow": True}, id="logs-rank-follow"),
        pytest.param(
            ["logs", "j", "--all-ranks", "--tail", "5"], {"all_ranks": True, "tail": 5}, id="logs-all"
        ),
        pytest.param(["events", "j"], {"job": "j"}, id="events"),
        pytest.param(["tensorboard", "j", "--port", "0"], {"job": "j", "port": 0}, id="tensorboard"),
        pytest.param(["version"], {"command": "version"}, id="version"),
        pytest.param(["completion", "zsh"], {"shell_name": "zsh"}, id="completion"),
        pytest.param(["init", "--profile", "p"], {"profile": "p", "secret_name": None}, id="init"),
        pytest.param(
            ["--operator-namespace", "ops", "list", "datasets"],
            {"operator_namespace": "ops"},
            id="operator-namespace",
        ),
    ],
)
def test_parser_accepts_the_plugin_commands(argv: list[str], expected: dict[str, object]) -> None:
    args = parser.build_parser().parse_args(argv)
    assert hasattr(args, "handler")
    for key, value in expected.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["-o", "csv", "status"], "argument -o/--output: invalid choice: 'csv'", id="output"),
        pytest.param(["logs"], "the following arguments are required: JOB", id="logs-needs-job"),
        pytest.param(["logs", "j", "--rank", "1", "--all-ranks"], "not allowed with", id="rank-or-all"),
        pytest.param(["completion", "fish"], "argument SHELL: invalid choice: 'fish'", id="fish"),
        pytest.param(["tensorboard", "j", "--port", "http"], "invalid int value: 'http'", id="port"),
        pytest.param(
            ["compare", "-A"], "unrecognized arguments: -A", id="all-namespaces-where-it-means-nothing"
        ),
    ],
)
def test_plugin_usage_errors_name_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main.run(argv, console=Console(file=io.StringIO())) == 2
    assert message in capsys.readouterr().err


def test_bare_list_prints_the_overview_and_says_why_a_part_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The studio's `list`: the catalog, datasets, checkpoints and hyper-parameters together;
    without a cluster or registry those parts say why, the others are still there."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("FINETUNE_DATASETS_URI", raising=False)
    out = io.StringIO()
    assert main.run(["list"], console=Console(file=out, width=250)) == 0
    text = out.getvalue()
    assert "Model catalog" in text and "pythia-1.4b" in text
    assert "datasets: no dataset registry configured" in text
    assert "checkpoints: no Kubernetes configuration" in text
    assert "spec.hyperparameters" in text and "learningRate" in text

    out = io.StringIO()
    assert main.run(["list", "-o", "json"], console=Console(file=out)) == 0
    overview = json.loads(out.getvalue())
    assert list(overview) == ["models", "datasets", "checkpoints", "hyperparameters"]
    assert "pythia-70m" in [m["name"] for m in overview["models"]]
    assert overview["datasets"]["error"].startswith("no dataset registry configured")
    assert "FINETUNE_DATASETS_URI" in overview["datasets"]["hint"]
    assert "dropout" in [h["name"] for h in overview["hyperparameters"]]


def test_output_name_prints_one_name_a_line() -> None:
    out = io.StringIO()
    assert main.run(["list", "models", "--family", "pythia", "-o", "name"], console=Console(file=out)) == 0
    assert out.getvalue().splitlines()[:2] == ["pythia-70m", "pythia-160m"]


def test_version_without_a_cluster_still_prints_the_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main.run(["version", "--kubeconfig", "/nonexistent"], console=Console(file=out)) == 0
    assert out.getvalue().splitlines()[0] == f"kubectl-finetune {__version__}"


def test_kubeconfig_flag_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main.run(["status", "--kubeconfig", str(tmp_path / "nope")], console=Console(file=io.StringIO())) == 1
    )
    assert f"error: --kubeconfig {tmp_path / 'nope'}" in capsys.readouterr().err


def test_shell_help_lists_every_command_like_the_launchpad() -> None:
    _, out, _ = _shell("help\n")
    lines = out.splitlines()
    header = lines.index("Documented commands (type help <topic>):")
    assert set(lines[header + 1]) == {"="}
    listed = {line.split()[0] for line in lines[header + 2 :] if line.strip()}
    commands = set(parser.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert listed == (commands - set(parser.SHELL_HIDDEN)) | {"history", "exit"}
    assert listed - {"history", "exit"} <= set(shell.COMMANDS), "the shell runs every command it lists"


def test_shell_greets_like_the_launchpad_on_a_terminal() -> None:
    assert shell.INTRO.startswith("Welcome to the fine-tuning studio's launchpad")
    assert "Type help or ? to list commands" in shell.INTRO


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["tensorboard", "j", "--port", "70000"], "--port 70000: a port is 0", id="port-range"),
        pytest.param(
            ["tensorboard", "j", "--interval", "0"], "--interval 0: must be more than 0", id="interval"
        ),
        pytest.param(["tensorboard", "j", "--timeout", "-1"], "--timeout -1: must be 0", id="timeout"),
        pytest.param(
            ["logs", "j", "--tail", "-3"], "--tail -3: the number of lines must be 0 or more", id="tail"
        ),
        pytest.param(["logs", "j", "--rank", "-1"], "--rank -1: node ranks start at 0", id="rank"),
    ],
)
def test_values_out_of_range_name_the_flag_before_the_cluster_is_asked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main.run([*argv, "--kubeconfig", str(tmp_path / "none")], console=Console(file=io.StringIO())) == 1
    assert f"error: {message}" in capsys.readouterr().err
