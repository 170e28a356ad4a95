"""The CLI's parts that run processes or servers on this machine, no cluster: the bash
completion script asking `kubectl_complete-finetune`, and `kubectl finetune tensorboard`'s two
halves — the real TensorBoard server on a copy of a run folder's event files, and the copy
catching up as the trainer appends (a file:// run folder stands in for S3; the e2e test reads a
real job's from S3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from finetune_cli import storage
from finetune_cli.commands.completion import SCRIPTS
from finetune_cli.commands.tensorboard import RELOAD_SECONDS, _serve
from finetune_trainer.storage import open_store
from tests.kube import wait_for


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


def _scalar_event(tag: str, step: int, value: float) -> Any:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def _scalars(url: str, run: str, tag: str) -> dict[int, float]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    with urllib.request.urlopen(f"{url}data/plugin/scalars/scalars?{query}", timeout=10) as response:
        return {int(step): round(value, 4) for _, step, value in json.loads(response.read())}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_served_scalars_follow_the_run_folder(tmp_path: Path) -> None:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run_folder = tmp_path / "runs" / "team" / "studio" / "tensorboard"
    writer = EventFileWriter(str(run_folder))
    writer.add_event(_scalar_event("train/loss", 1, 2.5))
    writer.add_event(_scalar_event("eval/loss", 0, 2.75))
    writer.flush()
    store = open_store(f"file://{run_folder}/")
    logdir = tmp_path / "copy"
    assert storage.sync_folder(store, logdir / "studio") == 1

    url = _serve(logdir, _free_port())
    assert url.startswith("http://127.0.0.1:")
    wait_for(lambda: _scalars(url, "studio", "eval/loss") == {0: 2.75}, timeout=60, what="the first scalars")
    assert _scalars(url, "studio", "train/loss") == {1: 2.5}

    # The trainer logs on; the next refresh appends the new records, TensorBoard reloads them.
    writer.add_event(_scalar_event("train/loss", 2, 2.25))
    writer.add_event(_scalar_event("eval/loss", 2, 2.5))
    writer.close()
    assert storage.sync_folder(store, logdir / "studio") == 1
    wait_for(
        lambda: _scalars(url, "studio", "eval/loss") == {0: 2.75, 2: 2.5},
        timeout=RELOAD_SECONDS * 6,
        what="TensorBoard to reload the appended records",
    )
    assert _scalars(url, "studio", "train/loss") == {1: 2.5, 2: 2.25}
