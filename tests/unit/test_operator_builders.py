"""Desired children of a FineTuneJob (pure builders)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from finetune_operator import builders
from finetune_operator.api import FineTuneJob, SpecError
from finetune_operator.settings import Settings
from finetune_trainer import contract
from finetune_trainer.config import TrainerConfig
from tests.operator.factories import SETTINGS, UID, ftj, parsed


def _children(**kwargs: Any) -> dict[str, dict[str, Any]]:
    settings = kwargs.pop("settings", SETTINGS)
    return {child["kind"]: child for child in builders.build_children(parsed(**kwargs), settings)}


def _env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_children_in_creation_order_with_deterministic_names() -> None:
    children = builders.build_children(parsed(), SETTINGS)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("ConfigMap", "demo-config"),
        ("Service", "demo"),
        ("Job", "demo"),
    ]
    assert children == builders.build_children(parsed(), SETTINGS), "builders must be deterministic"


def test_network_policy_comes_before_the_job_when_enabled() -> None:
    children = builders.build_children(parsed(), NETWORK_SETTINGS)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    assert children[2]["metadata"]["name"] == "demo-trainers"


NETWORK_SETTINGS = Settings(
    trainer_image="trainer:test",
    runs_uri="s3://runs/",
    network_policy=True,
    operator_namespace="finetune-system",
    operator_pod_labels={
        "app.kubernetes.io/name": "finetune-operator",
        "app.kubernetes.io/component": "operator",
    },
    metrics_scraper={
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    },
)


def test_network_policy_admits_peers_operator_and_scraper_only() -> None:
    policy = builders.build_network_policy(parsed(resources={"nodes": 2}), NETWORK_SETTINGS)
    trainers = {
        "matchLabels": {
            "app.kubernetes.io/managed-by": "finetune-operator",
            "finetune.dev/job-name": "demo",
            "app.kubernetes.io/component": "trainer",
        }
    }
    assert policy["spec"] == {
        "podSelector": trainers,
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": trainers}]},  # every port: rendezvous and gloo/NCCL pick ports
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "finetune-system"}
                        },
                        "podSelector": {"matchLabels": dict(NETWORK_SETTINGS.operator_pod_labels)},
                    }
                ],
                "ports": [{"port": 9090, "protocol": "TCP"}],
            },
            {
                "from": [dict(NETWORK_SETTINGS.metrics_scraper or {})],
                "ports": [{"port": 9090, "protocol": "TCP"}],
            },
        ],
    }


def test_network_policy_without_a_scraper_admits_no_scraper() -> None:
    settings = Settings(runs_uri="s3://runs/", network_policy=True, operator_namespace="ops")
    ingress = builders.build_network_policy(parsed(), settings)["spec"]["ingress"]
    assert len(ingress) == 2


def test_pod_volumes_read_only_root_with_writable_cache_and_tmp() -> None:
    pod = _children()["Job"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/etc/finetune": "config", "/var/cache/finetune": "cache", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert "shm" not in volumes, "one process needs no shared memory"
    env = _env(_children()["Job"])
    assert (env["HOME"], env["TMPDIR"], env["XDG_CACHE_HOME"]) == ("/tmp", "/tmp", "/var/cache/finetune/xdg")


@pytest.mark.parametrize(
    ("resources", "shm"),
    [
        pytest.param({"processesPerNode": 2}, True, id="two-processes"),
        pytest.param({"nodes": 2}, False, id="two-pods-one-process-each"),
        pytest.param({"gpus": 4, "processesPerNode": 4}, True, id="four-gpus"),
    ],
)
def test_dev_shm_is_memory_backed_for_several_processes(resources: dict[str, Any], shm: bool) -> None:
    job = _children(resources=resources, hyperparameters={"batchSize": 8})["Job"]
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert ("shm" in volumes) is shm
    if shm:
        assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        assert mounts["shm"] == "/dev/shm"


def test_shm_size_user_and_collective_timeout_are_settings() -> None:
    settings = Settings.from_env(
        {
            "FINETUNE_RUNS_URI": "s3://r/",
            "FINETUNE_SHM_SIZE": "8Gi",
            "FINETUNE_RUN_AS_USER": "20000",
            "FINETUNE_RUN_AS_GROUP": "20001",
            "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS": "120",
        }
    )
    job = _children(settings=settings, resources={"processesPerNode": 2})["Job"]
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]["sizeLimit"] == "8Gi"
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (20000, 20001)
    assert _env(job)[contract.ENV_COLLECTIVE_TIMEOUT] == "120"
    assert _env(_children()["Job"])[contract.ENV_COLLECTIVE_TIMEOUT] == "600", "default: 10 minutes"


@pytest.mark.parametrize(
    ("overrides", "cache"),
    [
        # 70M parameters x (12 + 24) bytes + 2 GiB for data = 4.52 GB → 5Gi
        pytest.param({}, "5Gi", id="pythia-70m-full"),
        # LoRA keeps no full checkpoints: 1.4B x 12 bytes + 2 GiB = 18.8 GB → 18Gi
        pytest.param({"model": {"name": "pythia-1.4b"}, "lora": {"rank": 8}}, "18Gi", id="pythia-1.4b-lora"),
        # 1.4B x 36 + 2 GiB = 52.5 GB → 49Gi
        pytest.param({"model": {"name": "pythia-1.4b"}}, "49Gi", id="pythia-1.4b-full"),
        # a baseline adds its download and converted copy: + 6.9B x 8
        pytest.param(
            {"model": {"name": "pythia-1.4b"}, "evaluation": {"baselines": [{"name": "pythia-6.9b"}]}},
            "101Gi",
            id="with-a-baseline",
        ),
        pytest.param({"model": {"uri": "s3://models/mine/"}}, "22Gi", id="uri-model-unknown-size"),
        pytest.param({"resources": {"ephemeralStorage": "300Gi"}}, "300Gi", id="spec-override"),
    ],
)
def test_cache_size_limit_and_ephemeral_storage_follow_the_model(
    overrides: dict[str, Any], cache: str
) -> None:
    job = _children(**overrides)["Job"]
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["emptyDir"] == {"sizeLimit": cache}
    resources = pod["containers"][0]["resources"]
    # the cache, /tmp (2Gi) and the container's logs (1Gi): request = limit
    expected = f"{int(cache[:-2]) + 3}Gi"
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == expected


def test_multi_node_job_is_one_attempt_of_a_gang() -> None:
    """Several pods: the first pod failure or disruption fails the Job (the operator restarts
    all pods); exit 3 still fails the FineTuneJob at once."""
    job = _children(resources={"nodes": 2}, runPolicy={"backoffLimit": 3})["Job"]
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "0"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "Count"]
    assert rules[0]["onExitCodes"]["values"] == [contract.EXIT_INVALID_INPUT]
    # a disrupted pod counts (fails the attempt: all pods restart)
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    restarted = builders.build_job(parsed(resources={"nodes": 2}, status={"restarts": 2}), SETTINGS)
    assert restarted["metadata"]["labels"]["finetune.dev/attempt"] == "2"


def test_single_pod_job_keeps_the_job_controllers_retries() -> None:
    job = _children(runPolicy={"backoffLimit": 3})["Job"]
    assert job["spec"]["backoffLimit"] == 3
    assert "finetune.dev/attempt" not in job["metadata"]["labels"]


def test_children_are_owned_and_labelled() -> None:
    for child in builders.build_children(parsed(), SETTINGS):
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "demo",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["finetune.dev/job-name"] == "demo"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"


def test_config_map_round_trips_through_the_trainer_contract() -> None:
    config_map = _children(lora={"rank": 4})["ConfigMap"]
    config = TrainerConfig.from_yaml(config_map["data"]["config.yaml"])
    assert config.model.name == "pythia-70m"
    assert config.hyperparameters.max_steps == 100
    assert config.lora is not None and config.lora.rank == 4
    assert config.run.uri == f"s3://runs/team-a/demo/{UID}/"
    assert (config.run.namespace, config.run.job_name) == ("team-a", "demo")


def test_evaluate_mode_is_rendered_for_the_trainer() -> None:
    config_map = _children(
        mode="Evaluate", hyperparameters=None, dataset={"eval": ["s3://data/reuters/eval.jsonl"]}
    )["ConfigMap"]
    config = TrainerConfig.from_yaml(config_map["data"]["config.yaml"])
    assert config.mode == "Evaluate"
    assert (config.dataset.train, config.dataset.eval) == (None, ["s3://data/reuters/eval.jsonl"])
    assert config.run.uri == f"s3://runs/team-a/demo/{UID}/", "an evaluation has its own run folder"


@pytest.mark.parametrize(
    ("overrides", "settings", "expected"),
    [
        pytest.param({}, SETTINGS, f"s3://runs/team-a/demo/{UID}/", id="operator-default"),
        pytest.param(
            {"storage": {"runsUri": "s3://mine/x/"}},
            SETTINGS,
            f"s3://mine/x/team-a/demo/{UID}/",
            id="spec-runs-uri",
        ),
        pytest.param(
            {"checkpoints": {"outputUri": "file:///tmp/run/"}},
            SETTINGS,
            "file:///tmp/run/",
            id="output-uri-wins",
        ),
    ],
)
def test_run_folder(overrides: dict[str, Any], settings: Settings, expected: str) -> None:
    assert builders.run_uri(parsed(**overrides), settings) == expected


def test_a_recreated_job_gets_a_run_folder_of_its_own() -> None:
    """Same namespace and name, another object (uid): another folder, so a re-created
    FineTuneJob never resumes the checkpoints of the one deleted before it."""
    first = FineTuneJob.from_object(ftj())
    again = ftj()
    again["metadata"]["uid"] = "9d2f6a0e-1111-4c3b-8e8e-000000000002"
    second = FineTuneJob.from_object(again)
    assert builders.run_uri(first, SETTINGS) != builders.run_uri(second, SETTINGS)
    assert builders.run_uri(second, SETTINGS) == "s3://runs/team-a/demo/9d2f6a0e-1111-4c3b-8e8e-000000000002/"


def test_a_started_job_keeps_the_run_folder_in_its_status() -> None:
    """A job started by an earlier operator (folder without the uid) keeps its folder."""
    job = FineTuneJob.from_object(
        ftj(status={"startTime": "2026-11-29T06:00:00Z", "runUri": "s3://runs/team-a/demo/"})
    )
    assert builders.run_uri(job, SETTINGS) == "s3://runs/team-a/demo/"
    not_started = FineTuneJob.from_object(ftj(status={"runUri": "s3://runs/team-a/demo/"}))
    assert builders.run_uri(not_started, SETTINGS) == f"s3://runs/team-a/demo/{UID}/"


def test_headless_service_for_rendezvous() -> None:
    service = _children()["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"finetune.dev/job-name": "demo"}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"rendezvous": 29500, "progress": 9090}


def test_indexed_job_with_torchrun_environment() -> None:
    job = _children(resources={"nodes": 2, "processesPerNode": 4})["Job"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "demo" and pod["restartPolicy"] == "Never"
    env = _env(job)
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["PET_MASTER_ADDR"] == "demo-0.demo"
    assert env["PET_MASTER_PORT"] == "29500"
    assert env[contract.ENV_POD_IP] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env[contract.ENV_CONFIG] == "/etc/finetune/config.yaml"
    assert env[contract.ENV_PROGRESS_PORT] == "9090"
    container = pod["containers"][0]
    # 8 processes: the trainer starts torchrun itself from the PET_* variables (keeps exit codes)
    assert container["command"] == ["python", "-m", "finetune_trainer"]
    assert container["image"] == "trainer:test"
    assert {"name": "config", "mountPath": "/etc/finetune", "readOnly": True} in container["volumeMounts"]


def test_single_process_runs_the_trainer_directly() -> None:
    """So exit code 3 reaches the podFailurePolicy."""
    container = _children()["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer"]


def test_pod_failure_policy_and_run_policy() -> None:
    job = _children(
        runPolicy={"backoffLimit": 2, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600}
    )["Job"]
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 3600)
    assert "ttlSecondsAfterFinished" not in spec, "set by reconcile once the result is recorded"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": "trainer",
            "operator": "In",
            "values": [contract.EXIT_INVALID_INPUT],
        },
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert len(rules) == 2, (
        "no rule on exit code 137: a lost container (ContainerStatusUnknown) exits 137 too; "
        "OOMKilled is the operator's to read"
    )
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 300


def test_optional_run_policy_fields_left_out() -> None:
    spec = _children()["Job"]["spec"]
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec


def test_pod_security_restricted() -> None:
    pod = _children()["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]["securityContext"]
    assert container == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The trainer image's user (Dockerfile: finetune, 10001), not a uid a host user may have.
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not any("hostPath" in v for v in pod["volumes"])


def test_credentials_only_through_secret_refs() -> None:
    job = _children(storage={"credentialsSecret": {"name": "s3", "accessKeyIdKey": "id"}})["Job"]
    env = _env(job)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    settings = Settings(runs_uri="s3://runs/", credentials_secret="cluster-s3")
    env = _env(_children(settings=settings)["Job"])
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "cluster-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert "AWS_ACCESS_KEY_ID" not in _env(_children()["Job"])


def test_hub_token_only_through_a_secret_ref_and_the_mirror_as_hf_endpoint() -> None:
    hub = {"endpoint": "http://hub-mirror.internal:8080", "tokenSecret": {"name": "hf"}}
    children = _children(model={"uri": "hf://meta-llama/Llama-3.2-1B", "revision": "main"}, hub=hub)
    env = _env(children["Job"])
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert env["HF_ENDPOINT"] == "http://hub-mirror.internal:8080"
    assert "tokenSecret" not in children["ConfigMap"]["data"][builders.CONFIG_KEY]
    env = _env(_children(hub={"tokenSecret": {"name": "hf", "key": "token"}})["Job"])
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_TOKEN" not in _env(_children()["Job"]) and "HF_ENDPOINT" not in _env(_children()["Job"])


def test_a_jobs_hub_endpoint_wins_over_the_operators_extra_env() -> None:
    settings = Settings(
        runs_uri="s3://runs/", extra_env={"HF_ENDPOINT": "http://cluster-mirror:1", "HF_HUB_OFFLINE": "0"}
    )
    container = _children(settings=settings, hub={"endpoint": "http://job-mirror:2"})["Job"]["spec"][
        "template"
    ]
    names = [e["name"] for e in container["spec"]["containers"][0]["env"]]
    assert names.count("HF_ENDPOINT") == 1 and "HF_HUB_OFFLINE" in names
    assert _env(_children(settings=settings, hub={"endpoint": "http://job-mirror:2"})["Job"])[
        "HF_ENDPOINT"
    ] == ("http://job-mirror:2")
    assert _env(_children(settings=settings)["Job"])["HF_ENDPOINT"] == "http://cluster-mirror:1"


@pytest.mark.parametrize(
    "hub",
    [
        pytest.param({"token": "hf_abc"}, id="inline-token"),
        pytest.param({"tokenSecret": {"name": "Not_A_Name"}}, id="bad-secret-name"),
        pytest.param({"endpoint": "hub.example"}, id="endpoint-without-scheme"),
    ],
)
def test_invalid_hub_settings_are_rejected_naming_the_field(hub: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match=r"spec\.hub\."):
        parsed(hub=hub)


@pytest.mark.parametrize(
    ("overrides", "suspend"),
    [
        pytest.param({}, False, id="running"),
        pytest.param({"suspend": True}, True, id="suspended"),
        pytest.param({"cancel": True}, True, id="cancelled"),
    ],
)
def test_suspend_and_cancel_suspend_the_job(overrides: dict[str, Any], suspend: bool) -> None:
    assert _children(**overrides)["Job"]["spec"]["suspend"] is suspend


def test_resources_and_scheduling() -> None:
    resources = {
        "cpu": "4",
        "memory": "16Gi",
        "gpus": 2,
        "processesPerNode": 2,
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
        "image": "custom:1",
        "serviceAccountName": "trainer",
        "queueName": "team-a",
    }
    job = _children(resources=resources, hyperparameters={"batchSize": 8})["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    disk = container["resources"]["requests"]["ephemeral-storage"]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2", "ephemeral-storage": disk},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "2", "ephemeral-storage": disk},
    }
    assert container["image"] == "custom:1"
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (pod["priorityClassName"], pod["serviceAccountName"]) == ("training", "trainer")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


@pytest.mark.parametrize(
    ("overrides", "settings", "fragment"),
    [
        pytest.param(
            {"model": {"name": "gpt-17"}},
            SETTINGS,
            "spec.model.name: unknown catalog model 'gpt-17'",
            id="unknown-model",
        ),
        pytest.param(
            {"evaluation": {"baselines": [{"name": "pythia-160m"}, {"name": "nope"}]}},
            SETTINGS,
            "spec.evaluation.baselines[1].name: unknown catalog model 'nope'",
            id="unknown-baseline",
        ),
        pytest.param({}, Settings(), "spec.checkpoints.outputUri: no run folder", id="no-run-folder"),
        pytest.param(
            {"dataset": {"name": "reuters"}},
            SETTINGS,
            "spec.dataset.name: registered datasets need storage.datasetsUri",
            id="no-datasets-uri",
        ),
    ],
)
def test_operator_side_checks(overrides: dict[str, Any], settings: Settings, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        builders.build_children(parsed(**overrides), settings)
    assert any(fragment in error for error in info.value.errors), info.value.errors


def test_command_override_for_local_stand_ins() -> None:
    settings = Settings.from_env(
        {"FINETUNE_TRAINER_COMMAND": '["python", "-m", "standin"]', "FINETUNE_RUNS_URI": "s3://r/"}
    )
    job = _children(settings=settings)["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "standin"]


def test_config_yaml_is_plain() -> None:
    data = yaml.safe_load(_children()["ConfigMap"]["data"]["config.yaml"])
    assert set(data) == {"mode", "model", "dataset", "hyperparameters", "evaluation", "checkpoints", "run"}
