"""The product images, built from the Dockerfile with buildah and run with podman (slow).

Part of `make test`: dev/setup.sh starts the build in the background (dev/images.sh; the
Debian tools when missing, the mmdebstrap base, both targets from the wheelhouse, layer caches
under ~/.cache/finetune-dev/images) and these tests wait for it to end; if it failed they fail
with its log's tail. By hand, as root:

    FINETUNE_TEST_PORT_BASE=18600 .venv/bin/python -m pytest tests/integration/test_images.py -q

(without a build from setup, the first test builds the images itself: a cache hit when built).
Then, on the host network, talking only to this session's loopback servers:

- the operator image, with a least-privilege kubeconfig, answers its health endpoint and
  reconciles a FineTuneJob into a batch Job that names the trainer image;
- the trainer image runs a tiny training as uid 10001 with a read-only root filesystem and all
  capabilities dropped, reading the model and data from the local S3 server and writing its
  checkpoints there.

Also checked in the built images: no kubectl plugin, no dev tooling, the OCI labels.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev import images
from tests.integration.operator_env import SERVICE_ACCOUNT, free_port, identity_kubeconfig
from tests.kube import ClusterHandle, wait_for
from tests.trainer.factories import make_model_dir, make_tokenizer, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.timeout(3600),  # the first test waits for the image build setup started
]


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    try:
        steps = images.wait_for_build()
    except images.ImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    return {step.what: step.image for step in steps}


def inspect(image: str) -> dict[str, Any]:
    result = images.podman("image", "inspect", image)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)[0])


@pytest.mark.parametrize("target", images.TARGETS)
def test_images_hold_the_product_only_with_labels(built: dict[str, str], target: str) -> None:
    config = inspect(built[target])
    labels = config["Config"]["Labels"] or config["Labels"]
    assert labels["org.opencontainers.image.version"] == images.version()
    assert labels["org.opencontainers.image.title"] == f"finetune-{target}"
    assert config["Config"]["User"] == "10001:10001"
    probe = (
        "import importlib.util as u, shutil;"
        "print([m for m in ('finetune_operator', 'finetune_trainer', 'finetune_cli', 'finetune_dev', 'torch')"
        " if u.find_spec(m)], shutil.which('kubectl-finetune'), shutil.which('finetune-dev'))"
    )
    result = images.podman_run(
        built[target], ["-c", probe], env={}, name=None, timeout=300, entrypoint="python3.11"
    )
    assert result.returncode == 0, result.stderr
    expected = ["finetune_operator", "finetune_trainer"] + (["torch"] if target == "trainer" else [])
    assert result.stdout.strip() == f"{expected} None None"


def container_kubeconfig(cluster: ClusterHandle, path: Path) -> Path:
    """The identity's kubeconfig with the CA inlined and readable by uid 10001."""
    config = yaml.safe_load(path.read_text())
    server = config["clusters"][0]["cluster"]
    if "certificate-authority" in server:
        server["certificate-authority-data"] = base64.b64encode(
            Path(server.pop("certificate-authority")).read_bytes()
        ).decode()
    out = path.with_name("container.kubeconfig")
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o644)
    return out


@pytest.fixture
def operator_container(
    built: dict[str, str], cluster: ClusterHandle, crd: None, namespace: str, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    from finetune_operator import rbac

    kubeconfig = container_kubeconfig(
        cluster, identity_kubeconfig(cluster, f"{SERVICE_ACCOUNT}-image", rbac.cluster_role(), tmp_path)
    )
    health_port = free_port()
    name = f"finetune-operator-{uuid.uuid4().hex[:8]}"
    started = images.podman_run(
        built["operator"],
        env={
            "KUBECONFIG": "/etc/finetune/kubeconfig",
            "FINETUNE_NAMESPACES": namespace,  # the only operator for this namespace
            "FINETUNE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health_port}/healthz",
            "FINETUNE_METRICS_PORT": str(free_port()),
            "FINETUNE_METRICS_ADDR": "127.0.0.1",
            "FINETUNE_RUNS_URI": "s3://finetune-image-test/runs/",
            "FINETUNE_STORAGE_ENDPOINT": cluster.s3_endpoint,
        },
        volumes=[f"{kubeconfig}:/etc/finetune/kubeconfig:ro"],
        name=name,
        detach=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield name, f"http://127.0.0.1:{health_port}/healthz"
    finally:
        logs = images.podman("logs", name).stdout
        images.podman("rm", "--force", "--time", "5", name)
        print(logs[-4000:])


def test_operator_image_answers_health_and_reconciles(
    operator_container: tuple[str, str], cluster: ClusterHandle, namespace: str
) -> None:
    name, health = operator_container

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            running = images.podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert running == "true", images.podman("logs", name).stdout[-3000:]
            return False

    wait_for(healthy, timeout=120, what="the operator container's /healthz")
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "image-test", "namespace": namespace},
        "spec": {
            "model": {"name": "pythia-70m"},
            "dataset": {"train": ["s3://finetune-image-test/data/train.jsonl"]},
            "suspend": True,
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job))

    def batch_job() -> dict[str, Any] | None:
        out = cluster.kubectl("get", "job", "image-test", "-n", namespace, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    created = wait_for(batch_job, timeout=120, what="the batch Job the operator image creates")
    container = created["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == images.image_name("trainer")
    assert created["spec"]["suspend"] is True


@pytest.fixture
def s3_prefix(cluster: ClusterHandle) -> Iterator[tuple[Any, str, str]]:
    client = cluster.s3_client()
    bucket = "finetune-image-test"
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
    prefix = f"trainer-{uuid.uuid4().hex[:8]}/"
    yield client, bucket, prefix
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    for obj in listed:
        client.delete_object(Bucket=bucket, Key=obj["Key"])


def upload_folder(client: Any, bucket: str, key: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, key + path.relative_to(folder).as_posix())


def test_trainer_image_trains_as_non_root_on_a_read_only_root_and_checkpoints_to_s3(
    built: dict[str, str],
    cluster: ClusterHandle,
    s3_prefix: tuple[Any, str, str],
    tmp_path: Path,
) -> None:
    client, bucket, prefix = s3_prefix
    tokenizer = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer)
    upload_folder(client, bucket, prefix + "model/", make_model_dir("llama", tmp_path / "model", tokenizer))
    words = ["the", "market", "rose", "and", "shares", "fell", "while", "the", "bank", "said", "profit"]
    records = [{"text": " ".join(words[(i + j) % len(words)] for j in range(14))} for i in range(32)]
    for split, rows in (("train", records), ("eval", records[:8])):
        local = write_jsonl(tmp_path / f"{split}.jsonl", rows)
        client.upload_file(local[len("file://") :], bucket, f"{prefix}data/{split}.jsonl")
    root = f"s3://{bucket}/{prefix}"
    config = {
        "model": {"uri": root + "model/"},
        "dataset": {"train": [root + "data/train.jsonl"], "eval": [root + "data/eval.jsonl"], "format": "text"},
        "hyperparameters": {"maxSteps": 2, "learningRate": 1e-3, "batchSize": 4, "microBatchSize": 4,
                            "sequenceLength": 16, "lrScheduler": "constant"},
        "evaluation": {"everySteps": 2, "logEverySteps": 1},
        "checkpoints": {"everySteps": 2, "keepLast": 1, "outputUri": root + "run/"},
        "run": {"storageEndpoint": cluster.s3_endpoint},
    }  # fmt: skip
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)
    credentials = {k: v for k, v in cluster.env.items() if k.startswith("AWS_")}
    start = time.monotonic()
    result = images.podman_run(
        built["trainer"],
        env={
            **credentials,
            "POD_IP": "127.0.0.1",
            "FINETUNE_PROGRESS_PORT": str(free_port()),
            "FINETUNE_CACHE_DIR": "/tmp/cache",
            "FINETUNE_TERMINATION_LOG": "/tmp/termination-log",
            "OMP_NUM_THREADS": "1",
        },
        volumes=[f"{config_file}:/etc/finetune/config.yaml:ro"],
        timeout=900,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    keys = {o["Key"][len(prefix) :] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert "run/checkpoints/step-000002/manifest.json" in keys, sorted(keys)
    assert "run/final/model.safetensors" in keys and "run/run.json" in keys
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"{prefix}run/final/manifest.json")["Body"].read()
    )
    assert manifest["step"] == 2
    print(f"trainer container run: {time.monotonic() - start:.0f} s")


@pytest.mark.parametrize("check", ["uid", "read-only-root"])
def test_trainer_image_runs_unprivileged(built: dict[str, str], check: str) -> None:
    probe = {
        "uid": "import os; print(os.getuid(), os.getgid())",
        "read-only-root": "import os\ntry:\n open('/opt/venv/x', 'w')\nexcept OSError as e:\n print(e.errno)",
    }[check]
    result = images.podman_run(built["trainer"], ["-c", probe], env={}, timeout=120, entrypoint="python3.11")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == {"uid": "10001 10001", "read-only-root": "30"}[check]  # 30: EROFS
