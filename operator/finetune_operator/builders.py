"""Desired children of a FineTuneJob (pure): spec + settings → Kubernetes objects as dicts.

`build_children(job, settings)` returns, in creation order, the ConfigMap with the rendered
`TrainerConfig`, the headless Service giving pods stable DNS names, and the batch/v1 Indexed Job
(one pod per node, torchrun wired through PET_* variables). Same input, same output: names are
deterministic and nothing depends on time or the cluster, so `reconcile` can create them again
after any crash and treat AlreadyExists as success.

Operator-side checks that the API server cannot do (an unknown catalog model, no run folder)
raise `SpecError` from `render_config`. Called by `reconcile` and the unit tests; must not
import kopf or the Kubernetes client.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune_operator import gang
from finetune_operator.api import (
    API_VERSION,
    KIND,
    LABEL_COMPONENT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    FineTuneJob,
    SpecError,
)
from finetune_operator.settings import Settings
from finetune_trainer import contract
from finetune_trainer.catalog import CATALOG
from finetune_trainer.config import TRAIN, ModelSpec, RunSpec, TrainerConfig

CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/finetune"
CONFIG_KEY = "config.yaml"
CACHE_DIR = "/var/cache/finetune"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def service_name(job_name: str) -> str:
    return job_name


def batch_job_name(job_name: str) -> str:
    return job_name


def master_address(job_name: str) -> str:
    """Rank 0's stable name: `<job>-0.<service>` (Indexed Job hostname + subdomain)."""
    return f"{batch_job_name(job_name)}-0.{service_name(job_name)}"


def labels(job_name: str, component: str | None = None) -> dict[str, str]:
    out = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: job_name}
    if component:
        out[LABEL_COMPONENT] = component
    return out


def run_uri(job: FineTuneJob, settings: Settings) -> str | None:
    """The run folder: checkpoints.outputUri, else <runsUri><namespace>/<name>/<uid>/.

    The default folder belongs to this object (its uid): a FineTuneJob deleted and created again
    under the same name starts in a new folder instead of resuming the old object's checkpoints.
    Once the job has started, the folder recorded in status.runUri is kept (a job started by an
    older operator keeps its folder). With checkpoints.outputUri the spec names the folder, and a
    new object resumes what is there: that is how a run continues under a new FineTuneJob."""
    output: str | None = job.spec.checkpoints.output_uri
    if output:
        return output
    recorded = job.status.get("runUri")
    if job.status.get("startTime") and isinstance(recorded, str) and recorded:
        return recorded
    base = job.spec.storage.runs_uri or settings.runs_uri
    if base is None:
        return None
    return f"{base.rstrip('/')}/{job.namespace}/{job.name}/{job.ref.uid}/"


# Disk a job's cache volume needs, per model parameter (fp32 = 4 bytes): the download (4, the
# widest format a hub ships), a converted copy (4: a GGUF import or a merged LoRA adapter), the
# final export (4) and, when every weight is trained, two local checkpoints in flight (2 x 12:
# weights and AdamW's two moments) — a LoRA checkpoint is a few MB. Each baseline adds its
# download and a converted copy. Plus DATA_ALLOWANCE for the dataset and its token cache.
BYTES_PER_PARAMETER_MODEL = 4 + 4 + 4
BYTES_PER_PARAMETER_CHECKPOINTS = 2 * 12
BYTES_PER_PARAMETER_BASELINE = 4 + 4
DATA_ALLOWANCE = 2 * 2**30
# A model given by URI has no known size: its cache gets this much unless
# spec.resources.ephemeralStorage says otherwise.
UNKNOWN_MODEL_CACHE = 20 * 2**30
# The container's own writes beside the volumes: its logs and the termination message.
CONTAINER_LOGS = 2**30
_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_BINARY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "m": 10**-3,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}  # fmt: skip


def parameter_count(model: ModelSpec) -> int | None:
    """The catalog's parameter count of a catalog model ('1.4B' → 1_400_000_000), else None."""
    entry = CATALOG.get(model.name) if model.name else None
    if entry is None or entry.parameters[-1:] not in _SUFFIXES:
        return None
    return int(float(entry.parameters[:-1]) * _SUFFIXES[entry.parameters[-1]])


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (as `api.QUANTITY_PATTERN` admits) in bytes."""
    number = quantity.rstrip("kKMGTPim")
    return int(float(number) * _BINARY[quantity[len(number) :]])


def gibibytes(size: int) -> str:
    """`size` bytes rounded up to whole Gi (a quantity)."""
    return f"{-(-size // 2**30)}Gi"


def cache_size(job: FineTuneJob) -> str:
    """The cache volume's sizeLimit: spec.resources.ephemeralStorage, else derived from the
    model's and the baselines' parameter counts (see BYTES_PER_PARAMETER_*) plus the data
    allowance, else UNKNOWN_MODEL_CACHE for a model given by URI. docs/operator.md explains it."""
    spec = job.spec
    if spec.resources.ephemeral_storage:
        return spec.resources.ephemeral_storage
    size = DATA_ALLOWANCE
    params = parameter_count(spec.model)
    if params is None:
        size += UNKNOWN_MODEL_CACHE
    else:
        per_parameter = BYTES_PER_PARAMETER_MODEL
        if spec.mode == TRAIN and spec.lora is None:
            per_parameter += BYTES_PER_PARAMETER_CHECKPOINTS
        size += params * per_parameter
    for baseline in spec.evaluation.baselines:
        baseline_params = parameter_count(baseline)
        size += (
            UNKNOWN_MODEL_CACHE if baseline_params is None else baseline_params * BYTES_PER_PARAMETER_BASELINE
        )
    return gibibytes(size)


def credentials_secret(job: FineTuneJob, settings: Settings) -> str | None:
    secret = job.spec.storage.credentials_secret
    return secret.name if secret is not None else settings.credentials_secret


def render_config(job: FineTuneJob, settings: Settings) -> TrainerConfig:
    """The trainer's configuration for this job; `SpecError` lists every operator-side problem."""
    spec = job.spec
    errors = []
    models = [("spec.model.name", spec.model)] + [
        (f"spec.evaluation.baselines[{i}].name", model) for i, model in enumerate(spec.evaluation.baselines)
    ]
    for path, model in models:
        if model.name is not None and model.name not in CATALOG:
            errors.append(
                f"{path}: unknown catalog model {model.name!r} (see `kubectl finetune list models`, "
                "or give a uri)"
            )
    uri = run_uri(job, settings)
    if uri is None:
        errors.append(
            "spec.checkpoints.outputUri: no run folder: set checkpoints.outputUri or storage.runsUri "
            "(the operator has no default runs URI)"
        )
    datasets_uri = spec.storage.datasets_uri or settings.datasets_uri
    if spec.dataset.name is not None and datasets_uri is None:
        errors.append(
            "spec.dataset.name: registered datasets need storage.datasetsUri (the operator has no default)"
        )
    if errors:
        raise SpecError(errors)
    run = RunSpec(
        uri=uri,
        storage_endpoint=spec.storage.endpoint or settings.storage_endpoint,
        storage_region=spec.storage.region,
        datasets_uri=datasets_uri,
        namespace=job.namespace,
        job_name=job.name,
    )
    return TrainerConfig(
        mode=spec.mode,
        model=spec.model,
        dataset=spec.dataset,
        hyperparameters=spec.hyperparameters,
        lora=spec.lora,
        evaluation=spec.evaluation,
        checkpoints=spec.checkpoints,
        run=run,
    )


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job.name, component),
        "ownerReferences": [owner_reference(job)],
    }


# libyaml's emitter when the wheel has it: 4x faster than the pure-Python one, same document.
_YAML_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_yaml(config: TrainerConfig) -> str:
    """The ConfigMap's config.yaml: `config.to_dict()` as YAML (what `TrainerConfig.from_yaml` reads)."""
    return str(yaml.dump(config.to_dict(), Dumper=_YAML_DUMPER, sort_keys=False))


def build_config_map(job: FineTuneJob, config: TrainerConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), "config"),
        "data": {CONFIG_KEY: render_yaml(config)},
    }


def build_service(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """Headless: gives each pod `<hostname>.<service>` DNS, also before it is ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB_NAME: job.name},
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": settings.master_port, "protocol": "TCP"},
                {"name": "progress", "port": settings.progress_port, "protocol": "TCP"},
            ],
        },
    }


def network_policy_name(job_name: str) -> str:
    return f"{job_name}-trainers"


def build_network_policy(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """Ingress to this job's trainer pods: from each other on every port (rendezvous and the
    collective backend pick ports at run time), from the operator's pods to the progress port,
    from the chosen scraper (if any) to the metrics port (the same port); nothing else. Egress
    is left open (object storage, a model hub). docs/operator.md has the table."""
    pods = {"matchLabels": labels(job.name, "trainer")}
    port = [{"port": settings.progress_port, "protocol": "TCP"}]
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": pods}]}]
    if settings.operator_namespace:
        operator_peer: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.operator_namespace}},
            "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
        }
        ingress.append({"from": [operator_peer], "ports": port})
    if settings.metrics_scraper is not None:
        ingress.append({"from": [dict(settings.metrics_scraper)], "ports": port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, network_policy_name(job.name), "network-policy"),
        "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def _env(job: FineTuneJob, settings: Settings) -> list[dict[str, Any]]:
    resources = job.spec.resources
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": contract.ENV_CONFIG, "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": contract.ENV_PROGRESS_PORT, "value": str(settings.progress_port)},
        {"name": contract.ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": contract.ENV_COLLECTIVE_TIMEOUT, "value": str(settings.collective_timeout_seconds)},
        # The root filesystem is read-only: libraries that write to $HOME or ~/.cache (Hugging
        # Face, torch, matplotlib) write to the tmp and cache volumes instead.
        {"name": "HOME", "value": TMP_DIR},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg"},
        {"name": "PET_NNODES", "value": str(resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(resources.processes_per_node)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "PET_MASTER_ADDR", "value": master_address(job.name)},
        {"name": "PET_MASTER_PORT", "value": str(settings.master_port)},
    ]
    secret = credentials_secret(job, settings)
    if secret is not None:
        ref = job.spec.storage.credentials_secret
        keys = (
            (
                contract.ENV_AWS_ACCESS_KEY_ID,
                ref.access_key_id_key if ref else contract.ENV_AWS_ACCESS_KEY_ID,
            ),
            (
                contract.ENV_AWS_SECRET_ACCESS_KEY,
                ref.secret_access_key_key if ref else contract.ENV_AWS_SECRET_ACCESS_KEY,
            ),
        )
        for env_name, key in keys:
            env.append({"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    hub_env = _hub_env(job)
    # A job's own Hub settings win over the operator's extra env of the same name.
    env.extend(
        {"name": name, "value": value}
        for name, value in sorted(settings.extra_env.items())
        if name not in {e["name"] for e in hub_env}
    )
    env.extend(hub_env)
    return env


def _hub_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """HF_ENDPOINT (a mirror) and HF_TOKEN (from the job's Secret, by reference only)."""
    hub = job.spec.hub
    env: list[dict[str, Any]] = []
    if hub.endpoint is not None:
        env.append({"name": contract.ENV_HF_ENDPOINT, "value": hub.endpoint})
    if hub.token_secret is not None:
        ref = {"name": hub.token_secret.name, "key": hub.token_secret.key}
        env.append({"name": contract.ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": ref}})
    return env


def _container_resources(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """cpu and memory as the spec says (no CPU limit: it would throttle training), GPUs, and
    ephemeral storage for the cache and tmp volumes plus the container's logs (request = limit:
    the kubelet evicts a pod over its limit rather than letting it fill the node's disk)."""
    res = job.spec.resources
    disk = gibibytes(quantity_bytes(cache_size(job)) + quantity_bytes(settings.tmp_size) + CONTAINER_LOGS)
    requests: dict[str, str] = {"ephemeral-storage": disk}
    limits: dict[str, str] = {"ephemeral-storage": disk}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _volumes(job: FineTuneJob, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts): the config, the cache (sizeLimit from `cache_size`), /tmp, and
    for pods of several processes a memory-backed /dev/shm (a container runtime's default is 64
    MiB, too small for NCCL and DataLoader workers)."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(job.name)}},
        {"name": "cache", "emptyDir": {"sizeLimit": cache_size(job)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    if job.spec.resources.processes_per_node > 1:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}})
        mounts.append({"name": "shm", "mountPath": SHM_DIR})
    return volumes, mounts


def build_pod_spec(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    res = job.spec.resources
    volumes, mounts = _volumes(job, settings)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": res.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command),
        "env": _env(job, settings),
        "ports": [
            {"name": "rendezvous", "containerPort": settings.master_port, "protocol": "TCP"},
            {"name": "progress", "containerPort": settings.progress_port, "protocol": "TCP"},
        ],
        "resources": _container_resources(job, settings),
        "volumeMounts": mounts,
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Pod Security "restricted".
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,  # writes go to the cache and tmp volumes
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (podFailurePolicy needs Never)
        "subdomain": service_name(job.name),
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "automountServiceAccountToken": False,  # training pods get no Kubernetes API rights
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.service_account_name:
        pod["serviceAccountName"] = res.service_account_name
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return pod


def build_job(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Indexed Job: one pod per node; index = torchrun node rank.

    A single pod retries through the Job (backoffLimit; a disrupted pod is replaced without
    counting). Several pods are one gang (see `gang`): the Job is one attempt, failing at the
    first pod failure or disruption, and the operator restarts all pods together."""
    policy = job.spec.run_policy
    nodes = job.spec.resources.nodes
    metadata = _metadata(job, batch_job_name(job.name), "trainer")
    if job.spec.resources.queue_name:
        metadata["labels"][QUEUE_NAME_LABEL] = job.spec.resources.queue_name
    invalid_input: dict[str, Any] = {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": CONTAINER_NAME,
            "operator": "In",
            "values": [contract.EXIT_INVALID_INPUT],
        },
    }
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    # No rule on exit code 137: it is SIGKILL, which the OOM killer sends, but so do a kill after
    # the grace period and a kubelet that lost the container (ContainerStatusUnknown, after a
    # node restart). Only the container's terminated reason tells OOMKilled apart, which a
    # podFailurePolicy cannot match; the operator reads it and stops the Job (status, reconcile).
    if gang.is_gang(job):
        metadata["labels"][gang.ATTEMPT_LABEL] = str(gang.restarts_so_far(job))
        backoff_limit = 0
        # A disrupted pod (evicted, preempted) fails the attempt too: the operator restarts all.
        rules: list[dict[str, Any]] = [invalid_input, {"action": "Count", "onPodConditions": disrupted}]
    else:
        backoff_limit = policy.backoff_limit
        rules = [invalid_input, {"action": "Ignore", "onPodConditions": disrupted}]
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": backoff_limit,
        # Queued with Kueue: created suspended, Kueue unsuspends it on admission (docs/kueue.md).
        "suspend": job.spec.suspend or job.spec.cancel or bool(job.spec.resources.queue_name),
        "podFailurePolicy": {"rules": rules},
        "template": {
            "metadata": {
                "labels": labels(job.name, "trainer"),
                "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER_NAME},
            },
            "spec": build_pod_spec(job, settings),
        },
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    # runPolicy.ttlSecondsAfterFinished is not set here: reconcile sets it on the finished Job
    # once the result is in the FineTuneJob's status (`reconcile._ttl_patch`), so the Job and its
    # pods' termination messages never vanish before the operator has read them.
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def build_children(job: FineTuneJob, settings: Settings) -> list[dict[str, Any]]:
    """ConfigMap, Service, NetworkPolicy (with `settings.network_policy`), Job — in creation
    order: the Job's pods mount the ConfigMap and are never up before their NetworkPolicy."""
    config = render_config(job, settings)
    children = [build_config_map(job, config), build_service(job, settings)]
    if settings.network_policy:
        children.append(build_network_policy(job, settings))
    return [*children, build_job(job, settings)]
