"""FineTuneJobs through the Kubernetes API (I/O).

Uses the official client with the current KUBECONFIG context (or the in-cluster config), reading
raw JSON so objects are the camelCase dicts `views` and `experiments` work on. Every API error
becomes a `CliError` that says what to do. Called by `main`; makes no decisions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
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


def load(context: str | None = None) -> tuple[Any, str]:
    """An API client and the context's namespace (default: 'default')."""
    try:
        api = k8s_config.new_client_from_config(context=context)
        _, active = k8s_config.list_kube_config_contexts()
        if context:
            contexts, _ = k8s_config.list_kube_config_contexts()
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
        return api, namespace
    except (ConfigException, OSError) as exc:
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

    def list(self) -> list[dict[str, Any]]:
        data = self._call("list FineTuneJobs", self.api.list_namespaced_custom_object, self.namespace, PLURAL)
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
