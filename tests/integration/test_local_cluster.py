"""The local cluster behaves like a real one where our product depends on it.

Jobs run on the process node with ConfigMap volumes and Secret env; exit codes, termination
messages and podFailurePolicy reach the Job controller; deletion delivers SIGTERM; the garbage
collector cascades; Indexed Job pods reach each other by hostname.subdomain; RBAC is enforced;
S3 stores and returns large multipart objects byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.kube import (
    ClusterHandle,
    apply,
    get,
    job_manifest,
    job_pods,
    python_container,
    wait_for,
    wait_job_finished,
)

pytestmark = pytest.mark.cluster


def test_job_reads_configmap_volume_and_secret_env(cluster: ClusterHandle, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"greeting": "hello from a ConfigMap"},
        },
    )
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cr3t-value"},
        },
    )
    script = textwrap.dedent(
        """
        import os, pathlib
        greeting = pathlib.Path("/etc/demo/greeting").read_text()
        token = os.environ["API_TOKEN"]
        print("greeting:", greeting, flush=True)
        pathlib.Path("/dev/termination-log").write_text(f"{greeting}|{len(token)}|{os.environ['MY_POD']}")
        """
    )
    container = python_container(
        script,
        env=[
            {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        volumeMounts=[{"name": "settings", "mountPath": "/etc/demo", "readOnly": True}],
    )
    apply(
        cluster,
        namespace,
        job_manifest(
            "reader",
            [container],
            template_spec={"volumes": [{"name": "settings", "configMap": {"name": "settings"}}]},
        ),
    )

    condition = wait_job_finished(cluster, namespace, "reader")

    assert condition["type"] == "Complete"
    [pod] = job_pods(cluster, namespace, "reader")
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == f"hello from a ConfigMap|{len('s3cr3t-value')}|{pod['metadata']['name']}"
    logs = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
    assert "greeting: hello from a ConfigMap" in logs


def _failure_policy_job(name: str, exit_code: int, backoff_limit: int) -> dict[str, Any]:
    manifest = job_manifest(
        name,
        [python_container(f"import sys; print('exiting {exit_code}'); sys.exit({exit_code})")],
        backoffLimit=backoff_limit,
        podFailurePolicy={
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
    )
    return manifest


def test_pod_failure_policy_fails_job_at_once_on_exit_code_3(cluster: ClusterHandle, namespace: str) -> None:
    apply(cluster, namespace, _failure_policy_job("permanent", exit_code=3, backoff_limit=5))

    condition = wait_job_finished(cluster, namespace, "permanent")

    assert condition["type"] == "Failed"
    assert condition["reason"] == "PodFailurePolicy"
    pods = job_pods(cluster, namespace, "permanent")
    assert len(pods) == 1, "the permanent failure must not be retried"
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_retryable_exit_code_is_retried_up_to_backoff_limit(cluster: ClusterHandle, namespace: str) -> None:
    apply(cluster, namespace, _failure_policy_job("flaky", exit_code=1, backoff_limit=2))

    condition = wait_job_finished(cluster, namespace, "flaky", timeout=180)

    assert condition["type"] == "Failed"
    assert condition["reason"] == "BackoffLimitExceeded"
    pods = job_pods(cluster, namespace, "flaky")
    assert len(pods) == 3, "one first try plus backoffLimit=2 retries"
    assert {p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods} == {1}


def _pod_events(
    cluster: ClusterHandle, namespace: str, name: str, stop: threading.Event, seen: list[dict[str, Any]]
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    for event in watch.Watch().stream(
        core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}", timeout_seconds=90
    ):
        seen.append({"type": event["type"], "pod": event["raw_object"]})
        if event["type"] == "DELETED" or stop.is_set():
            return


def _run_pod(cluster: ClusterHandle, namespace: str, name: str, script: str, grace: int) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [python_container(script)],
        },
    }
    apply(cluster, namespace, pod)
    wait_for(
        lambda: "ready" in cluster.kubectl("logs", "-n", namespace, name, check=False).stdout,
        timeout=60,
        what=f"pod {name} to start and print 'ready'",
    )


def _final_container_state(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    """Delete the pod and return its container's last reported terminated state."""
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    watcher = threading.Thread(target=_pod_events, args=(cluster, namespace, name, stop, seen))
    watcher.start()
    cluster.kubectl("delete", "pod", "-n", namespace, name, "--wait=true", timeout=120)
    watcher.join(timeout=60)
    stop.set()
    states = [
        s["state"]["terminated"]
        for e in seen
        for s in (e["pod"].get("status") or {}).get("containerStatuses") or []
        if "terminated" in s.get("state", {})
    ]
    assert seen and seen[-1]["type"] == "DELETED", "the pod object must be removed after its process ended"
    assert states, "the node must report the container's terminated state before removing the pod"
    return states[-1]


def test_deleting_a_pod_sends_sigterm_the_process_can_handle(cluster: ClusterHandle, namespace: str) -> None:
    script = textwrap.dedent(
        """
        import pathlib, signal, sys, time
        def on_term(signum, frame):
            pathlib.Path("/dev/termination-log").write_text("checkpoint saved after SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    _run_pod(cluster, namespace, "graceful", script, grace=30)
    pod_dirs = cluster.cluster.pods_dir
    assert list(pod_dirs.glob(f"{namespace}_graceful_*")), "the node keeps a running pod's volumes and logs"

    terminated = _final_container_state(cluster, namespace, "graceful")

    assert terminated["exitCode"] == 0
    assert terminated["message"] == "checkpoint saved after SIGTERM"
    # As a kubelet does, the node removes a deleted pod's volumes and logs from its disk.
    wait_for(
        lambda: not list(pod_dirs.glob(f"{namespace}_graceful_*")),
        timeout=30,
        what="the node to remove the deleted pod's directory",
    )


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(
    cluster: ClusterHandle, namespace: str
) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    _run_pod(cluster, namespace, "stubborn", script, grace=2)

    terminated = _final_container_state(cluster, namespace, "stubborn")

    assert terminated["exitCode"] == 137, "SIGKILL is reported as 128 + 9"


def test_deleting_the_owner_garbage_collects_job_and_pods(cluster: ClusterHandle, namespace: str) -> None:
    apply(
        cluster,
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}},
    )
    owner = get(cluster, namespace, "configmap", "owner")
    manifest = job_manifest(
        "owned", [python_container("import time; print('ready', flush=True); time.sleep(600)")]
    )
    manifest["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "owner",
            "uid": owner["metadata"]["uid"],
            "blockOwnerDeletion": True,
        }
    ]
    apply(cluster, namespace, manifest)
    wait_for(
        lambda: any(p["status"].get("phase") == "Running" for p in job_pods(cluster, namespace, "owned")),
        timeout=60,
        what="the owned job's pod to run",
    )

    cluster.kubectl("delete", "configmap", "-n", namespace, "owner")

    wait_for(
        lambda: cluster.kubectl("get", "job", "-n", namespace, "owned", check=False).returncode != 0,
        timeout=60,
        what="the garbage collector to delete the job",
    )
    wait_for(
        lambda: not job_pods(cluster, namespace, "owned"),
        timeout=90,
        what="the garbage collector to delete the job's pods",
    )


def test_indexed_job_pods_reach_each_other_by_hostname_and_subdomain(
    cluster: ClusterHandle, namespace: str
) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "workers"},
            "spec": {
                "clusterIP": "None",
                "selector": {"job-name": "ring"},
                "ports": [{"name": "rdzv", "port": 29500}],
            },
        },
    )
    script = textwrap.dedent(
        """
        import os, pathlib, socket, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        me = os.environ["POD_IP"]
        if index == 0:
            server = socket.create_server((me, 29500))
            conn, _ = server.accept()
            hello = conn.recv(100).decode()
            conn.sendall(f"welcome from {me}".encode())
            conn.close()
            pathlib.Path("/dev/termination-log").write_text(f"{me} got '{hello}'")
        else:
            target = "ring-0.workers"
            deadline = time.time() + 60
            while True:
                try:
                    conn = socket.create_connection((target, 29500), timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
            conn.sendall(f"hello from {me} as {socket.gethostname()}".encode())
            reply = conn.recv(100).decode()
            resolved = socket.gethostbyname(target)
            pathlib.Path("/dev/termination-log").write_text(f"{me} got '{reply}' from {resolved}")
        """
    )
    container = python_container(
        script, env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    )
    apply(
        cluster,
        namespace,
        job_manifest(
            "ring",
            [container],
            completions=2,
            parallelism=2,
            completionMode="Indexed",
            template_spec={"subdomain": "workers"},
        ),
    )

    condition = wait_job_finished(cluster, namespace, "ring", timeout=120)

    assert condition["type"] == "Complete"
    pods = sorted(
        job_pods(cluster, namespace, "ring"),
        key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"],
    )
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    messages = [p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] for p in pods]
    assert messages[0] == f"{ips[0]} got 'hello from {ips[1]} as ring-1'"
    assert messages[1] == f"{ips[1]} got 'welcome from {ips[0]}' from {ips[0]}"


def test_two_pods_listen_on_the_wildcard_address_of_the_same_port(
    cluster: ClusterHandle, namespace: str
) -> None:
    """As in pods' own network namespaces (rank 0 of two multi-node jobs each runs torchrun's
    store on every address of port 29500): each pod's wildcard bind is its pod IP's."""
    apply(cluster, namespace, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "wildcard"},
        "spec": {"clusterIP": "None", "selector": {"job-name": "wild"}, "ports": [{"name": "p", "port": 29501}]},
    })  # fmt: skip
    script = textwrap.dedent(
        """
        import os, pathlib, socket, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        server = socket.create_server(("0.0.0.0", 29501))  # every address, as torchrun's store
        peer = f"wild-{1 - index}.wildcard"
        deadline = time.time() + 60
        while True:  # both listen at once: each reaches the other's port
            try:
                conn = socket.create_connection((peer, 29501), timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        accepted, _ = server.accept()
        conn.sendall(b"x")
        accepted.recv(1)
        pathlib.Path("/dev/termination-log").write_text(f"listened on {server.getsockname()[0]}")
        """
    )
    apply(cluster, namespace, job_manifest("wild", [python_container(script)], completions=2, parallelism=2,
                                           completionMode="Indexed", template_spec={"subdomain": "wildcard"}))  # fmt: skip

    condition = wait_job_finished(cluster, namespace, "wild", timeout=120)

    assert condition["type"] == "Complete", condition
    pods = job_pods(cluster, namespace, "wild")
    messages = sorted(p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] for p in pods)
    assert messages == sorted(f"listened on {p['status']['podIP']}" for p in pods)


def _token(cluster: ClusterHandle, namespace: str, service_account: str) -> str:
    return cluster.kubectl("create", "token", service_account, "-n", namespace).stdout.strip()


def _core_as(cluster: ClusterHandle, token: str) -> client.CoreV1Api:
    configuration = client.Configuration()
    configuration.host = cluster.cluster.apiserver_url
    configuration.ssl_ca_cert = str(cluster.cluster.pki / "ca.crt")
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.CoreV1Api(client.ApiClient(configuration))


def test_rbac_refuses_a_service_account_without_rights_and_allows_one_with_a_role(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader-reads",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )

    nobody = _core_as(cluster, _token(cluster, namespace, "nobody"))
    reader = _core_as(cluster, _token(cluster, namespace, "reader"))

    try:
        nobody.list_namespaced_pod(namespace)
        raise AssertionError("a ServiceAccount without a Role must be refused")
    except ApiException as exc:
        assert exc.status == 403
        assert f"system:serviceaccount:{namespace}:nobody" in json.loads(exc.body)["message"]
    assert reader.list_namespaced_pod(namespace).items == []
    try:
        reader.list_namespaced_secret(namespace)
        raise AssertionError("the Role grants pods only, not secrets")
    except ApiException as exc:
        assert exc.status == 403


def test_s3_multipart_upload_of_64_mib_reads_back_identical(cluster: ClusterHandle, tmp_path: Any) -> None:
    from boto3.s3.transfer import TransferConfig

    s3 = cluster.s3_client()
    bucket = f"test-{os.getpid()}-{os.urandom(3).hex()}"
    s3.create_bucket(Bucket=bucket)
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    transfer = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)

    s3.upload_file(str(source), bucket, "data/blob.bin", Config=transfer)

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert [(o["Key"], o["Size"]) for o in listing["Contents"]] == [("data/blob.bin", 64 * 1024 * 1024)]
    head = s3.head_object(Bucket=bucket, Key="data/blob.bin")
    assert head["ETag"].strip('"').endswith("-8"), "the upload must have been multipart (8 parts)"
    target = tmp_path / "back.bin"
    s3.download_file(bucket, "data/blob.bin", str(target), Config=transfer)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()


def test_pods_get_a_service_account_token_and_reach_the_api_in_cluster(
    cluster: ClusterHandle, namespace: str
) -> None:
    cluster.kubectl("create", "serviceaccount", "lister", "-n", namespace)
    cluster.kubectl(
        "create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps", "-n", namespace
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "lister-reads",
        "--role=cm-reader",
        f"--serviceaccount={namespace}:lister",
        "-n",
        namespace,
    )
    script = textwrap.dedent(
        """
        import pathlib
        from kubernetes import client, config
        config.load_incluster_config()
        namespace = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text()
        names = sorted(cm.metadata.name for cm in client.CoreV1Api().list_namespaced_config_map(namespace).items)
        try:
            client.CoreV1Api().list_namespaced_secret(namespace)
            secrets = "allowed"
        except client.ApiException as exc:
            secrets = str(exc.status)
        pathlib.Path("/dev/termination-log").write_text(f"{namespace} {names} secrets:{secrets}")
        """
    )
    apply(
        cluster,
        namespace,
        job_manifest("incluster", [python_container(script)], template_spec={"serviceAccountName": "lister"}),
    )

    condition = wait_job_finished(cluster, namespace, "incluster")

    [pod] = job_pods(cluster, namespace, "incluster")
    assert condition["type"] == "Complete", pod["status"]
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert message == f"{namespace} ['kube-root-ca.crt'] secrets:403"


def test_restart_policy_on_failure_restarts_the_container_in_the_same_pod(
    cluster: ClusterHandle, namespace: str
) -> None:
    script = textwrap.dedent(
        """
        import pathlib, sys
        marker = pathlib.Path("/scratch/attempted")
        if not marker.exists():
            marker.write_text("1")
            print("first attempt fails", flush=True)
            sys.exit(7)
        print("second attempt succeeds", flush=True)
        """
    )
    container = python_container(script, volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])
    apply(
        cluster,
        namespace,
        job_manifest(
            "retry-in-place",
            [container],
            backoffLimit=3,
            template_spec={"restartPolicy": "OnFailure", "volumes": [{"name": "scratch", "emptyDir": {}}]},
        ),
    )

    condition = wait_job_finished(cluster, namespace, "retry-in-place")

    assert condition["type"] == "Complete"
    [pod] = job_pods(cluster, namespace, "retry-in-place")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0
    previous = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "--previous").stdout
    assert "first attempt fails" in previous


def test_a_missing_secret_keeps_the_pod_waiting_until_it_is_created(
    cluster: ClusterHandle, namespace: str
) -> None:
    container = python_container(
        "import os, pathlib; pathlib.Path('/dev/termination-log').write_text(os.environ['TOKEN'])",
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}],
    )
    apply(cluster, namespace, job_manifest("patient", [container]))

    waiting = wait_for(
        lambda: [
            s["state"]["waiting"]
            for p in job_pods(cluster, namespace, "patient")
            for s in p["status"].get("containerStatuses") or []
            if s["state"].get("waiting", {}).get("reason") == "CreateContainerConfigError"
        ],
        timeout=60,
        what="the pod to report CreateContainerConfigError",
    )
    assert 'secret "late" not found' in waiting[0]["message"]

    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "late"},
            "stringData": {"token": "arrived"},
        },
    )

    assert wait_job_finished(cluster, namespace, "patient")["type"] == "Complete"
    [pod] = job_pods(cluster, namespace, "patient")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "arrived"


def test_a_volume_mounted_over_tmp_does_not_hide_the_other_volumes(
    cluster: ClusterHandle, namespace: str
) -> None:
    # The node's own files may live under /tmp (the tests' clusters do): mounting an emptyDir at
    # /tmp first must not hide the ConfigMap volume's source from the mounts after it.
    apply(
        cluster,
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"k": "v"}},
    )
    script = "import pathlib; pathlib.Path('/dev/termination-log').write_text(pathlib.Path('/etc/cfg/k').read_text() + str(list(pathlib.Path('/tmp').iterdir())))"
    container = python_container(
        script,
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}, {"name": "cfg", "mountPath": "/etc/cfg"}],
    )
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}]
    apply(cluster, namespace, job_manifest("shadow", [container], template_spec={"volumes": volumes}))

    assert wait_job_finished(cluster, namespace, "shadow")["type"] == "Complete"
    [pod] = job_pods(cluster, namespace, "shadow")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "v[]"
