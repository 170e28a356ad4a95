"""An in-memory `finetune_operator.k8s.Cluster` that records every call."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from finetune_operator.api import ObjectRef
from finetune_operator.k8s import ApiError, Conflict


class Crash(Exception):
    """Raised by the fake to simulate the operator dying in the middle of a cycle."""


class FakeCluster:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self.events: list[tuple[str, str, str]] = []
        self.crash_on: tuple[str, str] | None = None  # (verb, kind): raise Crash before doing it
        self.fail_on: tuple[str, str] | None = None  # (verb, kind): raise ApiError 500
        # (verb, kind) -> the ApiError to raise, as the API server would refuse it (e.g. 422)
        self.refuse: dict[tuple[str, str], ApiError] = {}
        self._rv = 0

    # helpers for tests
    def put_finetunejob(self, obj: dict[str, Any]) -> None:
        self.objects[("FineTuneJob", obj["metadata"]["namespace"], obj["metadata"]["name"])] = copy.deepcopy(
            obj
        )

    def finetunejob(self, namespace: str = "team-a", name: str = "demo") -> dict[str, Any]:
        return self.objects[("FineTuneJob", namespace, name)]

    def children(self) -> list[tuple[str, str]]:
        return sorted((kind, name) for kind, _, name in self.objects if kind != "FineTuneJob")

    def writes(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] in ("create", "patch", "event")]

    def _hook(self, verb: str, kind: str) -> None:
        if self.crash_on == (verb, kind):
            self.crash_on = None
            raise Crash(f"crash before {verb} {kind}")
        if self.fail_on == (verb, kind):
            raise ApiError(verb, kind, 500, "InternalError")
        if (verb, kind) in self.refuse:
            raise self.refuse[(verb, kind)]
        self.calls.append((verb, kind))

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    # Cluster
    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._hook("get", "FineTuneJob")
        obj = self.objects.get(("FineTuneJob", namespace, name))
        return copy.deepcopy(obj) if obj else None

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._hook("get", kind)
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def create(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        kind, meta = obj["kind"], obj["metadata"]
        self._hook("create", kind)
        key = (kind, meta["namespace"], meta["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        stored = copy.deepcopy(dict(obj))
        if kind == "Job":
            stored["status"] = {}
            stored["metadata"].setdefault("uid", f"uid-job-{meta['name']}")
        self._bump(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored), True

    def create_all(self, objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
        """In order (the real one runs them concurrently): a crash on the second create leaves the
        first child behind, as it could on a real cluster."""
        return [self.create(obj) for obj in objs]

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        self._hook("patch", kind)
        obj = self.objects[(kind, namespace, name)]
        _merge(obj, patch)
        self._bump(obj)
        return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> None:
        """Marks the object deleted (deletionTimestamp), as a foreground deletion does until its
        dependents are gone; `finish_deletion` removes it."""
        self._hook("delete", kind)
        obj = self.objects.get((kind, namespace, name))
        if obj is None or (uid is not None and obj["metadata"].get("uid") not in (None, uid)):
            return
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self._bump(obj)

    def finish_deletion(self, kind: str, namespace: str, name: str) -> None:
        del self.objects[(kind, namespace, name)]
        self.pods = []

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        self._hook("list", "Pod")
        return copy.deepcopy(self.pods)

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        self._hook("patch", "FineTuneJob/status")
        obj = self.objects[("FineTuneJob", namespace, name)]
        if resource_version is not None and resource_version != obj["metadata"].get("resourceVersion"):
            raise Conflict("patch", "FineTuneJob/status", 409, "Conflict")
        current = obj.setdefault("status", {})
        _merge(current, status)
        self._bump(obj)
        return copy.deepcopy(obj)

    def event(self, ref: ObjectRef, *, type: str, reason: str, message: str, now: datetime) -> None:
        self._hook("event", "Event")
        self.events.append((type, reason, message))

    def find_workload(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        self._hook("list", "Workload")
        for (kind, ns, _), obj in self.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if kind == "Workload" and ns == namespace and labels.get("kueue.x-k8s.io/job-uid") == job_uid:
                return copy.deepcopy(obj)
        return None

    def patch_workload(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.patch("Workload", namespace, name, patch)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """JSON merge patch (RFC 7386)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
