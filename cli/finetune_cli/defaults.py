"""The operator's storage defaults, as the chart publishes them for the CLI (pure).

The Helm chart writes the operator's storage settings — runs and datasets URIs, S3 endpoint and
region, the name of the credentials Secret each job namespace holds — into the ConfigMap
`finetune-defaults` of the operator's namespace, readable by every authenticated user (never
credentials: only where things are). Every `kubectl finetune` command takes a setting from, in
order: its flag, its environment variable, that ConfigMap. `app.App.defaults` reads the
ConfigMap (through `kube`) when a command needs it; this module only parses and picks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CONFIGMAP = "finetune-defaults"
DEFAULT_OPERATOR_NAMESPACE = "finetune-system"  # where the docs install the chart
ENV_OPERATOR_NAMESPACE = "FINETUNE_OPERATOR_NAMESPACE"
# The ConfigMap's keys (helm/finetune-operator/templates/studio-defaults.yaml).
KEYS = ("runsUri", "datasetsUri", "endpoint", "region", "credentialsSecret", "operatorVersion")


@dataclass(frozen=True)
class ClusterDefaults:
    """What the ConfigMap says; every field None when it is absent or unreadable (`source` then
    says why, for error messages)."""

    source: str
    found: bool = False
    runs_uri: str | None = None
    datasets_uri: str | None = None
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None
    operator_version: str | None = None

    @classmethod
    def from_configmap(cls, data: Mapping[str, str] | None, *, source: str) -> ClusterDefaults:
        """The ConfigMap's `data` (None: not found); empty values count as unset, unknown keys
        are ignored (a newer chart may publish more)."""
        if data is None:
            return cls(source=source)
        value = {key: (str(data[key]).strip() or None) if data.get(key) else None for key in KEYS}
        return cls(
            source=source,
            found=True,
            runs_uri=value["runsUri"],
            datasets_uri=value["datasetsUri"],
            endpoint=value["endpoint"],
            region=value["region"],
            credentials_secret=value["credentialsSecret"],
            operator_version=value["operatorVersion"],
        )


def operator_namespace(flag: str | None, env: Mapping[str, str]) -> str:
    return flag or env.get(ENV_OPERATOR_NAMESPACE) or DEFAULT_OPERATOR_NAMESPACE


def pick(*candidates: str | None) -> str | None:
    """The first setting given (flag, environment, ConfigMap order is the caller's)."""
    return next((c for c in candidates if c), None)
