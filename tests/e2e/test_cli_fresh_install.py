"""A new user's path after a fresh install: the chart installed as `make demo` installs it (storage
defaults set, the operator in finetune-system), a new namespace, and the README's next steps —
prepare the namespace, register a dataset, add an experiment, run it, watch it, compare — through
`kubectl finetune` with no environment variable beyond KUBECONFIG (the user's S3 keys only for
`init`, which puts them in the namespace's Secret). The plugin is installed as docs/cli.md says
(`pip install . ./cli`, not editable) into a virtualenv of its own, which must not contain torch
or transformers: the user's machine has no ML stack. It installs offline from the project's
wheelhouse (`finetune_dev.wheelhouse`, filled by dev/setup.sh). The real trainer trains a tiny
model; its TensorBoard is served from the run folder in S3, and its logs and events are read back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev import demo, wheelhouse
from tests.kube import ClusterHandle, get, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
# What `pip install . ./cli` needs from a checkout (as .dockerignore's allowlist, plus cli/).
SOURCES = ("pyproject.toml", "README.md", "constraints.txt", "operator", "trainer", "cli")


@pytest.fixture(scope="module")
def plugin_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's install of the plugin: a new virtualenv, `pip install . ./cli` (copied out of the
    checkout so the build leaves nothing in it), offline from the wheelhouse."""
    root = tmp_path_factory.mktemp("user-install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    wheelhouse.fill()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-index",
         "--find-links", str(wheelhouse.wheelhouse_dir()), "-c", str(source / "constraints.txt"),
         str(source), str(source / "cli")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    installed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "kubectl-finetune" in names
    assert not names & {"torch", "transformers", "accelerate", "peft"}, (
        "the plugin installs without the ML stack"
    )
    return venv / "bin"


def _tiny_model(target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from tests.trainer.factories import make_tokenizer, tiny_config

    tokenizer = make_tokenizer()
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _user_env(cluster: ClusterHandle, plugin_bin: Path, home: Path, **extra: str) -> dict[str, str]:
    """What a user's shell has: KUBECONFIG, PATH with kubectl and the plugin, a HOME without
    ~/.aws — no FINETUNE_* and no AWS_* variable."""
    home.mkdir(exist_ok=True)
    path = f"{cluster.cluster.bin_dir}:{plugin_bin}:/usr/bin:/bin"
    return {"KUBECONFIG": str(cluster.kubeconfig), "PATH": path, "HOME": str(home), **extra}


def _kubectl_finetune(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", "finetune", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, f"kubectl finetune {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _can_i(cluster: ClusterHandle, *args: str) -> bool:
    result = cluster.kubectl(
        "auth", "can-i", *args, "-n", demo.OPERATOR_NAMESPACE, "--as=alice", "--as-group=system:authenticated",
        check=False,
    )  # fmt: skip
    return result.stdout.strip() == "yes"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_readme_next_steps_in_a_new_namespace_with_only_kubeconfig(
    cluster: ClusterHandle, plugin_bin: Path, tmp_path: Path
) -> None:
    demo.install_operator(cluster.cluster)
    s3 = cluster.s3_client()
    for bucket in ("finetune-models", "finetune-datasets", "finetune-runs"):
        demo._ensure_bucket(s3, bucket)
    model_key = f"tiny-llama-{uuid.uuid4().hex[:6]}/"
    demo._upload_dir(s3, _tiny_model(tmp_path / "tiny-llama"), "finetune-models", model_key)
    namespace = f"studio-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")

    # The defaults ConfigMap: every authenticated user may read it, and nothing else of the namespace.
    assert _can_i(cluster, "get", "configmap/finetune-defaults")
    assert not _can_i(cluster, "get", "configmap/other")
    assert not _can_i(cluster, "list", "configmaps")
    published = get(cluster, demo.OPERATOR_NAMESPACE, "configmap", "finetune-defaults")["data"]
    assert (
        published["datasetsUri"] == "s3://finetune-datasets/"
        and published["credentialsSecret"] == demo.CREDENTIALS_SECRET
    )
    assert not any("SECRET" in k.upper() and k != "credentialsSecret" for k in published), "no credentials"

    env = _user_env(cluster, plugin_bin, tmp_path / "home")
    access, secret = cluster.cluster.s3_credentials()
    keys = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    prepared = _kubectl_finetune({**env, **keys}, "init", "-n", namespace)
    assert f"Secret {demo.CREDENTIALS_SECRET} created from your S3 keys" in prepared.stdout
    assert secret not in prepared.stdout + prepared.stderr, "init never prints the keys"

    # From here on: KUBECONFIG only.
    ns = f"--namespace={namespace}"
    dataset = f"market-{uuid.uuid4().hex[:6]}"
    added = _kubectl_finetune(
        env, "add", "dataset", ns, "--name", dataset,
        "--paths", str(demo.DATASET / "train.jsonl"), "--eval-paths", str(demo.DATASET / "eval.jsonl"),
    )  # fmt: skip
    assert f"in s3://finetune-datasets/{dataset}/" in added.stdout
    listed = json.loads(_kubectl_finetune(env, "list", "datasets", ns, "-o", "json").stdout)
    assert dataset in [d["name"] for d in listed]

    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "first"},
        "spec": {
            "model": {"uri": f"s3://finetune-models/{model_key}"},
            "dataset": {"name": dataset, "format": "text"},
            "hyperparameters": {"maxSteps": 6, "batchSize": 4, "sequenceLength": 64},
            "evaluation": {"everySteps": 3, "maxBatches": 2, "logEverySteps": 1},
            "checkpoints": {"everySteps": 3, "keepLast": 1},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(manifest))
    _kubectl_finetune(env, "experiment", "add", ns, "-f", str(path))
    watched = _kubectl_finetune(env, "run", ns, "--watch", "--interval", "2", "--timeout", "900", timeout=960)
    assert "started: first" in watched.stdout and "Succeeded" in watched.stdout, watched.stdout

    (row,) = json.loads(_kubectl_finetune(env, "status", ns, "-o", "json").stdout)
    assert (row["id"], row["phase"]) == ("first", "Succeeded"), row
    compared = json.loads(_kubectl_finetune(env, "compare", ns, "-o", "json").stdout)
    assert [(r["step"], r["kind"]) for r in compared] == [
        (0, "zero-shot"),
        (3, "fine-tuned"),
        (6, "fine-tuned"),
    ]
    job = get(cluster, namespace, "finetunejob", "first")
    status = job["status"]
    assert status["runUri"] == f"s3://finetune-runs/{namespace}/first/{job['metadata']['uid']}/"
    summary = json.loads(
        _kubectl_finetune(env, "status", "view", ns, "--job_id", "first", "-o", "json").stdout
    )
    assert summary["tensorboard"] == "kubectl finetune tensorboard first (serves http://127.0.0.1:6006/)"

    log = _kubectl_finetune(env, "logs", "first", ns).stdout
    assert log.strip(), "rank 0 printed its training log"
    events = json.loads(_kubectl_finetune(env, "events", "first", ns, "-o", "json").stdout)
    assert any(e["object"].startswith("pod/first-") for e in events), events
    assert _kubectl_finetune(env, "version").stdout.splitlines()[1].split() == ["operator", "0.1.0"]

    # TensorBoard, from the run folder in S3: its scalars are the job's train and eval losses.
    board = subprocess.Popen(
        ["kubectl", "finetune", "tensorboard", "first", ns, "--port", "0", "--interval", "1", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl-C as at a terminal: a shell running this suite in the background hands its children
        # SIGINT ignored, and a process started so never sees the KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert board.stdout is not None
        first = board.stdout.readline()
        assert first.startswith("TensorBoard of first: http://127.0.0.1:"), first + (
            board.stderr.read() if board.poll() else ""
        )
        url = first.split(": ", 1)[1].strip()
        tags = wait_for(
            lambda: (
                (found := _get_json(f"{url}data/plugin/scalars/tags").get("first", {}))
                and "eval/loss" in found
                and found
            ),
            timeout=60,
            what="TensorBoard to load the job's event files",
        )
        assert "train/loss" in tags

        def scalars(tag: str) -> dict[int, float]:
            query = urllib.parse.urlencode({"run": "first", "tag": tag})
            return {
                int(step): value for _, step, value in _get_json(f"{url}data/plugin/scalars/scalars?{query}")
            }

        evaluated = {int(e["step"]): e["loss"] for e in status["evaluations"]}
        served = scalars("eval/loss")
        # Every evaluation, the step-0 (zero-shot) one included.
        assert set(served) == set(evaluated), (served, evaluated)
        assert all(abs(served[s] - evaluated[s]) < 1e-4 for s in served), (served, evaluated)
        assert scalars("train/loss"), "train loss logged every step"
    finally:
        board.send_signal(signal.SIGINT)
        _, errors = board.communicate(timeout=30)  # waits, and closes its pipes
    assert board.returncode == 0, errors
