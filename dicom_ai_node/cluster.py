"""The node as several processes on one database: who is alive, who leads, whose jobs are orphaned.

Every `serve` process (roles all | receiver | web) and every Celery `worker` registers a
NodeProcess row and renews `last_seen_at` every HEARTBEAT_S. The once-per-node duties
(completion and routing, the outbox, the job sweeps, retention) run only in the process that
holds the leader lease: a row renewed by one conditional UPDATE, taken over by another
process once it has expired. A job's `claimed_by` names the process running it; a job whose
process has not been seen for STALE_AFTER_S is taken back (queued again) by the leader.

Clocks: expiry is compared with each host's own clock, so hosts must keep time (NTP); a skew
well below LEASE_S is harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState, LeaderLease, NodeProcess, utcnow

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0  # a process not seen for this long is taken for dead
LEASE_S = 30.0  # the leader renews every HEARTBEAT_S; another may take over LEASE_S after its last renewal
LEASE_MARGIN_S = 5.0  # stop leading this much before the lease runs out (a slow renewal, clock skew)
DUTIES = "duties"  # the lease's name
ROLES = ("all", "receiver", "web")


def process_name(role: str, port: int | None = None) -> str:
    """Stable across restarts of one process on one host (host/role:port), so a restarted
    process knows which `running` jobs were its own; workers are named by pid."""
    return f"{socket.gethostname()}/{role}:{port if port is not None else os.getpid()}"


class ProcessRecord:
    """This process's NodeProcess row, renewed by ``beat``."""

    def __init__(self, database: Database, name: str, role: str, **details):
        self.database = database
        self.name = name
        self.role = role
        self.details = details  # device, queues, concurrency (workers)

    def beat(self) -> bool:
        """Say "still alive"; False (logged) when the database cannot be reached: the caller
        keeps going and tries again at the next beat."""
        try:
            with self.database.session() as session:
                now = utcnow()
                seen = session.execute(update(NodeProcess).where(NodeProcess.name == self.name)
                                       .values(last_seen_at=now, pid=os.getpid(), **self.details)
                                       .execution_options(synchronize_session=False))
                if seen.rowcount == 0:
                    session.add(NodeProcess(name=self.name, role=self.role, host=socket.gethostname(),
                                            pid=os.getpid(), started_at=now, last_seen_at=now, **self.details))
            return True
        except IntegrityError:  # two starts racing on one name: the other row is as good
            return True
        except SQLAlchemyError as error:
            log.warning("cannot record this process as alive (%s); trying again", _first_line(error))
            return False

    def remove(self) -> None:
        try:
            with self.database.session() as session:
                session.execute(delete(NodeProcess).where(NodeProcess.name == self.name))
        except SQLAlchemyError as error:
            log.warning("could not remove this process's row at stop (%s)", type(error).__name__)


class Leader:
    """The duties lease (a LeaderLease row). ``renew`` takes or keeps it; ``held`` says whether this process may act
    as leader now (measured on this process's monotonic clock from the last good renewal)."""

    def __init__(self, database: Database, holder: str, lease_s: float = LEASE_S):
        self.database = database
        self.holder = holder
        self.lease_s = lease_s
        self._held_until = 0.0  # time.monotonic() deadline

    def renew(self) -> bool:
        started = time.monotonic()
        was_held = self.held()
        try:
            with self.database.session() as session:
                now = utcnow()
                values = {"holder": self.holder, "expires_at": now + timedelta(seconds=self.lease_s)}
                taken = session.execute(
                    update(LeaderLease).where(LeaderLease.name == DUTIES,
                                              or_(LeaderLease.holder == self.holder, LeaderLease.expires_at < now))
                    .values(**values).execution_options(synchronize_session=False)).rowcount == 1
                if not taken and session.get(LeaderLease, DUTIES) is None:
                    session.add(LeaderLease(name=DUTIES, **values))
                    session.flush()
                    taken = True
        except IntegrityError:  # another process created the row first: it leads
            taken = False
        except SQLAlchemyError as error:
            log.warning("cannot renew the leader lease (%s)", _first_line(error))
            taken = False
        self._held_until = started + self.lease_s - LEASE_MARGIN_S if taken else 0.0
        if taken != was_held:
            log.info("this process %s the node's duties (completion, routing, outbox, sweeps)",
                     "now leads" if taken else "no longer leads")
        return taken

    def held(self) -> bool:
        return time.monotonic() < self._held_until

    def release(self) -> None:
        """At a clean stop: let the next process take over at once instead of after LEASE_S."""
        if not self.held():
            return
        self._held_until = 0.0
        try:
            with self.database.session() as session:
                session.execute(update(LeaderLease).where(LeaderLease.name == DUTIES,
                                                          LeaderLease.holder == self.holder)
                                .values(expires_at=utcnow()).execution_options(synchronize_session=False))
        except SQLAlchemyError as error:
            log.warning("could not hand the leader lease back (%s); another process takes it when it expires",
                        type(error).__name__)


def live_processes(session, stale_after_s: float = STALE_AFTER_S) -> list[NodeProcess]:
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    return list(session.scalars(select(NodeProcess).where(NodeProcess.last_seen_at >= cutoff)
                                .order_by(NodeProcess.role, NodeProcess.name)).all())


def take_back_orphaned_jobs(database: Database, own_name: str, at_start: bool,
                            stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Jobs left `running`/`encoding` by a process that is gone go back to `queued`; returns
    them. Gone: not seen for ``stale_after_s``, or (``at_start``) this very process in an
    earlier life, or unknown (claimed before migration 0010). The move is conditional on the
    claimer, and a claimer that comes back late cannot record results over the new attempt
    (JobRunner compares the attempt it claimed)."""
    with database.session() as session:
        alive = {process.name for process in live_processes(session, stale_after_s)}
        if at_start:
            alive.discard(own_name)
        else:
            alive.add(own_name)  # its running jobs are in its own pool right now
        jobs = session.execute(select(Job.id, Job.claimed_by, Job.state).where(
            Job.state.in_([JobState.running, JobState.encoding]))).all()
        taken = []
        for job_id, claimed_by, state in jobs:
            if claimed_by in alive:
                continue
            moved = session.execute(update(Job).where(Job.id == job_id, Job.state == state,
                                                      Job.claimed_by.is_(claimed_by) if claimed_by is None
                                                      else Job.claimed_by == claimed_by)
                                    .values(state=JobState.queued, claimed_by=None)
                                    .execution_options(synchronize_session=False))
            if moved.rowcount == 1:
                log.warning("job %d was %s in %s, which is gone; running it again", job_id, state.value,
                            "an earlier run of this process" if claimed_by == own_name else
                            (claimed_by or "a process of an older version"))
                taken.append(job_id)
    return taken


def queued_jobs(database: Database) -> list[int]:
    with database.session() as session:
        return list(session.scalars(select(Job.id).where(Job.state == JobState.queued).order_by(Job.id)).all())


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
