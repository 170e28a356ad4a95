"""Pure helpers of the process node: turn a Pod (a dict as the API returns it) into a process plan.

Called by ``finetune_dev.node``. Nothing here talks to the API server or starts processes: the
lookups of ConfigMaps, Secrets and ServiceAccount tokens are passed in as functions, so these
rules (env resolution, ``$(VAR)`` expansion, volume contents, /etc/hosts entries, pod status
fragments) are unit-tested directly.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Pod = Mapping[str, Any]
# (kind, namespace, name) -> object dict, or None when it does not exist
Lookup = Callable[[str, str, str], dict[str, Any] | None]


class PodSpecError(Exception):
    """The pod cannot be started as specified (missing ConfigMap/Secret, unsupported volume)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes, unknown stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(replace, value)


def _field_path(pod: Pod, path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodSpecError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")


def _data(obj: dict[str, Any], kind: str) -> dict[str, bytes]:
    """The decoded data of a ConfigMap or Secret as bytes per key."""
    out: dict[str, bytes] = {}
    if kind == "Secret":
        for key, value in (obj.get("data") or {}).items():
            out[key] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            out[key] = value.encode()
    else:
        for key, value in (obj.get("data") or {}).items():
            out[key] = value.encode()
        for key, value in (obj.get("binaryData") or {}).items():
            out[key] = base64.b64decode(value)
    return out


def _key_ref(ref: Mapping[str, Any], kind: str, namespace: str, lookup: Lookup) -> str | None:
    obj = lookup(kind, namespace, ref["name"])
    optional = bool(ref.get("optional"))
    if obj is None:
        if optional:
            return None
        raise PodSpecError("CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found')
    data = _data(obj, kind)
    if ref["key"] not in data:
        if optional:
            return None
        raise PodSpecError(
            "CreateContainerConfigError",
            f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}",
        )
    return data[ref["key"]].decode(errors="replace")


def container_env(
    pod: Pod,
    container: Mapping[str, Any],
    *,
    lookup: Lookup,
    pod_ip: str,
    host_ip: str,
    service_env: Mapping[str, str],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: service env, envFrom, then env."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = dict(service_env)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if not ref:
                continue
            obj = lookup(kind, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError("CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found')
            for key, raw in _data(obj, kind).items():
                env[prefix + key] = raw.decode(errors="replace")
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        source = item["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = _field_path(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], "Secret", namespace, lookup)
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], "ConfigMap", namespace, lookup)
        elif "resourceFieldRef" in source:
            value = _resource_field(container, source["resourceFieldRef"])
        else:
            raise PodSpecError(
                "CreateContainerConfigError", f"env {name}: unsupported valueFrom {sorted(source)}"
            )
        if value is not None:
            env[name] = value
    return env


def _resource_field(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    kind, _, resource = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
    return str(value) if value is not None else "0"


_QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1,
}  # fmt: skip


def memory_limit_bytes(container: Mapping[str, Any]) -> int | None:
    """The container's `resources.limits.memory` in bytes (a Kubernetes quantity), or None."""
    value = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if value is None:
        return None
    match = re.fullmatch(r"([0-9.]+(?:[eE][0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|)", str(value).strip())
    if match is None:
        raise PodSpecError(
            "CreateContainerConfigError", f"resources.limits.memory: {value!r} is not a quantity"
        )
    return int(float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2)])


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded; there is no image, so a command is required."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise PodSpecError(
            "CreateContainerConfigError",
            f"container {container['name']}: the process node runs the container's command "
            "(the image is ignored), so spec.containers[].command or args must be set",
        )
    return [expand(arg, env) for arg in argv]


@dataclass
class VolumeFiles:
    """What a volume holds: files to write (relative path -> bytes), or an existing host path."""

    files: dict[str, bytes] = field(default_factory=dict)
    host_path: str | None = None
    empty_dir: bool = False


def _items(
    data: dict[str, bytes], items: list[dict[str, Any]] | None, what: str, optional: bool
) -> dict[str, bytes]:
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise PodSpecError("FailedMount", f"{what}: key {item['key']!r} not found")
        out[item["path"]] = data[item["key"]]
    return out


def _source_files(
    pod: Pod, kind: str, name: str, items: list[dict[str, Any]] | None, optional: bool, lookup: Lookup
) -> dict[str, bytes]:
    namespace = pod["metadata"]["namespace"]
    obj = lookup(kind, namespace, name)
    if obj is None:
        if optional:
            return {}
        raise PodSpecError("FailedMount", f'{kind.lower()} "{name}" not found')
    return _items(_data(obj, kind), items, f"{kind} {namespace}/{name}", optional)


def _downward_files(pod: Pod, items: list[dict[str, Any]], pod_ip: str, host_ip: str) -> dict[str, bytes]:
    out = {}
    for item in items:
        if "fieldRef" in item:
            out[item["path"]] = _field_path(pod, item["fieldRef"]["fieldPath"], pod_ip, host_ip).encode()
    return out


def volume_files(
    pod: Pod,
    volume: Mapping[str, Any],
    *,
    lookup: Lookup,
    token: Callable[[int | None, str | None], str],
    pod_ip: str,
    host_ip: str,
) -> VolumeFiles:
    """The contents of one pod volume; ``token(expirationSeconds, audience)`` issues SA tokens."""
    if "configMap" in volume:
        src = volume["configMap"]
        return VolumeFiles(
            _source_files(pod, "ConfigMap", src["name"], src.get("items"), bool(src.get("optional")), lookup)
        )
    if "secret" in volume:
        src = volume["secret"]
        return VolumeFiles(
            _source_files(
                pod, "Secret", src["secretName"], src.get("items"), bool(src.get("optional")), lookup
            )
        )
    if "emptyDir" in volume:
        return VolumeFiles(empty_dir=True)
    if "hostPath" in volume:
        return VolumeFiles(host_path=volume["hostPath"]["path"])
    if "downwardAPI" in volume:
        return VolumeFiles(_downward_files(pod, volume["downwardAPI"].get("items") or [], pod_ip, host_ip))
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            if "configMap" in source:
                src = source["configMap"]
                files.update(
                    _source_files(
                        pod, "ConfigMap", src["name"], src.get("items"), bool(src.get("optional")), lookup
                    )
                )
            elif "secret" in source:
                src = source["secret"]
                files.update(
                    _source_files(
                        pod, "Secret", src["name"], src.get("items"), bool(src.get("optional")), lookup
                    )
                )
            elif "downwardAPI" in source:
                files.update(_downward_files(pod, source["downwardAPI"].get("items") or [], pod_ip, host_ip))
            elif "serviceAccountToken" in source:
                src = source["serviceAccountToken"]
                files[src["path"]] = token(src.get("expirationSeconds"), src.get("audience")).encode()
        return VolumeFiles(files)
    kinds = sorted(k for k in volume if k != "name")
    raise PodSpecError(
        "FailedMount",
        f"volume {volume['name']!r}: type {kinds} is not supported by the process node "
        "(supported: configMap, secret, emptyDir, hostPath, downwardAPI, projected)",
    )


@dataclass(frozen=True)
class HostEntry:
    """One live pod as seen for name resolution."""

    namespace: str
    ip: str
    hostname: str
    subdomain: str


def hosts_file(
    own: HostEntry,
    others: list[HostEntry],
    headless_services: set[tuple[str, str]],
    static: Sequence[tuple[str, list[str]]] = (),
) -> str:
    """The /etc/hosts of a pod: itself, plus every pod reachable as ``<hostname>.<subdomain>``.

    A pod's ``hostname.subdomain`` resolves only when a Service named like the subdomain exists
    in its namespace, as with cluster DNS. Short names (``host.sub``) only within a namespace.
    """
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]

    def names(entry: HostEntry, short: bool) -> list[str]:
        if entry.subdomain and (entry.namespace, entry.subdomain) in headless_services:
            fqdn = f"{entry.hostname}.{entry.subdomain}.{entry.namespace}.svc.cluster.local"
            return [fqdn, f"{entry.hostname}.{entry.subdomain}.{entry.namespace}.svc"] + (
                [f"{entry.hostname}.{entry.subdomain}"] if short else []
            )
        return []

    lines.append("\t".join([own.ip, *names(own, True), own.hostname]))
    for other in sorted(others, key=lambda e: (e.namespace, e.hostname, e.ip)):
        if other.ip == own.ip:
            continue
        entry_names = names(other, other.namespace == own.namespace)
        if entry_names:
            lines.append("\t".join([other.ip, *entry_names]))
    lines += ["\t".join([ip, *static_names]) for ip, static_names in static]
    return "\n".join(lines) + "\n"


def pod_hostname(pod: Pod) -> tuple[str, str]:
    """(hostname, subdomain) as the kubelet sets them: spec.hostname or the pod name (≤ 63 chars)."""
    spec = pod["spec"]
    hostname = spec.get("hostname") or pod["metadata"]["name"]
    return hostname[:63].rstrip("-."), spec.get("subdomain", "")


def should_restart(restart_policy: str, exit_code: int) -> bool:
    """Whether a container that exited is started again under the pod's restartPolicy."""
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def termination_reason(exit_code: int) -> str:
    """The reason a container runtime reports for a terminated container."""
    return "Completed" if exit_code == 0 else "Error"


def terminal_phase(exit_codes: list[int]) -> str:
    """A pod whose containers all terminated without restart: Succeeded only if all exited 0."""
    return "Succeeded" if all(code == 0 for code in exit_codes) else "Failed"
