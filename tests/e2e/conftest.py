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
from tests.kube import ClusterHandle


@pytest.fixture(autouse=True)
def _demo_run_folders_removed(cluster: ClusterHandle) -> Iterator[None]:
    """Each test's run folders in the demo namespace are deleted when it ends: a SmolLM2 run
    folder (checkpoints with the optimizer state, the export) is several GB, and the tier's
    jobs would otherwise pile them up on the S3 server's disk for the rest of the session."""
    yield
    s3 = cluster.s3_client()
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket="finetune-runs", Prefix=f"{demo.DEMO_NAMESPACE}/"
    )
    try:
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket="finetune-runs", Delete={"Objects": keys, "Quiet": True})
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucket":  # no job of the test got that far
            raise
