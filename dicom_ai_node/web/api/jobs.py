"""Jobs (retry, cancel, release or reject held results) and deliveries (resend)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from dicom_ai_node.db.models import Delivery, Job, JobState, ResultObject
from dicom_ai_node.inspect import quality_checks_json
from dicom_ai_node.jobs.review import MAX_COMMENT
from dicom_ai_node.web import actions
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, Message, http_errors
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["jobs and deliveries"], responses=ERRORS)

JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def job_json(job: Job) -> dict[str, Any]:
    return {"id": job.id, "study_instance_uid": job.study_instance_uid,
            "series_instance_uid": job.series_instance_uid, "model": job.model_name,
            "model_version": job.model_version, "rule": job.rule_name, "state": job.state.value,
            "reason": job.reason, "failed_step": job.failed_step, "input_notes": job.input_notes or [],
            "attempts": job.attempts, "timings": job.timings,
            "destinations": job.destinations, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at,
            "qc_policy": job.qc_policy, "quality_checks": quality_checks_json(job.quality_checks)}


class Review(BaseModel):
    comment: str | None = Field(default=None, max_length=MAX_COMMENT, description="why (kept in the audit log)")


@router.get("/jobs", summary="Jobs, newest first (state=held: results waiting for review)")
def list_jobs(ctx: Context, _user: User, state: JobState | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        return [job_json(job) for job in session.scalars(query)]


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job"}})
def get_job(ctx: Context, _user: User, job_id: JobId) -> dict[str, Any]:
    with ctx.database.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_json(job)


@router.post("/jobs/{job_id}/retry", responses=ADMIN_ERRORS, summary="Run a failed job again "
             "(or, when its results exist, send them again)")
def retry_job(ctx: Context, user: Admin, job_id: JobId) -> Message:
    with http_errors(), ctx.database.session() as session:
        how = actions.retry_job(session, job_id, user.name)
    if how == "run":
        ctx.submit_job(job_id)
        return Message(message=f"job {job_id} queued again")
    ctx.kick_outbox()
    return Message(message=f"job {job_id}: results queued for delivery again")


@router.post("/jobs/{job_id}/cancel", responses=ADMIN_ERRORS, summary="Cancel a queued or delivering job")
def cancel_job(ctx: Context, user: Admin, job_id: JobId) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.cancel_job(session, job_id, user.name)
    return Message(message=f"job {job_id} cancelled")


@router.post("/jobs/{job_id}/release", responses=ADMIN_ERRORS, summary="Send held results after all "
             "(they failed their quality checks under policy hold); audited")
def release_job(ctx: Context, user: Admin, job_id: JobId, review: Review | None = None) -> Message:
    with http_errors(), ctx.database.session() as session:
        queued = actions.release_job(session, job_id, user.name, review.comment if review else None)
    ctx.kick_outbox()
    return Message(message=f"job {job_id} released: {queued} deliveries queued")


@router.post("/jobs/{job_id}/reject", responses=ADMIN_ERRORS, summary="Never send held results; audited")
def reject_job(ctx: Context, user: Admin, job_id: JobId, review: Review | None = None) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.reject_job(session, job_id, user.name, review.comment if review else None)
    return Message(message=f"job {job_id} rejected: its results are never sent")


@router.get("/deliveries", summary="Deliveries (outbox rows), newest first")
def list_deliveries(ctx: Context, _user: User, state: Literal["pending", "sent", "failed"] | None = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        query = (select(Delivery, ResultObject).join(ResultObject, ResultObject.id == Delivery.result_id)
                 .order_by(Delivery.id.desc()).limit(limit))
        if state is not None:
            query = query.where(Delivery.state == state)
        return [{"id": d.id, "job_id": r.job_id, "kind": r.kind, "sop_instance_uid": r.sop_instance_uid,
                 "destination": d.destination, "state": d.state, "attempts": d.attempts,
                 "last_error": d.last_error, "sent_at": d.sent_at} for d, r in session.execute(query)]


@router.post("/deliveries/{delivery_id}/resend", responses=ADMIN_ERRORS, summary="Send a delivery again")
def resend_delivery(ctx: Context, user: Admin,
                    delivery_id: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.resend_delivery(session, delivery_id, user.name)
    ctx.kick_outbox()
    return Message(message=f"delivery {delivery_id} queued again")
