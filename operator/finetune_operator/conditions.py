"""kstatus conditions of a FineTuneJob (pure): Ready, Reconciling, Stalled for a phase (the table
in `status`), and UnknownFields while the manifest has fields the schema dropped.

Must not import kopf or the Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from finetune_operator.api import ConditionType, Phase, Reason, rfc3339

MESSAGE_MAX = 1024


def clip(text: str) -> str:
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 1] + "…"


def conditions(
    phase: Phase,
    reason: Reason,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
    *,
    stalled: bool = False,
) -> list[dict[str, Any]]:
    """kstatus conditions for a phase (see the module docstring's table)."""
    reconciling = (phase in (Phase.PENDING, Phase.RUNNING) or reason is Reason.SUSPENDING) and not stalled
    is_stalled = phase in (Phase.FAILED, Phase.CANCELLED) or stalled
    values = {
        ConditionType.READY: phase is Phase.SUCCEEDED,
        ConditionType.RECONCILING: reconciling,
        ConditionType.STALLED: is_stalled,
    }
    if phase is Phase.SUSPENDED:
        # No Ready condition: kstatus (Flux) reads Ready=False as "in progress", which would hold
        # a `wait: true` Kustomization until it times out; without it a settled suspended job is
        # Current, as intended. Ready=True would make `kubectl wait --for=condition=Ready` lie.
        del values[ConditionType.READY]
    before = {c.get("type"): c for c in previous}
    out = []
    for kind, value in values.items():
        text = "True" if value else "False"
        old = before.get(kind.value)
        changed = old is None or old.get("status") != text
        out.append(
            {
                "type": kind.value,
                "status": text,
                "reason": reason.value,
                "message": message,
                "lastTransitionTime": rfc3339(now)
                if changed or not old
                else old.get("lastTransitionTime", rfc3339(now)),
                "observedGeneration": generation,
            }
        )
    return out


UNKNOWN_FIELDS_REASON = "FieldsDropped"


def unknown_fields_condition(
    fields: Sequence[str] | None, previous: Mapping[str, Any], generation: int, now: datetime
) -> dict[str, Any] | None:
    """The UnknownFields condition: present while the last applied manifest has fields the
    schema does not know; carried over when this cycle could not tell (`fields` None)."""
    before = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == ConditionType.UNKNOWN_FIELDS.value),
        None,
    )
    if fields is None:
        return dict(before) if before else None
    if not fields:
        return None
    message = clip(
        "the API server dropped fields it does not know (typos?), so they have no effect: "
        + ", ".join(fields)
        + " (kubectl explain finetunejob.spec lists the fields; kubectl apply refuses them)"
    )
    same = before is not None and before.get("message") == message
    return {
        "type": ConditionType.UNKNOWN_FIELDS.value,
        "status": "True",
        "reason": UNKNOWN_FIELDS_REASON,
        "message": message,
        "lastTransitionTime": before.get("lastTransitionTime", rfc3339(now))
        if same and before
        else rfc3339(now),
        "observedGeneration": generation,
    }
