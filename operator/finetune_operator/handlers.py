"""kopf glue: thin watch handlers that call `reconcile.reconcile`, a background loop, and the
operator's startup settings.

Run: `finetune-operator` (= `python -m finetune_operator`), or
`kopf run --standalone -A -m finetune_operator.handlers`. Every trigger runs the same
level-based cycle:

- a FineTuneJob watch event: at start-up (kopf's initial listing, i.e. resume) and whenever the
  spec is newer than the status (`metadata.generation != status.observedGeneration`: a new
  job or a spec change). Events caused by our own status writes are skipped.
- a managed batch/v1 Job watch event (pods started, finished, failed): the owner's status is
  refreshed from that Job.
- the background loop (`scheduler.Schedule`): polls rank 0's progress every
  FINETUNE_POLL_INTERVAL_SECONDS while a job runs (or is stalled), and retries cycles that
  failed on an API error after RETRY_SECONDS.

Cycles of one FineTuneJob never overlap (a lock per job), whichever trigger started them.
kopf is used for what it is good at — watching with reconnects, per-object event ordering,
logging, liveness — but not its on.create/on.update bookkeeping: that costs an annotation
patch per change, and its timers put a finalizer on every job. docs/operator.md explains the
settings below.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from prometheus_client import start_http_server

from finetune_operator import metrics
from finetune_operator import reconcile as reconcile_module
from finetune_operator.api import GROUP, KIND, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION
from finetune_operator.k8s import ApiError, KubeCluster
from finetune_operator.progress import HttpProgress
from finetune_operator.scheduler import Schedule
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)

SETTINGS = Settings.from_env(os.environ)
RETRY_SECONDS = 10.0
DEFAULT_MAX_WORKERS = 8
LOOP_TICK_SECONDS = 0.5

_state: dict[str, Any] = {}
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
# Each FineTuneJob as last seen (its watch event or our last status write): a Job event
# refreshes the status from it instead of reading the FineTuneJob again (see reconcile's
# `cached`: the write is conditional on its resourceVersion).
_latest: dict[tuple[str, str], dict[str, Any]] = {}
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _forget(namespace: str, name: str) -> None:
    """Drop everything the glue keeps for a FineTuneJob that is gone."""
    _schedule().forget(namespace, name)
    _latest.pop((namespace, name), None)
    with _locks_guard:
        _locks.pop((namespace, name), None)


def _remember(namespace: str, name: str, obj: Mapping[str, Any]) -> None:
    """Cache a FineTuneJob without what reconcile never reads (managedFields, kubectl's copy
    of the last applied manifest): 1,000 jobs cost a few MB, not tens."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    if _LAST_APPLIED in (meta.get("annotations") or {}):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != _LAST_APPLIED}
    _latest[(namespace, name)] = {**obj, "metadata": meta}


def _schedule() -> Schedule:
    schedule = _state.get("schedule")
    if schedule is None:
        schedule = _state["schedule"] = Schedule(
            poll_seconds=SETTINGS.poll_interval_seconds, retry_seconds=RETRY_SECONDS
        )
    return schedule  # type: ignore[no-any-return]


@contextmanager
def _job_lock(namespace: str, name: str) -> Iterator[None]:
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def _run(
    namespace: str,
    name: str,
    *,
    trigger: str,
    poll: bool = False,
    fresh: Mapping[str, Any] | None = None,
    observed_job: Mapping[str, Any] | None = None,
    cached: Mapping[str, Any] | None = None,
) -> None:
    """One cycle; an API error is logged and retried by the loop (never raised into kopf)."""
    cluster = _state.get("cluster")
    if cluster is None:
        return
    with _job_lock(namespace, name):
        try:
            outcome = reconcile_module.reconcile(
                cluster,
                namespace,
                name,
                settings=SETTINGS,
                now=datetime.datetime.now(datetime.UTC),
                progress=_state.get("progress") if poll else None,
                trigger=trigger,
                fresh=fresh,
                observed_job=observed_job,
                cached=cached,
            )
        except ApiError as exc:
            log.warning("%s/%s: %s; retrying in %.0fs", namespace, name, exc, RETRY_SECONDS)
            _schedule().reconciled(namespace, name, ok=False, status=None, now=time.monotonic(), polled=poll)
            return
        except Exception:
            metrics.ERRORS.labels(kind="unexpected").inc()
            log.exception("%s/%s: reconcile failed; retrying in %.0fs", namespace, name, RETRY_SECONDS)
            _schedule().reconciled(namespace, name, ok=False, status=None, now=time.monotonic(), polled=poll)
            return
    if outcome.gone:
        _forget(namespace, name)
    else:
        if outcome.object is not None:
            _remember(namespace, name, outcome.object)
        _schedule().reconciled(
            namespace, name, ok=True, status=outcome.status, now=time.monotonic(), polled=poll
        )


def _loop(stop: threading.Event) -> None:
    """Poll running jobs and retry failed cycles, one at a time."""
    while not stop.wait(LOOP_TICK_SECONDS):
        for namespace, name, poll in _schedule().due(time.monotonic()):
            if stop.is_set():
                return
            _run(namespace, name, trigger="timer" if poll else "retry", poll=poll)


# ---------------------------------------------------------------------------------------------
# startup and shutdown


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.peering.standalone = True
    settings.posting.enabled = False
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    workers = int(os.environ.get("FINETUNE_MAX_WORKERS", str(DEFAULT_MAX_WORKERS)))
    settings.execution.max_workers = workers
    # At most this many objects are processed at once; further watch events wait in the stream
    # (back-pressure) instead of piling up as queued workers in memory during a burst.
    settings.queueing.worker_limit = int(os.environ.get("FINETUNE_WORKER_LIMIT", str(8 * workers)))
    settings.queueing.idle_timeout = 0.5  # free a worker slot soon after its object goes quiet
    settings.scanning.disabled = True  # we know our resources: no cluster-wide API discovery
    # Watch only our own Jobs, filtered by the API server (not every Job in the cluster).
    settings.watching.label_selectors[("batch", "jobs")] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        # KUBECONFIG is read now, not when the client was imported.
        k8s_config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    # Each worker holds one connection at a time; the wrapper's pool (concurrent creates,
    # background events) gets as many again.
    configuration.connection_pool_maxsize = 2 * workers
    _state["cluster"] = KubeCluster(k8s_client.ApiClient(configuration), parallelism=workers)
    _state["progress"] = HttpProgress(SETTINGS.progress_timeout_seconds)
    _state["schedule"] = Schedule(poll_seconds=SETTINGS.poll_interval_seconds, retry_seconds=RETRY_SECONDS)
    port = int(os.environ.get("FINETUNE_METRICS_PORT", "8080"))
    if port and "metrics_server" not in _state:
        _state["metrics_server"] = start_http_server(
            port, addr=os.environ.get("FINETUNE_METRICS_ADDR", "0.0.0.0")
        )
    stop = threading.Event()
    thread = threading.Thread(target=_loop, args=(stop,), name="finetune-loop", daemon=True)
    _state["loop"] = (stop, thread)
    thread.start()
    log.info("finetune-operator started: %s", SETTINGS)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The in-cluster ServiceAccount, else $KUBECONFIG as it is now (the client library's own
    default is fixed when it is imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    loop = _state.pop("loop", None)
    if loop is not None:
        stop, thread = loop
        stop.set()
        thread.join(timeout=30)
    cluster = _state.pop("cluster", None)
    if cluster is not None:
        cluster.close()


# ---------------------------------------------------------------------------------------------
# FineTuneJob


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_event(type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    namespace = namespace or ""
    if type == "DELETED":
        _forget(namespace, name)
        metrics.PHASES.set(namespace, name, None)
        return
    _remember(namespace, name, body)
    _schedule().observe(namespace, name, body)
    if type is None:  # kopf's initial listing: the operator (re)started
        _run(namespace, name, trigger="resume")
    elif _schedule().needs_reconcile(namespace, name):
        new = type == "ADDED" and not body.get("status")
        _run(namespace, name, trigger="create" if new else "update", fresh=dict(body) if new else None)


# ---------------------------------------------------------------------------------------------
# children


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def child_job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    if type in (None, "ADDED"):  # the initial listing (resume covers it) or our own create
        return
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion", "")).startswith(GROUP)
        ):
            job = None if type == "DELETED" else dict(body)  # deleted: reconcile re-creates it
            key = (meta["namespace"], ref["name"])
            _run(*key, trigger="job-event", poll=True, observed_job=job, cached=_latest.get(key))
