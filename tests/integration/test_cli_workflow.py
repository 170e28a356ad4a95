"""The studio workflow end to end with the real operator (KopfRunner, RBAC-limited identity) and
the stand-in trainer: experiment add → status → run --watch → status view → compare →
list checkpoints → plot → eval; and status cancel of a running job."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.cli_env import cli, cli_json, experiment_file, get_ftj
from tests.integration.operator_env import wait_phase
from tests.kube import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("operator")]


def test_experiment_run_watch_compare_plot(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    path = experiment_file(
        tmp_path,
        "studio",
        model={"name": "smollm2-135m-instruct"},
        dataset={"train": ["file:///standin/ok/train.jsonl"]},
        hyperparameters={"maxSteps": 20, "batchSize": 4},
        evaluation={"everySteps": 10},
        checkpoints={"everySteps": 5, "keepLast": 2},
        runPolicy={"backoffLimit": 0, "terminationGracePeriodSeconds": 30},
    )
    cli(cluster, namespace, "experiment", "add", "-f", str(path))
    wait_phase(cluster, namespace, "studio", "Suspended", timeout=60)
    assert [r["phase"] for r in cli_json(cluster, namespace, "status")] == ["Suspended"]

    watched = cli(cluster, namespace, "run", "--watch", "--interval", "0.5", "--timeout", "120")
    assert "started: studio" in watched.stdout
    assert "100%" in watched.stdout and "20/20" in watched.stdout and "Succeeded" in watched.stdout

    (row,) = cli_json(cluster, namespace, "status")
    assert (row["id"], row["phase"], row["progress"]) == ("studio", "Succeeded", "20/20 (100%)")
    assert row["start"] and row["end"]

    evaluations = cli_json(cluster, namespace, "status", "view", "--job_id", "studio", "--summaries")
    assert [(e["step"], e["kind"]) for e in evaluations] == [
        (0, "zero-shot"),
        (10, "fine-tuned"),
        (20, "fine-tuned"),
    ]
    assert evaluations[-1]["loss"] < evaluations[0]["loss"]
    table = cli(cluster, namespace, "compare").stdout
    assert "smollm2-135m-instruct" in table and "Perplexity" in table
    checkpoints = cli_json(cluster, namespace, "list", "checkpoints")
    assert [c["id"] for c in checkpoints] == ["studio:15", "studio:20"], "keepLast deleted steps 5 and 10"
    png = tmp_path / "studio.png"
    cli(cluster, namespace, "plot", "studio", "--out", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"

    cli(
        cluster,
        namespace,
        "eval",
        "--checkpoint",
        "studio:15",
        "--data",
        "file:///standin/ok/eval.jsonl",
        "--name",
        "eval-studio",
        "--wait",
        "--interval",
        "0.5",
        "--timeout",
        "120",
    )
    kinds = [(r["job"], r["step"], r["kind"]) for r in cli_json(cluster, namespace, "compare")]
    assert ("eval-studio", 0, "evaluation") in kinds
    evaluation = get_ftj(cluster, namespace, "eval-studio")
    assert (evaluation["spec"]["mode"], evaluation["spec"]["model"]["uri"]) == (
        "Evaluate",
        checkpoints[0]["uri"],
    )
    wait_phase(cluster, namespace, "eval-studio", "Succeeded", timeout=60)
    done = get_ftj(cluster, namespace, "eval-studio")["status"]
    assert (done["progress"]["steps"], done["progress"]["totalSteps"], done["checkpoints"]) == ("eval", 0, [])
    assert [e["step"] for e in done["evaluations"]] == [0]
    assert done["message"].startswith("evaluation finished: eval loss ")
    assert [r["id"] for r in cli_json(cluster, namespace, "list", "checkpoints")] == [
        "studio:15",
        "studio:20",
    ]


def test_status_cancel_stops_a_running_job(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    path = experiment_file(
        tmp_path,
        "slowpoke",
        model={"name": "smollm2-135m-instruct"},
        dataset={"train": ["file:///standin/slow/train.jsonl"]},
        hyperparameters={"maxSteps": 200, "batchSize": 4},
        runPolicy={"backoffLimit": 0, "terminationGracePeriodSeconds": 30},
    )
    cli(cluster, namespace, "experiment", "add", "-f", str(path))
    cli(cluster, namespace, "run", "slowpoke")
    wait_for(
        lambda: (
            (get_ftj(cluster, namespace, "slowpoke").get("status") or {}).get("progress", {}).get("step", 0)
            > 0
        ),
        timeout=60,
        what="slowpoke to train",
    )
    result = cli(cluster, namespace, "status", "cancel", "--job_id", "slowpoke")
    assert "cancelling slowpoke" in result.stdout
    wait_phase(cluster, namespace, "slowpoke", "Cancelled", timeout=90)
    assert [r["phase"] for r in cli_json(cluster, namespace, "status")] == ["Cancelled"]
