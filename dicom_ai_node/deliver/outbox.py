"""The outbox: pending deliveries are sent when due, retried with exponential backoff, and
marked failed (with the reason) after a destination's max_attempts: a dead letter, listed for
admins until they retry it. Deliveries to a paused destination are simply not due: they stay
pending, unattempted, and go out when it is resumed (deliver/destinations.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update

from dicom_ai_node import audit
from dicom_ai_node.config import Config, DestinationConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, DestinationRow, Job, JobState, ResultObject, as_utc, utcnow
from dicom_ai_node.deliver import dicomweb, dimse
from dicom_ai_node.notify import ignore
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

BATCH = 200  # objects per association; a 400-slice derived series goes in two
UNKNOWN_TIMEOUT_S = 30.0  # the lease step for rows to a destination that is not configured
MAX_AUDITED_ERRORS = 100  # a bulk retry keeps this many of the errors it clears in its audit event

# the sender of each destination kind: (destination, calling AE, paths) -> one SendResult per path
SENDERS = {"dimse": dimse.send_files, "dicomweb": dicomweb.send_files}

# a delivery whose destination an admin paused: never due, whatever its next_attempt_at
PAUSED = exists().where(DestinationRow.name == Delivery.destination, DestinationRow.paused_at.is_not(None))


class Outbox:
    def __init__(self, config: Config, database: Database, storage: Storage,
                 lookup: Callable[[str], DestinationConfig] | None = None, notify: Callable[..., None] = ignore):
        self.config = config
        self.notify = notify  # Notifier.emit: "delivery_failed" when deliveries give up
        self.database = database
        self.storage = storage
        # where destinations are looked up (KeyError when unknown): the node passes the
        # database's DestinationStore.get so edits on the admin page apply at the next send
        self.lookup = lookup or config.destination
        self._lock = threading.Lock()

    def process_due(self) -> int:
        """Send every due delivery; returns how many were attempted. Safe to call any time,
        from any number of threads and node processes: each row is claimed by one of them."""
        # Not needed for correctness (the claim is), but it keeps this process at one run, so
        # one association per destination at a time, however often the outbox is kicked.
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

    def claim(self, destination_name: str, timeout_s: float) -> list[tuple[int, str]]:
        """Take up to BATCH due deliveries to one destination for this sender: (id, result path).

        A claim leases the rows: one conditional UPDATE moves their next_attempt_at past the
        longest the send may take (every step of it waits at most ``timeout_s``), so no other
        sender, thread or process finds them due meanwhile; recording the outcome replaces the
        lease, and a sender that died leaves rows that are due again when the lease ends. On
        PostgreSQL the rows are picked FOR UPDATE SKIP LOCKED (concurrent claimers take
        different rows, and one that waited re-checks the row); SQLite runs one writer at a time.
        Nothing is due for a paused destination (a batch claimed before the pause still goes)."""
        now = utcnow()
        due = (select(Delivery.id)
               .where(Delivery.state == "pending", Delivery.destination == destination_name,
                      Delivery.next_attempt_at <= now, ~PAUSED)
               .order_by(Delivery.id).limit(BATCH).with_for_update(skip_locked=True))
        with self.database.session() as session:
            ids = session.scalars(
                update(Delivery).where(Delivery.id.in_(due), Delivery.state == "pending",
                                       Delivery.next_attempt_at <= now)
                .values(next_attempt_at=now + timedelta(seconds=timeout_s * (BATCH + 2)))
                .returning(Delivery.id).execution_options(synchronize_session=False)).all()
            if not ids:
                return []
            # the same transaction: shorten the lease to what this batch may take
            session.execute(update(Delivery).where(Delivery.id.in_(ids))
                            .values(next_attempt_at=now + timedelta(seconds=timeout_s * (len(ids) + 2)))
                            .execution_options(synchronize_session=False))
            return [tuple(row) for row in session.execute(
                select(Delivery.id, ResultObject.path).join(ResultObject, ResultObject.id == Delivery.result_id)
                .where(Delivery.id.in_(ids)).order_by(Delivery.id))]

    def _send_batch(self, destination_name: str) -> int:
        try:
            destination = self.lookup(destination_name)
        except KeyError:
            destination = None
        due = self.claim(destination_name, destination.timeout_s if destination else UNKNOWN_TIMEOUT_S)
        if not due:
            return 0
        if destination is None:
            outcomes = {delivery_id: (False, f"destination {destination_name!r} is not configured")
                        for delivery_id, _ in due}
        else:
            paths = [self.storage.absolute(path) for _, path in due]
            try:
                results = SENDERS[destination.kind](destination, self.config.node.ae_title, paths)
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
        job_ids, given_up = set(), []
        with self.database.session() as session:
            for delivery_id, (ok, message) in outcomes.items():
                delivery = session.get(Delivery, delivery_id)
                delivery.attempts += 1
                if ok:
                    delivery.state, delivery.sent_at, delivery.last_error = "sent", now, None
                elif delivery.attempts >= max_attempts:
                    delivery.state, delivery.last_error, delivery.failed_at = "failed", message, now
                    given_up.append(delivery.id)
                else:
                    delivery.last_error = message
                    delivery.next_attempt_at = now + timedelta(
                        seconds=backoff_s * 2 ** (delivery.attempts - 1))
                job_ids.add(delivery.result.job_id)
            failures = [m for ok, m in outcomes.values() if not ok]
            if failures:
                log.warning("%d of %d objects not delivered to %s: %s", len(failures),
                            len(outcomes), destination_name, failures[0])
            # the job row locked (in id order: no deadlock) before its deliveries are read, so
            # two processes recording the last deliveries of one job cannot both see the
            # other's still pending and leave it delivering
            for job_id in sorted(job_ids):
                update_job_after_delivery(session, session.get(Job, job_id, with_for_update=True))
        if given_up:
            self.notify("delivery_failed", destination=destination_name, deliveries=len(given_up),
                        delivery_ids=given_up[:20], job_ids=sorted(job_ids)[:20], error=outcomes[given_up[0]][1])


def queue_deliveries(result: ResultObject, destinations: list[str]) -> None:
    """The outbox rows that send ``result`` to each destination, pending from now."""
    for destination in destinations:
        result.deliveries.append(Delivery(destination=destination))


def resend_deliveries(session, actor: str, *, job_id: int | None = None, study_uid: str | None = None,
                      delivery_ids: list[int] | None = None, failed: bool = False,
                      destination: str | None = None) -> int:
    """Put deliveries back to pending with their attempts reset (every one of a job, of a study,
    the listed ones, or every failed one, of one destination when named) and their jobs back
    to delivering; audited with the errors they had. Returns how many were queued."""
    query = (select(Delivery.id).join(ResultObject, ResultObject.id == Delivery.result_id)
             .where(ResultObject.retraction_id.is_(None)))  # retracted results are never sent again
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
    if destination is not None:
        query, target = query.where(Delivery.destination == destination), f"{target} to {destination}"
    ids = list(session.scalars(query))
    if not ids:
        return 0
    # the failures being cleared, for the audit log: [delivery id, destination, attempts, error]
    errors = [list(row) for row in session.execute(
        select(Delivery.id, Delivery.destination, Delivery.attempts, Delivery.last_error)
        .where(Delivery.id.in_(ids), Delivery.state == "failed").order_by(Delivery.id)
        .limit(MAX_AUDITED_ERRORS))]
    session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
        state="pending", attempts=0, next_attempt_at=utcnow(), last_error=None, failed_at=None))
    job_ids = select(ResultObject.job_id).join(Delivery, Delivery.result_id == ResultObject.id) \
        .where(Delivery.id.in_(ids))
    # a job that ended without a result (its "no result" notice resent) keeps its state and reason
    session.execute(update(Job).where(Job.id.in_(job_ids), Job.failed_step.is_(None),
                                      Job.state != JobState.dropped).values(
        state=JobState.delivering, reason=None, finished_at=None))
    audit.record(session, actor, "deliveries.resend", target, deliveries=len(ids), failures=errors)
    return len(ids)


def dead_letters(session, destination: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
    """Deliveries that failed for good, newest first: ids, UIDs and the error, no patient data."""
    query = (select(Delivery, ResultObject, Job.study_instance_uid)
             .join(ResultObject, ResultObject.id == Delivery.result_id).join(Job, Job.id == ResultObject.job_id)
             .where(Delivery.state == "failed").order_by(Delivery.id.desc()).limit(limit).offset(offset))
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    return [{"id": delivery.id, "destination": delivery.destination, "job_id": result.job_id,
             "study_instance_uid": study_uid, "kind": result.kind, "sop_instance_uid": result.sop_instance_uid,
             "attempts": delivery.attempts, "error": delivery.last_error, "failed_at": delivery.failed_at}
            for delivery, result, study_uid in session.execute(query)]


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
