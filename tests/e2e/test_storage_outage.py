"""The local cluster's S3 server (versitygw) stopped under a running FineTuneJob, and started again.

What a user sees during the outage: the job stays Running (the trainer retries each request, a
warning per retry in its log); the status lists only checkpoints whose every file is stored;
`kubectl finetune` commands that need the server give up after their short budget with one line
saying so. Afterwards the job ends Succeeded as without the fault: every listed checkpoint
matches its manifest and final/ is there. The trainer-level twin (tests/trainer/
test_storage_faults.py) compares such a run with one that saw no fault, number for number.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from finetune_dev import demo
from tests.e2e.test_demo import MARKET_REPORTS, _apply, _finished, _stage_market_reports
from tests.integration.cli_env import cli
from tests.kube import ClusterHandle, get, wait_for
from tests.trainer.factories import make_model_dir, make_tokenizer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DOWN_SECONDS = 25


def _complete_on_disk(bucket_dir: Path, record: dict[str, Any]) -> bool:
    """A listed checkpoint is complete in the bucket: its manifest and every file it names, with
    the size and SHA-256 it records (read from versitygw's posix folder, not through the server)."""
    folder = bucket_dir / str(record["uri"]).removeprefix("s3://finetune-runs/")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        stored = folder / entry["path"]
        if not stored.is_file() or stored.stat().st_size != entry["size"]:
            return False
        if hashlib.sha256(stored.read_bytes()).hexdigest() != entry["sha256"]:
            return False
    return True


@pytest.mark.timeout(1800)
def test_a_job_rides_out_an_s3_outage_and_ends_as_without_it(cluster: ClusterHandle, tmp_path: Path) -> None:
    _stage_market_reports(cluster)
    s3 = cluster.s3_client()
    tokenizer = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer)
    model_prefix = f"e2e-outage-llama-{uuid.uuid4().hex[:6]}/"
    demo._upload_dir(
        s3, make_model_dir("llama", tmp_path / "model", tokenizer), "finetune-models", model_prefix
    )
    name = _apply(cluster, f"outage-{uuid.uuid4().hex[:6]}", {
        "model": {"uri": f"s3://finetune-models/{model_prefix}"},
        "dataset": MARKET_REPORTS,
        "hyperparameters": {"maxSteps": 40, "batchSize": 4, "microBatchSize": 4, "sequenceLength": 64,
                            "learningRate": 1e-3, "lrScheduler": "constant"},
        "evaluation": {"everySteps": 10, "baselines": []},
        "checkpoints": {"everySteps": 5, "keepLast": 10},
        "resources": {"cpu": "1", "memory": "2Gi"},
    })  # fmt: skip
    bucket_dir = cluster.cluster.root / "s3" / "finetune-runs"
    job = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name)
    run_dir = bucket_dir / demo.DEMO_NAMESPACE / name / job["metadata"]["uid"]
    # the first checkpoint's upload has begun: cut the server there
    wait_for(lambda: (run_dir / "checkpoints").is_dir(), timeout=900, what="the first checkpoint upload")
    components = {component.name: component for component in cluster.cluster._components()}
    s3_server = components["versitygw"]
    s3_server.stop(cluster.cluster)
    down_since = time.monotonic()
    try:
        # the job rides it out: Running, and what its status lists is complete
        listed: list[dict[str, Any]] = []
        while time.monotonic() - down_since < DOWN_SECONDS:
            status = get(cluster, demo.DEMO_NAMESPACE, "finetunejob", name)["status"]
            assert status["phase"] == "Running", status
            listed = status.get("checkpoints") or []
            for record in listed:
                assert _complete_on_disk(bucket_dir, record), (
                    f"listed before all its files were stored: {record}"
                )
            time.sleep(2)
        # a command that needs the server says it does not answer, in one line, not a traceback
        result = cli(
            cluster, demo.DEMO_NAMESPACE, "list", "datasets",
            "--datasets-uri", "s3://finetune-datasets/", check=False,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert "object storage:" in result.stderr and "gave up" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        waited = re.search(r"failed \d+ times over (\d+) s", result.stderr)
        assert waited and int(waited.group(1)) <= 20, "the CLI's 20 s budget, not the pods' 600 s"
    finally:
        process = s3_server.start(cluster.cluster)
        s3_server.wait_healthy(cluster.cluster, process)

    status = _finished(cluster, name, timeout=900)
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["progress"]["steps"] == "40/40" and not status.get("restarts")
    assert [c["step"] for c in status["checkpoints"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    for record in status["checkpoints"]:
        assert _complete_on_disk(bucket_dir, record), record
    assert any((run_dir / "final").glob("*.safetensors")), "final/ exported once the server was back"
    [pod] = get(
        cluster, demo.DEMO_NAMESPACE, "pods", "-l", f"batch.kubernetes.io/job-name={status['jobName']}"
    )["items"]
    log = cluster.kubectl("logs", pod["metadata"]["name"], "-n", demo.DEMO_NAMESPACE).stdout
    assert "storage: " in log and "retrying in" in log, "each retry is a warning in the pod's log"
