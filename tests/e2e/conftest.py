"""End-to-end tier: the product as a user runs it, on the real local cluster.

Boundary: everything real — the Helm chart installs the operator, which runs on the process node
under the chart's ServiceAccount; FineTuneJobs are applied with kubectl; the trainer runs real
torch in the training pods; models, data and checkpoints live in the versitygw S3 server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError

from finetune_dev import demo
from finetune_operator.api import LABEL_JOB_NAME
from tests.kube import ClusterHandle, wait_for


@pytest.fixture(autouse=True)
def _demo_jobs_removed(cluster: ClusterHandle) -> Iterator[None]:
    """Each test's FineTuneJobs in the demo namespace, their pods and their run folders are
    deleted when it ends. A SmolLM2 job leaves about 1 GB in its finished pods' volumes on the
    node and several GB in its run folder (checkpoints with the optimizer state, the export);
    the tier's jobs would otherwise pile them up on the disk for the rest of the session."""
    yield
    namespace = demo.DEMO_NAMESPACE
    deleted = cluster.kubectl(
        "delete", "finetunejobs", "--all", "-n", namespace, "--wait=true", check=False, timeout=300
    )
    if deleted.returncode != 0 and "doesn't have a resource type" not in deleted.stderr:  # no CRD: no jobs
        raise AssertionError(f"deleting the demo namespace's FineTuneJobs failed: {deleted.stderr}")
    wait_for(
        lambda: (
            not cluster.kubectl(
                "get", "pods", "-n", namespace, "-l", LABEL_JOB_NAME, "-o", "name"
            ).stdout.strip()
        ),
        timeout=300,
        what=f"the training pods in {namespace} to be deleted",
    )
    s3 = cluster.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="finetune-runs", Prefix=f"{namespace}/")
    try:
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket="finetune-runs", Delete={"Objects": keys, "Quiet": True})
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucket":  # no job of the test got that far
            raise
