"""The outbox: pending deliveries are sent when due, retried with exponential backoff, and
marked failed (with the reason) after a destination's max_attempts."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from dicom_ai_node.config import Config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, Job, JobState, ResultObject, utcnow
from dicom_ai_node.deliver.dimse import send_files
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

BATCH = 200  # objects per association; a 400-slice derived series goes in two


class Outbox:
    def __init__(self, config: Config, database: Database, storage: Storage):
        self.config = config
        self.database = database
        self.storage = storage
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
            destination = self.config.destination(destination_name)
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
            destination = self.config.destination(destination_name)
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
        timings["delivery_s"] = round((job.finished_at - _aware(datetime.fromisoformat(started)))
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


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
