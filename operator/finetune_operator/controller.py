"""The operator's running state: one `Controller` owns the settings, the schedule, the per-job
locks, the FineTuneJob cache, the API client and the background loop.

The kopf handlers (`handlers`) are one line each, calling a method here. Every trigger runs the
same level-based cycle (`reconcile.reconcile`):

- a FineTuneJob watch event (`on_finetunejob_event`): at start-up (kopf's initial listing, i.e.
  resume) and whenever the spec is newer than the status (`metadata.generation !=
  status.observedGeneration`: a new job or a spec change). Events caused by our own status
  writes are skipped.
- a managed batch/v1 Job watch event (`on_batch_job_event`: pods started, finished, failed):
  the owner's status is refreshed from that Job.
- the background loop (`scheduler.Schedule`): polls rank 0's progress every
  FINETUNE_POLL_INTERVAL_SECONDS while a job runs (or is stalled), and retries cycles that
  failed on an API error after RETRY_SECONDS.

Cycles of one FineTuneJob never overlap (a lock per job), whichever trigger started them.
Settings are read from the environment when the operator starts (`start`), not at import.
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
from finetune_operator.api import GROUP, KIND, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.k8s import ApiError, Cluster, KubeCluster
from finetune_operator.progress import HttpProgress, ProgressSource
from finetune_operator.reconcile import BatchJobChanged, JustCreated, Known, ReadEverything, reconcile
from finetune_operator.scheduler import Schedule
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)

RETRY_SECONDS = 10.0
LOOP_TICK_SECONDS = 0.5
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

Key = tuple[str, str]


def tune_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """kopf as a watcher only (docs/operator.md, "kopf settings ... and why")."""
    kopf_settings.peering.standalone = True
    kopf_settings.posting.enabled = False
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{GROUP}/operator"
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.networking.request_timeout = 30
    kopf_settings.execution.max_workers = settings.max_workers
    # At most this many objects are processed at once; further watch events wait in the stream
    # (back-pressure) instead of piling up as queued workers in memory during a burst.
    kopf_settings.queueing.worker_limit = settings.queue_limit
    kopf_settings.queueing.idle_timeout = 0.5  # free a worker slot soon after its object goes quiet
    kopf_settings.scanning.disabled = True  # we know our resources: no cluster-wide API discovery
    # Watch only our own Jobs, filtered by the API server (not every Job in the cluster).
    kopf_settings.watching.label_selectors[("batch", "jobs")] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def connect(settings: Settings) -> KubeCluster:
    """The in-cluster ServiceAccount, else $KUBECONFIG as it is now (not when the client was
    imported). Each worker holds one connection at a time; the wrapper's pool (concurrent
    creates, background events) gets as many again."""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    configuration.connection_pool_maxsize = 2 * settings.max_workers
    return KubeCluster(k8s_client.ApiClient(configuration), parallelism=settings.max_workers)


def slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A FineTuneJob without what reconcile never reads (managedFields, kubectl's copy of the
    last applied manifest): 1,000 cached jobs cost a few MB, not tens."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    if _LAST_APPLIED in (meta.get("annotations") or {}):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != _LAST_APPLIED}
    return {**obj, "metadata": meta}


def owner_of(batch_job: Mapping[str, Any]) -> Key | None:
    """(namespace, name) of the FineTuneJob that controls a batch Job, else None."""
    meta = batch_job.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion", "")).startswith(GROUP)
        ):
            return meta["namespace"], ref["name"]
    return None


class Controller:
    """Everything the operator keeps between cycles. Thread-safe: kopf's worker threads and the
    background loop call it concurrently."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.schedule = self._new_schedule()
        self.cluster: Cluster | None = None
        self.progress: ProgressSource | None = None
        self._locks: dict[Key, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Each FineTuneJob as last seen (its watch event or our last status write): a batch Job
        # event refreshes the status from it instead of reading the FineTuneJob again (see
        # `reconcile.BatchJobChanged`: the write is conditional on its resourceVersion).
        self._cache: dict[Key, dict[str, Any]] = {}
        self._loop: tuple[threading.Event, threading.Thread] | None = None
        self._metrics_server: object | None = None

    def _new_schedule(self) -> Schedule:
        return Schedule(poll_seconds=self.settings.poll_interval_seconds, retry_seconds=RETRY_SECONDS)

    # -- start and stop ----------------------------------------------------------------------

    def start(self, kopf_settings: kopf.OperatorSettings) -> None:
        """Read the settings, tune kopf, connect, serve metrics and start the loop."""
        self.settings = Settings.from_env(os.environ)
        tune_kopf(kopf_settings, self.settings)
        self.cluster = connect(self.settings)
        self.progress = HttpProgress(self.settings.progress_timeout_seconds)
        self.schedule = self._new_schedule()
        if self.settings.metrics_port and self._metrics_server is None:  # one per process
            self._metrics_server = start_http_server(
                self.settings.metrics_port, addr=self.settings.metrics_addr
            )
        stop = threading.Event()
        thread = threading.Thread(target=self._run_loop, args=(stop,), name="finetune-loop", daemon=True)
        self._loop = (stop, thread)
        thread.start()
        log.info("finetune-operator started: %s", self.settings)

    def stop(self) -> None:
        if self._loop is not None:
            stop, thread = self._loop
            self._loop = None
            stop.set()
            thread.join(timeout=30)
        cluster, self.cluster = self.cluster, None
        if isinstance(cluster, KubeCluster):
            cluster.close()

    # -- triggers ----------------------------------------------------------------------------

    def on_finetunejob_event(
        self, type: str | None, body: Mapping[str, Any], namespace: str, name: str
    ) -> None:
        if type == "DELETED":
            self._forget(namespace, name)
            metrics.PHASES.set(namespace, name, None)
            return
        self._cache[(namespace, name)] = slim(body)
        self.schedule.observe(namespace, name, body)
        if type is None:  # kopf's initial listing: the operator (re)started
            self.run(namespace, name, trigger="resume")
        elif self.schedule.needs_reconcile(namespace, name):
            new = type == "ADDED" and not body.get("status")
            known: Known = JustCreated(dict(body)) if new else ReadEverything()
            self.run(namespace, name, trigger="create" if new else "update", known=known)

    def on_batch_job_event(self, type: str | None, body: Mapping[str, Any]) -> None:
        if type in (None, "ADDED"):  # the initial listing (resume covers it) or our own create
            return
        key = owner_of(body)
        if key is None:
            return
        # Deleted: the cycle reads the children and re-creates the Job.
        known: Known = (
            ReadEverything()
            if type == "DELETED"
            else BatchJobChanged(dict(body), cached=self._cache.get(key))
        )
        self.run(*key, trigger="job-event", poll=True, known=known)

    # -- one cycle ---------------------------------------------------------------------------

    def run(
        self, namespace: str, name: str, *, trigger: str, poll: bool = False, known: Known | None = None
    ) -> None:
        """One cycle; an API error is logged and retried by the loop (never raised into kopf)."""
        cluster = self.cluster
        if cluster is None:
            return
        with self._lock(namespace, name):
            try:
                outcome = reconcile(
                    cluster,
                    namespace,
                    name,
                    settings=self.settings,
                    now=datetime.datetime.now(datetime.UTC),
                    progress=self.progress if poll else None,
                    trigger=trigger,
                    known=known or ReadEverything(),
                )
            except ApiError as exc:
                log.warning("%s/%s: %s; retrying in %.0fs", namespace, name, exc, RETRY_SECONDS)
                self._failed(namespace, name, poll)
                return
            except Exception:
                metrics.ERRORS.labels(kind="unexpected").inc()
                log.exception("%s/%s: reconcile failed; retrying in %.0fs", namespace, name, RETRY_SECONDS)
                self._failed(namespace, name, poll)
                return
        if outcome.gone:
            self._forget(namespace, name)
            return
        if outcome.object is not None:
            self._cache[(namespace, name)] = slim(outcome.object)
        self.schedule.reconciled(
            namespace, name, ok=True, status=outcome.status, now=time.monotonic(), polled=poll
        )

    def _failed(self, namespace: str, name: str, poll: bool) -> None:
        self.schedule.reconciled(namespace, name, ok=False, status=None, now=time.monotonic(), polled=poll)

    def _run_loop(self, stop: threading.Event) -> None:
        """Poll running jobs and retry failed cycles, one at a time."""
        while not stop.wait(LOOP_TICK_SECONDS):
            for namespace, name, poll in self.schedule.due(time.monotonic()):
                if stop.is_set():
                    return
                self.run(namespace, name, trigger="timer" if poll else "retry", poll=poll)

    @contextmanager
    def _lock(self, namespace: str, name: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
            yield

    def _forget(self, namespace: str, name: str) -> None:
        """Drop everything kept for a FineTuneJob that is gone."""
        self.schedule.forget(namespace, name)
        self._cache.pop((namespace, name), None)
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
