"""FineTuneJobs, and the pods, events, Secrets and ConfigMaps around them, through the
Kubernetes API (I/O).

Uses the official client with the KUBECONFIG context (`--kubeconfig`, `--context`; or the
in-cluster config), reading raw JSON so objects are the camelCase dicts `reading` and
`experiments` work on. Every API error becomes a `CliError` that says what to do. Called by the
commands through `app.App`; makes no decisions.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from finetune_cli.errors import CliError
from finetune_operator.api import GROUP, PLURAL, VERSION

CRD_HINT = (
    "install the FineTuneJob CRD: kubectl apply --server-side -f crds/finetune.dev_finetunejobs.yaml "
    "(or install the Helm chart)"
)


def load(context: str | None = None, kubeconfig: str | None = None) -> tuple[Any, str]:
    """An API client and the context's namespace (default: 'default')."""
    try:
        api = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
        contexts, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
        return api, namespace
    except (ConfigException, OSError) as exc:
        if kubeconfig:
            raise CliError(
                f"--kubeconfig {kubeconfig}: {exc}", hint="pass a readable kubeconfig file"
            ) from None
        try:
            k8s_config.load_incluster_config()
        except ConfigException:
            raise CliError(
                f"no Kubernetes configuration: {exc}",
                hint="set KUBECONFIG or run `kubectl config use-context <name>`",
            ) from None
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as handle:
            return k8s_client.ApiClient(), handle.read().strip()


def _cause(cause: Mapping[str, Any]) -> str:
    field, text = str(cause.get("field") or ""), str(cause.get("message") or "")
    return text if not field or text.startswith(field) else f"{field}: {text}"


class Jobs:
    """FineTuneJobs in one namespace."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = k8s_client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.host = str(api_client.configuration.host)

    def _call(self, what: str, fn: Any, *args: Any, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            response = fn(GROUP, VERSION, *args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise self._error(what, exc, name) from None
        except HTTPError as exc:
            raise CliError(
                f"cannot reach the Kubernetes API at {self.host}: {exc}",
                hint="is the cluster running? check KUBECONFIG and `kubectl cluster-info`",
            ) from None
        data: dict[str, Any] = json.loads(response.data or b"{}")
        return data

    def _error(self, what: str, exc: ApiException, name: str | None) -> CliError:
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            body = json.loads(exc.body or "{}")
        message = str(body.get("message") or exc.reason)
        if exc.status == 404 and "the server could not find the requested resource" in message:
            return CliError("the FineTuneJob API is not installed in this cluster", hint=CRD_HINT)
        if exc.status == 404:
            return CliError(
                f"FineTuneJob {name} not found in namespace {self.namespace}",
                hint="list jobs with `kubectl finetune status` (or pass --namespace)",
            )
        if exc.status == 403:
            return CliError(
                f"not allowed to {what}: {message}", hint="ask for RBAC rights on finetunejobs.finetune.dev"
            )
        if exc.status == 409:
            return CliError(
                f"FineTuneJob {name} already exists in namespace {self.namespace}",
                hint="choose another metadata.name, or delete it: kubectl finetune experiment delete "
                + str(name),
            )
        if exc.status == 422:
            causes = (body.get("details") or {}).get("causes") or []
            details = [_cause(c) for c in causes]
            if details:
                return CliError(f"the API server rejected FineTuneJob {name}", details=details)
            return CliError(f"the API server rejected FineTuneJob {name}: {message}")
        return CliError(f"{what} failed: {exc.status} {message}")

    def list(self, *, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            data = self._call(
                "list FineTuneJobs in all namespaces", self.api.list_cluster_custom_object, PLURAL
            )
        else:
            data = self._call(
                "list FineTuneJobs", self.api.list_namespaced_custom_object, self.namespace, PLURAL
            )
        return list(data.get("items") or [])

    def get(self, name: str) -> dict[str, Any]:
        return self._call(
            f"get FineTuneJob {name}",
            self.api.get_namespaced_custom_object,
            self.namespace,
            PLURAL,
            name,
            name=name,
        )

    def create(self, manifest: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        name = (manifest.get("metadata") or {}).get("name")
        kwargs = {"dry_run": "All"} if dry_run else {}
        return self._call(
            f"create FineTuneJob {name}",
            self.api.create_namespaced_custom_object,
            self.namespace,
            PLURAL,
            dict(manifest),
            name=name,
            field_validation="Strict",
            **kwargs,
        )

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch spec fields (suspend, cancel)."""
        return self._call(
            f"patch FineTuneJob {name}",
            self.api.patch_namespaced_custom_object,
            self.namespace,
            PLURAL,
            name,
            {"spec": dict(spec)},
            name=name,
        )

    def delete(self, name: str) -> None:
        self._call(
            f"delete FineTuneJob {name}",
            self.api.delete_namespaced_custom_object,
            self.namespace,
            PLURAL,
            name,
            name=name,
        )


def unreachable(host: str, exc: Exception) -> CliError:
    return CliError(
        f"cannot reach the Kubernetes API at {host}: {exc}",
        hint="is the cluster running? check KUBECONFIG and `kubectl cluster-info`",
    )


class Core:
    """Pods, their logs, events, Secrets and ConfigMaps: what the commands need around a job."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = k8s_client.CoreV1Api(api_client)
        self.version_api = k8s_client.VersionApi(api_client)
        self.namespace = namespace
        self.host = str(api_client.configuration.host)

    def _json(self, what: str, fn: Any, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """The decoded response; None for 404/403 when `missing_ok` (optional reads)."""
        try:
            response = fn(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if missing_ok and exc.status in (403, 404):
                return None
            body: dict[str, Any] = {}
            with contextlib.suppress(ValueError):
                body = json.loads(exc.body or "{}")
            message = str(body.get("message") or exc.reason)
            if exc.status == 403:
                hint = "ask your cluster admin for the right, or pass --namespace"
                raise CliError(f"not allowed to {what}: {message}", hint=hint) from None
            raise CliError(f"{what} failed: {exc.status} {message}") from None
        except HTTPError as exc:
            raise unreachable(self.host, exc) from None
        return json.loads(response.data or b"{}")

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """The ConfigMap's data; None if it does not exist or may not be read."""
        found = self._json(
            f"read ConfigMap {namespace}/{name}",
            self.api.read_namespaced_config_map,
            name,
            namespace,
            missing_ok=True,
        )
        return None if found is None else dict(found.get("data") or {})

    def secret_data(self, name: str) -> dict[str, str] | None:
        """A Secret of the namespace, decoded; None if it does not exist or may not be read."""
        found = self._json(
            f"read Secret {self.namespace}/{name}",
            self.api.read_namespaced_secret,
            name,
            self.namespace,
            missing_ok=True,
        )
        if found is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    def put_secret(self, name: str, string_data: Mapping[str, str], labels: Mapping[str, str]) -> str:
        """Create the Secret, or replace its data; 'created' or 'updated'."""
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": dict(labels)}
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "stringData": dict(string_data),
        }
        existing = self._json(
            f"read Secret {self.namespace}/{name}",
            self.api.read_namespaced_secret,
            name,
            self.namespace,
            missing_ok=True,
        )
        if existing is None:
            self._json(
                f"create Secret {self.namespace}/{name}",
                self.api.create_namespaced_secret,
                self.namespace,
                body,
            )
            return "created"
        self._json(
            f"replace Secret {self.namespace}/{name}",
            self.api.replace_namespaced_secret,
            name,
            self.namespace,
            {**body, "metadata": {**metadata, "resourceVersion": existing["metadata"]["resourceVersion"]}},
        )
        return "updated"

    def pods(self, selector: str) -> list[dict[str, Any]]:
        data = self._json(
            f"list pods in {self.namespace}",
            self.api.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
        )
        return list(data.get("items") or [])

    def log(self, pod: str, *, container: str | None, follow: bool, tail: int | None) -> Iterator[bytes]:
        """The pod's log, as it arrives with `follow`."""
        kwargs: dict[str, Any] = {"follow": follow}
        if container:
            kwargs["container"] = container
        if tail is not None:
            kwargs["tail_lines"] = tail
        try:
            response = self.api.read_namespaced_pod_log(pod, self.namespace, _preload_content=False, **kwargs)
        except ApiException as exc:
            body: dict[str, Any] = {}
            with contextlib.suppress(ValueError):
                body = json.loads(exc.body or "{}")
            raise CliError(f"cannot read the log of pod {pod}: {body.get('message') or exc.reason}") from None
        except HTTPError as exc:
            raise unreachable(self.host, exc) from None
        try:
            yield from response.stream(4096)
        finally:
            response.release_conn()

    def events(self) -> list[dict[str, Any]]:
        data = self._json(f"list events in {self.namespace}", self.api.list_namespaced_event, self.namespace)
        return list(data.get("items") or [])

    def server_version(self) -> str | None:
        try:
            return str(self.version_api.get_code().git_version)
        except (ApiException, HTTPError):
            return None
