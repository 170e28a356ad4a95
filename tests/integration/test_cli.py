"""`kubectl finetune` against the real local cluster: the installed console script, run as a
kubectl plugin or directly, with the cluster's KUBECONFIG and S3 variables.

Job status is written through the status subresource (as the operator would), so these tests do
not depend on the operator; test_cli_workflow.py runs the whole studio workflow with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.cli_env import CLI, cli, cli_env, cli_json, experiment_file, get_ftj, set_status
from tests.integration.operator_env import assert_no_other_operator
from tests.kube import ClusterHandle, wait_for
from tests.unit.cli_factories import REUTERS_STATUS as REUTERS

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLE = ROOT / "examples" / "data" / "market-reports"

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crd(cluster: ClusterHandle) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=60s")


@pytest.fixture(scope="module")
def status_writable(cluster: ClusterHandle, crd: None) -> None:
    """Tests that write a job's status themselves need no operator overwriting it."""
    assert_no_other_operator(cluster)


@pytest.fixture(scope="module")
def datasets_uri(cluster: ClusterHandle) -> str:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    cluster.s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/datasets/"


@pytest.fixture
def finished_job(cluster: ClusterHandle, namespace: str, status_writable: None, tmp_path: Path) -> str:
    path = experiment_file(
        tmp_path, "neox", model={"name": "pythia-1.4b"}, evaluation={"baselines": [{"name": "gpt-j-6b"}]}
    )
    cluster.kubectl("create", "-n", namespace, "-f", str(path))
    set_status(cluster, namespace, "neox", REUTERS)
    return "neox"


# ---- offline commands and the plugin mechanism -------------------------------------------------------
def test_runs_as_a_kubectl_plugin(cluster: ClusterHandle) -> None:
    result = subprocess.run(
        ["kubectl", "finetune", "list", "models", "--family", "pythia", "-o", "json"],
        capture_output=True,
        text=True,
        env=cli_env(cluster),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [m["name"] for m in json.loads(result.stdout)][-1] == "pythia-12b"


def test_unreachable_cluster_says_what_to_do(cluster: ClusterHandle, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "x", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
                "current-context": "x",
            }
        )
    )
    result = cli(cluster, "default", "status", check=False, env=cli_env(cluster, KUBECONFIG=str(kubeconfig)))
    assert result.returncode == 1
    assert "error: cannot reach the Kubernetes API at https://127.0.0.1:1" in result.stderr
    assert "hint: is the cluster running?" in result.stderr


# ---- datasets ------------------------------------------------------------------------------------------
def test_add_dataset_validates_counts_and_registers(
    cluster: ClusterHandle, namespace: str, datasets_uri: str
) -> None:
    result = cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        "market-reports",
        "--paths",
        str(EXAMPLE / "train.jsonl"),
        "--eval-paths",
        str(EXAMPLE / "eval.jsonl"),
        datasets_uri=datasets_uri,
    )
    assert "dataset market-reports registered: text, 400 train records, 40 eval records" in result.stdout
    bucket, prefix = datasets_uri[5:].split("/", 1)
    keys = {o["Key"] for o in cluster.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert keys == {
        f"{prefix}market-reports/train/train.jsonl",
        f"{prefix}market-reports/eval/eval.jsonl",
        f"{prefix}market-reports/dataset.json",
    }
    listed = cli_json(cluster, namespace, "list", "datasets", datasets_uri=datasets_uri)
    row = next(d for d in listed if d["name"] == "market-reports")
    assert (row["format"], row["trainRecords"], row["evalRecords"], row["files"]) == ("text", 400, 40, 2)

    again = cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        "market-reports",
        "--paths",
        str(EXAMPLE / "train.jsonl"),
        datasets_uri=datasets_uri,
        check=False,
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--replace" in again.stderr


def test_add_dataset_from_s3_with_a_glob(cluster: ClusterHandle, namespace: str, datasets_uri: str) -> None:
    bucket = datasets_uri[5:].split("/", 1)[0]
    s3 = cluster.s3_client()
    for i in range(2):
        s3.put_object(
            Bucket=bucket, Key=f"raw/qa-{i}.jsonl", Body=b'{"prompt": "q", "completion": "a"}\n' * (i + 1)
        )
    cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        "qa",
        "--paths",
        f"s3://{bucket}/raw/qa-*.jsonl",
        datasets_uri=datasets_uri,
    )
    listed = cli_json(cluster, namespace, "list", "datasets", datasets_uri=datasets_uri)
    row = next(d for d in listed if d["name"] == "qa")
    assert (row["format"], row["trainRecords"], row["evalRecords"]) == ("prompt-completion", 3, None)


@pytest.mark.parametrize(
    ("content", "paths", "message"),
    [
        pytest.param(
            '{"text": "ok"}\n{"text": ""}\n{"txt": "x"}\n',
            None,
            "2 record(s) the trainer would reject",
            id="bad-records",
        ),
        pytest.param(None, ["/nonexistent/train.jsonl"], "no such file or folder", id="missing-path"),
        pytest.param('{"body": "x"}\n', None, "cannot tell the format", id="unknown-format"),
    ],
)
def test_add_dataset_rejects_bad_input_and_uploads_nothing(
    cluster: ClusterHandle,
    namespace: str,
    datasets_uri: str,
    tmp_path: Path,
    content: str | None,
    paths: list[str] | None,
    message: str,
) -> None:
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    name = f"bad-{uuid.uuid4().hex[:6]}"
    result = cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        name,
        "--paths",
        *(paths or [str(data)]),
        datasets_uri=datasets_uri,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr
    if content and "reject" in message:
        assert f"{data}:2: field 'text' is empty" in result.stderr
        assert f"{data}:3: missing field 'text'" in result.stderr
    names = [d["name"] for d in cli_json(cluster, namespace, "list", "datasets", datasets_uri=datasets_uri)]
    assert name not in names


def _parquet_bytes(**columns: list[object]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=16)
    return buffer.getvalue()


def test_add_dataset_from_s3_parquet_and_zstd_counts_records_and_tokens_per_split(
    cluster: ClusterHandle, namespace: str, datasets_uri: str, tmp_path: Path
) -> None:
    import zstandard

    from tests.trainer.factories import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    bucket = datasets_uri[5:].split("/", 1)[0]
    train = [f"the market rose {i} times " * (1 + i % 4) for i in range(50)]
    evaluation = [f"shares fell {i}" for i in range(7)]
    s3 = cluster.s3_client()
    s3.put_object(Bucket=bucket, Key="raw/train.parquet", Body=_parquet_bytes(id=list(range(50)), text=train))
    body = "".join(json.dumps({"text": t}) + "\n" for t in evaluation).encode()
    s3.put_object(Bucket=bucket, Key="raw/eval.jsonl.zst", Body=zstandard.ZstdCompressor().compress(body))
    result = cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        "wire",
        "--paths",
        f"s3://{bucket}/raw/train.parquet",
        "--eval-paths",
        f"s3://{bucket}/raw/eval.jsonl.zst",
        "--tokenizer",
        str(tmp_path / "tokenizer"),
        datasets_uri=datasets_uri,
    )
    tokens = {
        split: sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # every document with its EOS
        for split, texts in (("train", train), ("eval", evaluation))
    }
    assert (
        f"dataset wire registered: text, 50 train records ({tokens['train']:,} tokens), "
        f"7 eval records ({tokens['eval']:,} tokens)"
    ) in result.stdout
    prefix = datasets_uri[5:].split("/", 1)[1]
    metadata = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}wire/dataset.json")["Body"].read())
    assert (metadata["trainRecords"], metadata["trainTokens"]) == (50, tokens["train"])
    assert (metadata["evalRecords"], metadata["evalTokens"]) == (7, tokens["eval"])
    assert [f["key"] for f in metadata["files"]] == ["wire/train/train.parquet", "wire/eval/eval.jsonl.zst"]


@pytest.mark.parametrize(
    ("key", "body", "extra", "message"),
    [
        pytest.param(
            "t.jsonl.bz2",
            b"BZh9",
            [],
            "t.jsonl.bz2: compression 'bz2' is not supported; use JSONL (.jsonl, .json), "
            "Parquet (.parquet) or plain-text (.txt) files",
            id="unknown-compression",
        ),
        pytest.param(
            "t.parquet",
            _parquet_bytes(body=["a", "b"]),
            [],
            "t.parquet:row 1: cannot tell the format from the columns ['body']",
            id="parquet-no-text-detected",
        ),
        pytest.param(
            "t.parquet",
            _parquet_bytes(body=["a", "b"]),
            ["--format", "text"],
            "t.parquet: no column 'text' (dataset.textField); the file has columns ['body']",
            id="parquet-no-text",
        ),
        pytest.param(
            "t.jsonl.gz",
            b'{"text": "x"}\n',
            [],
            "t.jsonl.gz: named .gz but is not gzip data",
            id="gz-not-gzip",
        ),
        pytest.param("t.jsonl", b"", [], "t.jsonl: no records: the file is empty", id="empty-file"),
        pytest.param(
            "t.jsonl",
            b'{"text": "ok"}\n[1]\n',
            ["--format", "text"],
            "t.jsonl:2: a record must be a JSON object",
            id="line",
        ),
    ],
)
def test_add_dataset_from_s3_names_the_file_it_cannot_read(
    cluster: ClusterHandle,
    namespace: str,
    datasets_uri: str,
    key: str,
    body: bytes,
    extra: list[str],
    message: str,
) -> None:
    bucket = datasets_uri[5:].split("/", 1)[0]
    folder = f"bad-{uuid.uuid4().hex[:6]}"
    cluster.s3_client().put_object(Bucket=bucket, Key=f"{folder}/{key}", Body=body)
    result = cli(
        cluster,
        namespace,
        "add",
        "dataset",
        "--name",
        folder,
        "--paths",
        f"s3://{bucket}/{folder}/{key}",
        *extra,
        datasets_uri=datasets_uri,
        check=False,
    )
    assert result.returncode == 1
    assert f"s3://{bucket}/{folder}/{message}" in result.stderr, result.stderr
    names = [d["name"] for d in cli_json(cluster, namespace, "list", "datasets", datasets_uri=datasets_uri)]
    assert folder not in names


# ---- experiments -------------------------------------------------------------------------------------
EDITOR = textwrap.dedent(
    """\
    import pathlib, sys
    path, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[0]).with_suffix(".log")
    rounds = log.read_text().count("=== round") if log.exists() else 0
    text = path.read_text()
    with log.open("a") as handle:
        handle.write(f"=== round {rounds + 1}\\n{text}")
    if rounds == 0:
        text = text.replace("maxSteps: 100", "maxSteps: 100\\n    dropout: 1.5")
    elif "{mode}" == "fix":
        text = text.replace("dropout: 1.5", "dropout: 0.1")
    path.write_text(text)
    """
)


def editor(tmp_path: Path, mode: str) -> tuple[str, Path]:
    script = tmp_path / "editor.py"
    script.write_text(EDITOR.replace("{mode}", mode))
    return f"{sys.executable} {script}", script.with_suffix(".log")


def test_experiment_add_reopens_the_editor_with_the_error_until_valid(
    cluster: ClusterHandle, namespace: str, crd: None, tmp_path: Path
) -> None:
    command, log = editor(tmp_path, "fix")
    env = cli_env(cluster, EDITOR=command)
    result = cli(cluster, namespace, "experiment", "add", "--name", "exp-a", "--model", "pythia-70m", env=env)
    assert "experiment exp-a saved (suspended)" in result.stdout
    rounds = log.read_text().split("=== round ")[1:]
    assert len(rounds) == 2
    assert "# ERROR: spec.hyperparameters.dropout" in rounds[1]
    assert "less than or equal to 1" in rounds[1]
    job = get_ftj(cluster, namespace, "exp-a")
    assert job["spec"]["suspend"] is True
    assert job["spec"]["hyperparameters"]["dropout"] == 0.1
    assert job["metadata"]["labels"]["finetune.dev/role"] == "experiment"


def test_experiment_add_cancelled_when_the_error_is_not_fixed(
    cluster: ClusterHandle, namespace: str, crd: None, tmp_path: Path
) -> None:
    command, _ = editor(tmp_path, "keep")
    result = cli(
        cluster,
        namespace,
        "experiment",
        "add",
        "--name",
        "exp-b",
        check=False,
        env=cli_env(cluster, EDITOR=command),
    )
    assert result.returncode == 1
    assert "edit cancelled" in result.stderr
    assert cluster.kubectl("get", "ftj", "exp-b", "-n", namespace, check=False).returncode != 0


def test_experiment_add_from_a_file_reports_every_error(
    cluster: ClusterHandle, namespace: str, crd: None, tmp_path: Path
) -> None:
    path = experiment_file(
        tmp_path,
        "exp-c",
        model={"name": "pythia-71m"},
        hyperparameters={"batchSize": 6, "microBatchSize": 4, "lrScheduler": "exp"},
    )
    result = cli(cluster, namespace, "experiment", "add", "-f", str(path), check=False)
    assert result.returncode == 1
    assert "spec.hyperparameters.lrScheduler: Unsupported value" in result.stderr
    assert "unknown catalog model 'pythia-71m'" in result.stderr


def test_experiment_view_run_and_delete(
    cluster: ClusterHandle, namespace: str, crd: None, tmp_path: Path
) -> None:
    for name in ("exp-1", "exp-2", "exp-3"):
        cli(cluster, namespace, "experiment", "add", "-f", str(experiment_file(tmp_path, name)))
        time.sleep(1.1)  # distinct creation timestamps (second resolution)
    listed = cli_json(cluster, namespace, "experiment", "view")
    assert [e["id"] for e in listed] == ["exp-3", "exp-2", "exp-1"]
    assert {e["phase"] for e in listed} <= {"Suspended"}
    shown = yaml.safe_load(cli(cluster, namespace, "experiment", "view", "exp-1").stdout)
    assert shown["spec"]["model"] == {"name": "pythia-70m", "init": "pretrained"}

    assert cli_json(cluster, namespace, "run", "-n", "2") == {"started": ["exp-2", "exp-3"]}
    suspended = {n: get_ftj(cluster, namespace, n)["spec"]["suspend"] for n in ("exp-1", "exp-2", "exp-3")}
    assert suspended == {"exp-1": True, "exp-2": False, "exp-3": False}

    cli(cluster, namespace, "experiment", "delete", "exp-1")
    assert cluster.kubectl("get", "ftj", "exp-1", "-n", namespace, check=False).returncode != 0
    nothing = cli(cluster, namespace, "run", check=False)
    assert nothing.returncode == 1
    assert "no experiment waiting to run" in nothing.stderr


# ---- status, checkpoints, compare, plot ---------------------------------------------------------------------
def test_status_and_status_view(cluster: ClusterHandle, namespace: str, finished_job: str) -> None:
    rows = cli_json(cluster, namespace, "status")
    assert [(r["id"], r["model"], r["phase"], r["progress"], r["start"], r["end"]) for r in rows] == [
        (
            "neox",
            "pythia-1.4b",
            "Succeeded",
            "2000/2000 (100%)",
            "2026-11-29T06:01:00Z",
            "2026-11-29T09:01:00Z",
        )
    ]
    table = cli(cluster, namespace, "status").stdout
    for text in ("ID", "Model", "Start", "End", "Phase", "Progress", "neox", "11-29 09:01"):
        assert text in table

    summaries = cli(cluster, namespace, "status", "view", "--job_id", finished_job, "--summaries").stdout
    assert "gpt-j-6b" in summaries and "neox:2000" in summaries and "0.602" in summaries
    hyper = {
        r["name"]: r
        for r in cli_json(cluster, namespace, "status", "view", "--job_id", finished_job, "--hyperparams")
    }
    assert (hyper["maxSteps"]["value"], hyper["maxSteps"]["changed"]) == (10, True)
    assert (hyper["dropout"]["value"], hyper["dropout"]["default"], hyper["dropout"]["changed"]) == (
        0.0,
        0.0,
        False,
    )
    checkpoints = cli_json(cluster, namespace, "status", "view", "--job_id", finished_job, "--checkpoints")
    assert [c["id"] for c in checkpoints] == ["neox:1000", "neox:2000"]
    summary = cli_json(cluster, namespace, "status", "view", "--job_id", finished_job)
    assert summary["phase"] == "Succeeded"

    missing = cli(cluster, namespace, "status", "view", "--job_id", "nope", check=False)
    assert missing.returncode == 1
    assert f"FineTuneJob nope not found in namespace {namespace}" in missing.stderr
    assert "hint:" in missing.stderr


def test_list_checkpoints_compare_and_plot(
    cluster: ClusterHandle, namespace: str, finished_job: str, tmp_path: Path
) -> None:
    listed = cli_json(cluster, namespace, "list", "checkpoints")
    assert [(c["id"], c["step"], c["time"]) for c in listed] == [
        ("neox:1000", 1000, "2026-11-29T07:31:00Z"),
        ("neox:2000", 2000, "2026-11-29T09:01:00Z"),
    ]
    table = cli(cluster, namespace, "compare").stdout
    assert "Model" in table and "Perplexity" in table
    rows = cli_json(cluster, namespace, "compare", finished_job)
    assert [(r["model"], r["step"], r["accuracy"], r["loss"], r["perplexity"]) for r in rows] == [
        ("gpt-j-6b", 0, 0.625, 1.92, 6.84),
        ("pythia-1.4b", 0, 0.52, 2.41, 11.13),
        ("pythia-1.4b", 1000, 0.59, 1.95, 7.03),
        ("pythia-1.4b", 2000, 0.602, 1.88, 6.56),
    ]
    png = tmp_path / "plot.png"
    result = cli(cluster, namespace, "plot", finished_job, "--out", str(png))
    assert f"wrote {png}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_cancel(cluster: ClusterHandle, namespace: str, finished_job: str, tmp_path: Path) -> None:
    done = cli(cluster, namespace, "status", "cancel", "--job_id", finished_job, check=False)
    assert done.returncode == 1
    assert "already finished (Succeeded)" in done.stderr
    cli(cluster, namespace, "experiment", "add", "-f", str(experiment_file(tmp_path, "to-cancel")))
    set_status(cluster, namespace, "to-cancel", {"phase": "Running", "startTime": "2026-11-29T06:00:00Z"})
    result = cli(cluster, namespace, "status", "cancel", "--job_id", "to-cancel")
    assert "cancelling to-cancel" in result.stdout
    assert get_ftj(cluster, namespace, "to-cancel")["spec"]["cancel"] is True


def test_status_watch_shows_live_progress(
    cluster: ClusterHandle, namespace: str, status_writable: None, tmp_path: Path
) -> None:
    cli(cluster, namespace, "experiment", "add", "-f", str(experiment_file(tmp_path, "watched")))
    set_status(cluster, namespace, "watched", {"phase": "Running", "progress": {"step": 5, "totalSteps": 10}})
    running = cli(cluster, namespace, "status", "--watch", "--interval", "0.5", "--timeout", "2")
    assert "watched" in running.stdout and "50%" in running.stdout and "5/10 Running" in running.stdout
    set_status(
        cluster, namespace, "watched", {"phase": "Succeeded", "progress": {"step": 10, "totalSteps": 10}}
    )
    done = cli(cluster, namespace, "status", "--watch")  # nothing unfinished: returns at once
    assert "no running FineTuneJobs to watch" in done.stdout


# ---- eval --------------------------------------------------------------------------------------------
def test_eval_of_a_checkpoint_creates_an_evaluate_mode_job_and_waits_for_its_result(
    cluster: ClusterHandle, namespace: str, finished_job: str
) -> None:
    evaluation = subprocess.Popen(
        [
            str(CLI),
            f"--namespace={namespace}",
            "eval",
            "--checkpoint",
            f"{finished_job}:1000",
            "--data",
            "s3://data/patents-eval.jsonl",
            "--name",
            "eval-ckpt",
            "--wait",
            "--interval",
            "0.5",
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(cluster),
    )
    try:
        job = wait_for(
            lambda: (
                cluster.kubectl("get", "ftj", "eval-ckpt", "-n", namespace, "-o", "json", check=False).stdout
            ),
            timeout=30,
            what="the evaluation job",
        )
        spec = json.loads(job)["spec"]
        assert spec["mode"] == "Evaluate"
        assert spec["model"] == {"uri": REUTERS["checkpoints"][0]["uri"], "init": "pretrained"}
        assert spec["dataset"]["eval"] == ["s3://data/patents-eval.jsonl"] and "train" not in spec["dataset"]
        assert spec["evaluation"]["atStart"] is True and "maxSteps" not in spec["hyperparameters"]
        set_status(
            cluster,
            namespace,
            "eval-ckpt",
            {
                "phase": "Running",
                "model": "step-001000",
                "evaluations": [{"step": 0, "loss": 2.2, "accuracy": 0.55, "perplexity": 9.03}],
            },
        )
        out, err = evaluation.communicate(timeout=30)
    finally:
        evaluation.kill()
    assert evaluation.returncode == 0, err
    assert "step-001000" in out and "0.550" in out and "evaluation" in out
    rows = cli_json(cluster, namespace, "compare")
    assert ("step-001000", 0, "evaluation") in [(r["model"], r["step"], r["kind"]) for r in rows]


def test_eval_rejects_unknown_checkpoints_and_models(
    cluster: ClusterHandle, namespace: str, finished_job: str
) -> None:
    step = cli(
        cluster,
        namespace,
        "eval",
        "--checkpoint",
        f"{finished_job}:5",
        "--data",
        "s3://d/x.jsonl",
        check=False,
    )
    assert step.returncode == 1 and "it has steps 1000, 2000" in step.stderr
    model = cli(cluster, namespace, "eval", "--model", "gpt-5", "--data", "s3://d/x.jsonl", check=False)
    assert model.returncode == 1 and "unknown catalog model 'gpt-5'" in model.stderr


# ---- the interactive shell --------------------------------------------------------------------------
def test_shell_driven_by_stdin(cluster: ClusterHandle, namespace: str, finished_job: str) -> None:
    script = "\n".join(
        [
            "help",
            "list models --family cerebras",
            "status",
            "compare -o json",
            "status view",
            "history",
            "exit",
        ]
    )
    result = cli(cluster, namespace, "shell", input=script + "\n")
    out = result.stdout
    assert "Documented commands (type help <topic>):" in out, "the Launchpad's help"
    assert "cerebras-gpt-13b" in out
    assert "neox" in out and "Succeeded" in out
    assert '"model": "gpt-j-6b"' in out
    assert "the following arguments are required: --job_id" in result.stderr
    assert "   6  history" in out
