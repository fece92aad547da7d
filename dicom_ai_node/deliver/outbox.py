"""The outbox: pending deliveries are sent when due, retried with exponential backoff, and
marked failed (with the reason) after a destination's max_attempts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update

from dicom_ai_node import audit
from dicom_ai_node.config import Config, DestinationConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, Job, JobState, ResultObject, as_utc, utcnow
from dicom_ai_node.deliver.dimse import send_files
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

BATCH = 200  # objects per association; a 400-slice derived series goes in two


class Outbox:
    def __init__(self, config: Config, database: Database, storage: Storage,
                 lookup: Callable[[str], DestinationConfig] | None = None):
        self.config = config
        self.database = database
        self.storage = storage
        # where destinations are looked up (KeyError when unknown): the node passes the
        # database's DestinationStore.get so edits on the admin page apply at the next send
        self.lookup = lookup or config.destination
        self._lock = threading.Lock()

    def process_due(self) -> int:
        """Send every due delivery; returns how many were attempted. Safe to call any time."""
        if not self._lock.acquire(blocking=False):
            return 0  # a run is already in progress
        try:
            attempted = 0
            for destination_name in self._due_destinations():
                attempted += self._send_batch(destination_name)
            return attempted
        finally:
            self._lock.release()

    def _due_destinations(self) -> list[str]:
        with self.database.session() as session:
            return list(session.scalars(select(Delivery.destination).distinct()
                                        .where(Delivery.state == "pending",
                                               Delivery.next_attempt_at <= utcnow())))

    def _send_batch(self, destination_name: str) -> int:
        with self.database.session() as session:
            due = session.execute(
                select(Delivery.id, ResultObject.path)
                .join(ResultObject, ResultObject.id == Delivery.result_id)
                .where(Delivery.state == "pending", Delivery.destination == destination_name,
                       Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.id).limit(BATCH)).all()
        if not due:
            return 0
        try:
            destination = self.lookup(destination_name)
        except KeyError:
            outcomes = {delivery_id: (False, f"destination {destination_name!r} is not configured")
                        for delivery_id, _ in due}
        else:
            paths = [self.storage.absolute(path) for _, path in due]
            try:
                results = send_files(destination, self.config.node.ae_title, paths)
                outcomes = {delivery_id: (result.ok, result.message)
                            for (delivery_id, _), result in zip(due, results)}
            except Exception as error:  # unreadable file, network error: retry like a refusal
                log.exception("delivery to %s failed", destination_name)
                outcomes = {delivery_id: (False, f"{type(error).__name__}: {error}")
                            for delivery_id, _ in due}
        self._record(destination_name, outcomes)
        return len(due)

    def _record(self, destination_name: str, outcomes: dict[int, tuple[bool, str]]) -> None:
        try:
            destination = self.lookup(destination_name)
            max_attempts, backoff_s = destination.max_attempts, destination.backoff_s
        except KeyError:
            max_attempts, backoff_s = 1, 0.0
        now = utcnow()
        job_ids = set()
        with self.database.session() as session:
            for delivery_id, (ok, message) in outcomes.items():
                delivery = session.get(Delivery, delivery_id)
                delivery.attempts += 1
                if ok:
                    delivery.state, delivery.sent_at, delivery.last_error = "sent", now, None
                elif delivery.attempts >= max_attempts:
                    delivery.state, delivery.last_error = "failed", message
                else:
                    delivery.last_error = message
                    delivery.next_attempt_at = now + timedelta(
                        seconds=backoff_s * 2 ** (delivery.attempts - 1))
                job_ids.add(delivery.result.job_id)
            failures = [m for ok, m in outcomes.values() if not ok]
            if failures:
                log.warning("%d of %d objects not delivered to %s: %s", len(failures),
                            len(outcomes), destination_name, failures[0])
            for job_id in job_ids:
                update_job_after_delivery(session, session.get(Job, job_id))


def queue_deliveries(result: ResultObject, destinations: list[str]) -> None:
    """The outbox rows that send ``result`` to each destination, pending from now."""
    for destination in destinations:
        result.deliveries.append(Delivery(destination=destination))


def resend_deliveries(session, actor: str, *, job_id: int | None = None, study_uid: str | None = None,
                      delivery_ids: list[int] | None = None, failed: bool = False) -> int:
    """Put deliveries back to pending (every one of a job, of a study, the listed ones, or every
    failed one) and their jobs back to delivering; audited. Returns how many were queued."""
    query = select(Delivery.id).join(ResultObject, ResultObject.id == Delivery.result_id)
    if job_id is not None:
        query, target = query.where(ResultObject.job_id == job_id), f"job {job_id}"
    elif study_uid is not None:
        query = query.join(Job, Job.id == ResultObject.job_id).where(Job.study_instance_uid == study_uid)
        target = f"study {study_uid}"
    elif delivery_ids is not None:
        query = query.where(Delivery.id.in_(delivery_ids))
        target = "delivery " + ", ".join(map(str, delivery_ids))
    elif failed:
        query, target = query.where(Delivery.state == "failed"), "all failed deliveries"
    else:
        raise ValueError("say which deliveries to resend")
    ids = list(session.scalars(query))
    if not ids:
        return 0
    session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
        state="pending", attempts=0, next_attempt_at=utcnow(), last_error=None))
    job_ids = select(ResultObject.job_id).join(Delivery, Delivery.result_id == ResultObject.id) \
        .where(Delivery.id.in_(ids))
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(
        state=JobState.delivering, reason=None, finished_at=None))
    audit.record(session, actor, "deliveries.resend", target, deliveries=len(ids))
    return len(ids)


def update_job_after_delivery(session, job: Job) -> None:
    """A delivering job is done when every delivery is sent, failed when one gave up."""
    if job.state != JobState.delivering:
        return
    states = [d.state for result in job.results for d in result.deliveries]
    if "pending" in states:
        return
    job.finished_at = utcnow()
    started = job.timings.get("delivery_started_at")
    timings = dict(job.timings)
    if started:
        timings["delivery_s"] = round((job.finished_at - as_utc(datetime.fromisoformat(started)))
                                      .total_seconds(), 3)
    job.timings = timings
    failed = [d for result in job.results for d in result.deliveries if d.state == "failed"]
    if failed:
        job.state = JobState.failed
        job.reason = (f"{len(failed)} result object(s) not delivered to "
                      f"{', '.join(sorted({d.destination for d in failed}))}: {failed[0].last_error}")
    else:
        job.state = JobState.done
        job.reason = None
