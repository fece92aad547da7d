"""Changes an admin makes to jobs, deliveries, models and destinations. Shared by the API and
the pages; each one is audited in the same transaction as the change."""

from __future__ import annotations

from contextlib import contextmanager
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.models import Delivery, DestinationRow, DisabledModel, Job, JobState, utcnow
from dicom_ai_node.deliver import destinations, dicomweb, dimse
from dicom_ai_node.deliver.destinations import EDITABLE, to_config
from dicom_ai_node.deliver.outbox import resend_deliveries
from dicom_ai_node.jobs import review
from dicom_ai_node.web.context import WebContext


class Refused(ValueError):
    """The change does not make sense in the current state (HTTP 409); the message says why."""


class NotFound(LookupError):
    pass


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def retry_job(session: Session, job_id: int, actor: str) -> str:
    """A failed job runs again. One whose results exist (delivery failed) only resends them:
    running it again would write the very same objects. A retracted job runs again (with new
    UIDs: jobs/retraction.py)."""
    job = _job(session, job_id)
    if job.state not in (JobState.failed, JobState.retracted):
        raise Refused(f"job {job_id} is {job.state.value}; only failed jobs can be retried (and retracted ones)")
    # a "no result" notice is not a result: a job that only sent one runs again
    if job.state == JobState.failed and any(result.retraction_id is None and result.kind != "notice"
                                            for result in job.results):
        resend_deliveries(session, actor, job_id=job_id)
        return "resend"
    job.state, job.reason, job.attempts, job.finished_at = JobState.queued, None, 0, None
    job.failed_step = None
    audit.record(session, actor, "jobs.retry", f"job {job_id}", model=job.model_name)
    return "run"


def cancel_job(session: Session, job_id: int, actor: str) -> None:
    """A queued job is not run; a delivering job stops sending. A running job finishes first."""
    job = _job(session, job_id)
    reason = f"cancelled by {actor}"
    if job.state == JobState.delivering:
        for result in job.results:
            for delivery in result.deliveries:
                if delivery.state == "pending":
                    delivery.state, delivery.last_error = "failed", reason
    elif job.state != JobState.queued:
        raise Refused(f"job {job_id} is {job.state.value}; only queued or delivering jobs can be cancelled")
    job.state, job.reason, job.finished_at = JobState.failed, reason, utcnow()
    audit.record(session, actor, "jobs.cancel", f"job {job_id}")


def release_job(session: Session, job_id: int, actor: str, comment: str | None) -> int:
    """Held results go out after all (jobs/review.py); returns the deliveries queued."""
    with _review_refusals():
        return review.release(session, job_id, actor, comment)


def reject_job(session: Session, job_id: int, actor: str, comment: str | None) -> None:
    """Held results are never sent (jobs/review.py)."""
    with _review_refusals():
        review.reject(session, job_id, actor, comment)


@contextmanager
def _review_refusals():
    try:
        yield
    except LookupError as error:
        raise NotFound(str(error)) from None
    except ValueError as error:  # not held (any more), or a comment too long
        raise Refused(str(error)) from None


def resend_delivery(session: Session, delivery_id: int, actor: str) -> None:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no delivery {delivery_id}")
    if delivery.state == "pending":
        raise Refused(f"delivery {delivery_id} is pending already")
    resend_deliveries(session, actor, delivery_ids=[delivery_id])


def set_model_enabled(ctx: WebContext, session: Session, name: str, enabled: bool, actor: str) -> None:
    if name not in ctx.models.manifests:
        raise NotFound(f"no model {name!r} installed")
    row = session.get(DisabledModel, name)
    if enabled and row is not None:
        session.delete(row)
    elif not enabled and row is None:
        session.add(DisabledModel(name=name, disabled_by=actor))
    else:
        return  # already so: nothing changed, nothing to audit
    audit.record(session, actor, "models.enable" if enabled else "models.disable", name)


def disabled_models(session: Session) -> set[str]:
    return set(session.scalars(select(DisabledModel.name)))


def save_destination(session: Session, name: str, values: dict, actor: str, create: bool) -> DestinationRow:
    row = session.get(DestinationRow, name)
    if create and row is not None:
        raise Refused(f"destination {name!r} exists already")
    if not create and row is None:
        raise NotFound(f"no destination {name!r}")
    if row is None:
        row = DestinationRow(name=name)
        session.add(row)
    elif row.auth not in (None, "none") and _origin(values.get("url")) != _origin(row.url):
        # config.toml's credentials go only where config.toml sends them: a page edit (or a
        # stolen admin session) must not redirect them to another server
        raise Refused(f"destination {name!r} logs in with credentials from config.toml; change where "
                      "it sends them (its url, or its kind) in config.toml, not on the page")
    before = {key: getattr(row, key) for key in EDITABLE}
    for key in EDITABLE:
        setattr(row, key, values[key])
    row.updated_at = utcnow()
    changes = {key: [before[key], values[key]] for key in EDITABLE if before[key] != values[key]}
    audit.record(session, actor, "destinations.create" if create else "destinations.update", name,
                 changes=changes)
    return row


def _origin(url: str | None) -> tuple | None:
    if not url:
        return None
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def delete_destination(ctx: WebContext, session: Session, name: str, actor: str) -> None:
    row = session.get(DestinationRow, name)
    if row is None:
        raise NotFound(f"no destination {name!r}")
    _version, rule_set = ctx.rules.active(session)
    users = [rule.name for rule in rule_set.rules if name in rule.destinations]
    if users:
        raise Refused(f"destination {name!r} is used by rule(s) {', '.join(users)}; change the rules first")
    session.delete(row)
    audit.record(session, actor, "destinations.delete", name)


def echo_destination(ctx: WebContext, name: str, actor: str) -> tuple[bool, str]:
    """C-ECHO (dimse) or QIDO-RS (dicomweb) the destination now (at most 10 s); the attempt is
    audited with its outcome."""
    with ctx.database.session() as session:
        row = session.get(DestinationRow, name)
        if row is None:
            raise NotFound(f"no destination {name!r}")
        destination = to_config(row)
    if destination.timeout_s > 10:
        from dataclasses import replace

        destination = replace(destination, timeout_s=10.0)
    try:
        if destination.kind == "dicomweb":
            ok, message = dicomweb.check(destination)
        else:
            ok, message = dimse.echo(destination, ctx.config.node.ae_title)
    except Exception as error:  # TLS files missing, name resolution, ...: say so, don't 500
        ok, message = False, f"{type(error).__name__}: {error}"
    with ctx.database.session() as session:
        audit.record(session, actor, "destinations.echo", name, ok=ok, message=message)
    return ok, message


# ---- pause a destination, retry dead letters (deliveries that failed for good)


def pause_destination(session: Session, name: str, actor: str) -> int:
    """Deliveries to ``name`` stay pending until it is resumed; returns how many wait."""
    with _pause_refusals():
        return destinations.pause(session, name, actor)


def resume_destination(session: Session, name: str, actor: str) -> int:
    """Deliver to ``name`` again; returns how many deliveries wait for it."""
    with _pause_refusals():
        return destinations.resume(session, name, actor)


@contextmanager
def _pause_refusals():
    try:
        yield
    except LookupError as error:
        raise NotFound(str(error)) from None
    except destinations.NotPaused as error:
        raise Refused(str(error)) from None


def retry_dead_letter(session: Session, delivery_id: int, actor: str) -> None:
    """A delivery that failed for good is pending again, attempts reset (its error kept in the audit)."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no delivery {delivery_id}")
    if delivery.state != "failed":
        raise Refused(f"delivery {delivery_id} is {delivery.state}; only failed deliveries can be retried")
    resend_deliveries(session, actor, delivery_ids=[delivery_id])


def retry_dead_letters(session: Session, actor: str, destination: str | None = None) -> int:
    """Every delivery that failed for good (to ``destination`` when named) is pending again."""
    return resend_deliveries(session, actor, failed=True, destination=destination)
