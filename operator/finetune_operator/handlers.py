"""kopf glue: each handler is one line calling the operator's `Controller` (`controller`), which
owns the settings, schedule, locks, cache, API client and background loop.

Run: `finetune-operator` (= `python -m finetune_operator`), or
`kopf run --standalone -A -m finetune_operator.handlers`. kopf is used for what it is good at —
watching with reconnects, per-object event ordering, logging, liveness — but not its
on.create/on.update bookkeeping: that costs an annotation patch per change, and its timers put
a finalizer on every job. docs/operator.md explains the settings.
"""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator.api import GROUP, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION
from finetune_operator.controller import Controller

CONTROLLER = Controller()


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    CONTROLLER.start(settings)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The in-cluster ServiceAccount, else $KUBECONFIG as it is now (the client library's own
    default is fixed when it is imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    CONTROLLER.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_event(type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    CONTROLLER.on_finetunejob_event(type, body, namespace or "", name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def batch_job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    CONTROLLER.on_batch_job_event(type, body)
