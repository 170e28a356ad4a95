"""The operator's `Controller` (what the kopf handlers call) against the in-memory fake cluster:
which trigger reads what, the FineTuneJob cache, and that API errors are retried, not raised.

kopf is imported (the controller module tunes it at start-up) but never run.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from finetune_operator.controller import RETRY_SECONDS, Controller
from tests.operator.factories import SETTINGS, ftj
from tests.operator.fake import FakeCluster


def controller_on(fake: FakeCluster) -> Controller:
    controller = Controller(SETTINGS)
    controller.cluster = fake
    return controller


def added(controller: Controller, fake: FakeCluster) -> None:
    """The ADDED event of a new FineTuneJob, as the API server stored it."""
    obj = ftj()
    fake.put_finetunejob(obj)
    controller.on_finetunejob_event("ADDED", obj, "team-a", "demo")


def batch_job(fake: FakeCluster) -> dict[str, Any]:
    return copy.deepcopy(fake.objects[("Job", "team-a", "demo")])


def test_a_new_job_is_created_from_its_event_without_reading_it(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    added(controller, fake)
    assert ("get", "FineTuneJob") not in fake.calls
    assert {kind for kind, _ in fake.children()} == {"ConfigMap", "Job", "Service"}
    assert fake.finetunejob()["status"]["phase"] == "Pending"


def test_a_batch_job_event_refreshes_the_status_from_the_cached_finetunejob(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    added(controller, fake)
    job = batch_job(fake)
    job["status"] = {"active": 1}
    fake.calls.clear()
    controller.on_batch_job_event("MODIFIED", job)
    assert ("get", "FineTuneJob") not in fake.calls, "the cached FineTuneJob is used"
    assert ("create", "Job") not in fake.calls and ("get", "Job") not in fake.calls
    assert ("list", "Pod") in fake.calls


def test_a_deleted_batch_job_gets_a_full_cycle(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    added(controller, fake)
    job = fake.objects.pop(("Job", "team-a", "demo"))
    fake.calls.clear()
    controller.on_batch_job_event("DELETED", job)
    assert fake.calls[0] == ("get", "FineTuneJob")
    assert ("Job", "demo") in fake.children(), "the Job is created again"


def test_events_of_jobs_it_does_not_own_and_its_own_creates_do_nothing(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    added(controller, fake)
    foreign = batch_job(fake)
    foreign["metadata"]["ownerReferences"] = []
    fake.calls.clear()
    controller.on_batch_job_event("MODIFIED", foreign)
    controller.on_batch_job_event("ADDED", batch_job(fake))
    assert fake.calls == []


def test_an_api_error_is_retried_by_the_loop_not_raised(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    obj = ftj()
    fake.put_finetunejob(obj)
    fake.fail_on = ("get", "FineTuneJob")
    controller.on_finetunejob_event(None, obj, "team-a", "demo")  # the initial listing: resume
    now = time.monotonic()
    assert controller.schedule.due(now) == []
    assert controller.schedule.due(now + RETRY_SECONDS + 1) == [("team-a", "demo", False)]


def test_a_deleted_finetunejob_is_forgotten(fake: FakeCluster) -> None:
    controller = controller_on(fake)
    added(controller, fake)
    assert len(controller.schedule) == 1
    controller.on_finetunejob_event("DELETED", fake.finetunejob(), "team-a", "demo")
    assert len(controller.schedule) == 0
    job = batch_job(fake)
    job["status"] = {"active": 1}
    fake.calls.clear()
    controller.on_batch_job_event("MODIFIED", job)
    assert fake.calls[0] == ("get", "FineTuneJob"), "no cached copy is left to use"
