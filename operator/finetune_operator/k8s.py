"""The operator's only door to the Kubernetes API: a small wrapper with plain-dict objects.

`Cluster` is the interface `reconcile` uses (tests/operator fakes it); `KubeCluster` implements
it with the official client, reading raw JSON (`_preload_content=False`) so objects are the same
camelCase dicts the builders produce. Creating an existing object returns the existing one
(AlreadyExists is success: names are deterministic). Every request is counted in
`metrics.API_REQUESTS`. `create_all` runs its creates concurrently and `event` posts in the
background (events are best effort), both on a small thread pool of the wrapper's own, so a
new job costs two round trips before its status is written instead of five.

Imported by `reconcile` (the interface) and `controller` (the implementation). No decisions here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Protocol

from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException

from finetune_operator import kueue, metrics
from finetune_operator.api import GROUP, PLURAL, VERSION, ObjectRef, rfc3339

Obj = dict[str, Any]
log = logging.getLogger(__name__)


class ApiError(Exception):
    """A failed API request other than the expected 404/409."""

    def __init__(self, verb: str, kind: str, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{verb} {kind}: {status} {reason}" + (f": {message}" if message else ""))
        self.verb = verb
        self.kind = kind
        self.status = status
        self.reason = reason
        self.message = message  # the API server's own explanation (Status.message), if any


class Conflict(ApiError):
    """A write with a resourceVersion precondition found a newer object (409)."""


class Cluster(Protocol):
    """What reconcile needs from the API server."""

    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        """The FineTuneJob, or None if it is gone."""

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A child (ConfigMap, Service, Job), a ServiceAccount or a PriorityClass (cluster-scoped:
        namespace ignored), or None."""

    def create(self, obj: Mapping[str, Any]) -> tuple[Obj, bool]:
        """Create a child; returns (the object, created). If it exists: (existing, False)."""

    def create_all(self, objs: Sequence[Mapping[str, Any]]) -> list[tuple[Obj, bool]]:
        """`create` for each object, in any order (concurrently); results in the given order.
        Raises the first error after every create has finished."""

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        """Merge-patch a child."""

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> None:
        """Delete a child in the foreground (its dependents first), only if it still has `uid`;
        gone already is success."""

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[Obj]:
        """Pods matching all labels."""

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> Obj:
        """Merge-patch the FineTuneJob's status subresource; returns the updated FineTuneJob.
        With `resource_version`: only if the object still has it, else raises `Conflict`."""

    def event(self, ref: ObjectRef, *, type: str, reason: str, message: str, now: datetime) -> None:
        """Record a core/v1 Event on the FineTuneJob (best effort)."""

    def find_workload(self, namespace: str, job_uid: str) -> Obj | None:
        """Kueue's Workload for the batch Job with this uid; None if there is none (or Kueue's
        API is not installed)."""

    def patch_workload(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        """Merge-patch a Workload."""


def _read_only(*_: Any, **__: Any) -> Any:
    raise ValueError("the operator only reads this kind")


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


class KubeCluster:
    """`Cluster` over the official client (one shared ApiClient, thread-safe for our use).

    `parallelism`: threads for concurrent creates and background events; give the ApiClient's
    connection pool room for them next to the reconcile workers' own requests."""

    def __init__(self, api_client: k8s_client.ApiClient, *, parallelism: int = 8) -> None:
        self.core = k8s_client.CoreV1Api(api_client)
        self.batch = k8s_client.BatchV1Api(api_client)
        self.networking = k8s_client.NetworkingV1Api(api_client)
        self.custom = k8s_client.CustomObjectsApi(api_client)
        self.scheduling = k8s_client.SchedulingV1Api(api_client)
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="finetune-api")

    def close(self) -> None:
        """Wait for the events still being posted, then stop the pool."""
        self._pool.shutdown(wait=True)

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, verb: str, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj | None:
        """Run one request; returns the parsed JSON, None on 404; raises ApiError otherwise."""
        metrics.API_REQUESTS.labels(verb=verb, kind=kind).inc()
        try:
            response = fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and verb in ("get", "patch", "delete"):
                return None
            if exc.status == 409 and verb == "create":
                raise _AlreadyExists() from None
            if exc.status == 409:  # a stale resourceVersion: expected now and then, not an error
                raise Conflict(verb, kind, 409, str(exc.reason)) from None
            metrics.ERRORS.labels(kind=f"api_{exc.status}").inc()
            raise ApiError(verb, kind, int(exc.status or 0), str(exc.reason), _status_message(exc)) from None
        data = response.data
        return json.loads(data) if data else {}

    def _readers(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """(read, create, patch) for a child kind."""
        if kind == "ConfigMap":
            return (
                self.core.read_namespaced_config_map,
                self.core.create_namespaced_config_map,
                self.core.patch_namespaced_config_map,
            )
        if kind == "Service":
            return (
                self.core.read_namespaced_service,
                self.core.create_namespaced_service,
                self.core.patch_namespaced_service,
            )
        if kind == "Job":
            return (
                self.batch.read_namespaced_job,
                self.batch.create_namespaced_job,
                self.batch.patch_namespaced_job,
            )
        if kind == "NetworkPolicy":
            return (
                self.networking.read_namespaced_network_policy,
                self.networking.create_namespaced_network_policy,
                self.networking.patch_namespaced_network_policy,
            )
        if kind == "ServiceAccount":  # read only: does the pods' ServiceAccount exist?
            return self.core.read_namespaced_service_account, _read_only, _read_only
        if kind == "PriorityClass":  # cluster-scoped, read only
            return (
                lambda name, _namespace, **kw: self.scheduling.read_priority_class(name, **kw),
                _read_only,
                _read_only,
            )
        raise ValueError(f"not a child kind: {kind}")

    # -- Cluster -----------------------------------------------------------------------------
    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        return self._call(
            "get",
            "FineTuneJob",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
        )

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        read, _, _ = self._readers(kind)
        return self._call("get", kind, read, name, namespace)

    def create(self, obj: Mapping[str, Any]) -> tuple[Obj, bool]:
        kind = obj["kind"]
        namespace = obj["metadata"]["namespace"]
        name = obj["metadata"]["name"]
        read, create, _ = self._readers(kind)
        try:
            created = self._call("create", kind, create, namespace, obj)
        except _AlreadyExists:
            existing = self._call("get", kind, read, name, namespace)
            if existing is None:  # deleted in between: try once more
                created = self._call("create", kind, create, namespace, obj)
                return created or {}, True
            return existing, False
        return created or {}, True

    def create_all(self, objs: Sequence[Mapping[str, Any]]) -> list[tuple[Obj, bool]]:
        if len(objs) <= 1:
            return [self.create(obj) for obj in objs]
        futures = [self._pool.submit(self.create, obj) for obj in objs]
        errors = [exc for future in futures if (exc := future.exception()) is not None]
        if errors:
            raise errors[0]
        return [future.result() for future in futures]

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        _, _, patch_fn = self._readers(kind)
        result = self._call("patch", kind, patch_fn, name, namespace, patch)
        if result is None:
            raise ApiError("patch", kind, 404, "NotFound")
        return result

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> None:
        if kind != "Job":
            raise ValueError(f"the operator deletes only Jobs, not {kind}")
        body: dict[str, Any] = {"propagationPolicy": "Foreground"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call("delete", kind, self.batch.delete_namespaced_job, name, namespace, body=body)
        except Conflict:  # the uid precondition: a newer Job of the same name, not ours to delete
            return

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[Obj]:
        result = self._call(
            "list", "Pod", self.core.list_namespaced_pod, namespace, label_selector=_selector(selector)
        )
        return list((result or {}).get("items") or [])

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> Obj:
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}  # optimistic concurrency
        result = self._call(
            "patch",
            "FineTuneJob/status",
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body,
        )
        return result or {}  # {}: deleted meanwhile (the next cycle sees it gone)

    def event(self, ref: ObjectRef, *, type: str, reason: str, message: str, now: datetime) -> None:
        timestamp = rfc3339(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune.dev/operator",
            "reportingInstance": "finetune-operator",
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        self._pool.submit(self._post_event, ref.namespace, body)

    def find_workload(self, namespace: str, job_uid: str) -> Obj | None:
        metrics.API_REQUESTS.labels(verb="list", kind="Workload").inc()
        try:
            response = self.custom.list_namespaced_custom_object(
                kueue.GROUP,
                kueue.VERSION,
                namespace,
                kueue.WORKLOADS,
                label_selector=f"{kueue.JOB_UID_LABEL}={job_uid}",
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status == 404:  # Kueue is not installed: the Job just waits, suspended
                return None
            metrics.ERRORS.labels(kind=f"api_{exc.status}").inc()
            raise ApiError("list", "Workload", int(exc.status or 0), str(exc.reason)) from None
        items = list(json.loads(response.data).get("items") or [])
        return max(items, key=lambda w: str(w["metadata"].get("creationTimestamp") or "")) if items else None

    def patch_workload(self, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        result = self._call(
            "patch",
            "Workload",
            self.custom.patch_namespaced_custom_object,
            kueue.GROUP,
            kueue.VERSION,
            namespace,
            kueue.WORKLOADS,
            name,
            patch,
        )
        if result is None:
            raise ApiError("patch", "Workload", 404, "NotFound")
        return result

    def _post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        """Events are best effort: a failure is logged and counted, never retried."""
        try:
            self._call("create", "Event", self.core.create_namespaced_event, namespace, body)
        except ApiError as exc:  # already counted by _call
            log.warning("event %s/%s not recorded: %s", namespace, body.get("reason"), exc)
        except _AlreadyExists:  # generateName makes this impossible; nothing to do
            pass
        except Exception:  # a background thread: nobody else would see it
            metrics.ERRORS.labels(kind="event").inc()
            log.exception("event %s/%s not recorded", namespace, body.get("reason"))


class _AlreadyExists(Exception):
    pass


def _status_message(exc: ApiException) -> str:
    """The message of the API server's Status body (what it says is wrong), else ''."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return ""
    return str(body.get("message") or "") if isinstance(body, dict) else ""
