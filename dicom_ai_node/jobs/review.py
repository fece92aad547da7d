"""Held results: a job in `held` made results that failed their quality checks under policy
"hold"; they are stored but nothing was queued. An admin releases them (their deliveries are
queued as usual) or rejects them (nothing is ever sent; the job finishes `rejected`). Both are
audited with who, when and the optional comment. Shared by the admin page, the API and the CLI.

The state change is one conditional UPDATE (only a `held` job changes), issued first in the
transaction: releasing twice, a release racing a reject, or the router superseding the job
meanwhile, changes the job once and refuses the others.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.models import AuditEvent, Job, JobState, QualityCheck, utcnow
from dicom_ai_node.deliver.outbox import queue_deliveries

MAX_COMMENT = 1000
RELEASE, REJECT = "jobs.release", "jobs.reject"  # the audit log's actions


class NotHeld(ValueError):
    """The job is not (or no longer) held; the message says what it is."""


def release(session: Session, job_id: int, actor: str, comment: str | None = None) -> int:
    """Queue the held results for delivery; returns how many deliveries were queued."""
    comment = _comment(comment)
    now = utcnow()
    job = _take_held(session, job_id, "released", state=JobState.delivering, reason=None)
    job.timings = {**job.timings, "delivery_started_at": now.isoformat()}
    for result in job.results:
        queue_deliveries(result, job.destinations)
    if not job.destinations:  # nowhere to send: kept on the node, as for any other job
        job.state, job.finished_at = JobState.done, now
    audit.record(session, actor, RELEASE, f"job {job_id}", comment=comment,
                 model=job.model_name, failed_checks=_failed_checks(session, job_id))
    session.flush()
    return sum(len(result.deliveries) for result in job.results)


def reject(session: Session, job_id: int, actor: str, comment: str | None = None) -> None:
    """Never send the held results; the job finishes `rejected` with who and why."""
    comment = _comment(comment)
    reason = f"rejected by {actor}" + (f": {comment}" if comment else "")
    job = _take_held(session, job_id, "rejected", state=JobState.rejected, reason=reason, finished_at=utcnow())
    audit.record(session, actor, REJECT, f"job {job_id}", comment=comment,
                 model=job.model_name, failed_checks=_failed_checks(session, job_id))


def held_jobs(session: Session) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.state == JobState.held).order_by(Job.id)))


def recent_reviews(session: Session, limit: int = 20) -> list[AuditEvent]:
    """The latest releases and rejections, newest first."""
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action.in_([RELEASE, REJECT]))
                                .order_by(AuditEvent.id.desc()).limit(limit)))


def _comment(comment: str | None) -> str | None:
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise ValueError(f"the comment is longer than {MAX_COMMENT} characters")
    return comment or None


def _take_held(session: Session, job_id: int, done: str, **values) -> Job:
    """Move a held job to another state, or raise LookupError / NotHeld (``done``: "released"...)."""
    changed = session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.held)
                              .values(**values).execution_options(synchronize_session=False))
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if changed.rowcount != 1:
        raise NotHeld(f"job {job_id} is {job.state.value}; only held results can be {done}")
    session.refresh(job)
    return job


def _failed_checks(session: Session, job_id: int) -> list[str]:
    return list(session.scalars(select(QualityCheck.message).where(
        QualityCheck.job_id == job_id, QualityCheck.passed.is_(False)).order_by(QualityCheck.id)))
