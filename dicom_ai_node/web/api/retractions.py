"""Retraction of delivered results (jobs/retraction.py): one job, a recalled model version's
results in bulk, and disabling a model as recalled."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from dicom_ai_node.jobs import retraction
from dicom_ai_node.storage import Storage
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, MAX_ROW_ID, Message, PageNumber, RowId
from dicom_ai_node.web.api.models import Name
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["retraction"], responses=ERRORS)


class Reason(BaseModel):
    reason: str = Field(min_length=1, max_length=retraction.MAX_REASON,
                        description="why (written into the rejection note and the audit log)")


class BulkRetraction(Reason):
    job_ids: list[Annotated[int, Field(ge=1, le=MAX_ROW_ID)]] = Field(min_length=1, max_length=retraction.MAX_BULK)


class Recall(BaseModel):
    version: str = Field(min_length=1, max_length=64, description="the model version recalled")


def storage_of(ctx) -> Storage:
    return Storage(ctx.config.node.storage_dir, ctx.config.node.min_free_disk_mb * 2**20)


@router.post("/jobs/{job_id}/retract", responses=ADMIN_ERRORS, summary="Take a job's delivered results back: "
             "a rejection KOS (IHE IOCM) goes to the destinations that have them; audited")
def retract_job(ctx: Context, user: Admin, job_id: RowId, body: Reason) -> dict[str, Any]:
    try:
        with ctx.database.session() as session:
            done = retraction.retract(session, storage_of(ctx), job_id, user.name, body.reason)
            answer = {"retraction": done.id, "kos_sop_instance_uid": done.kos_sop_instance_uid}
    except LookupError as error:
        raise HTTPException(404, str(error)) from None
    except ValueError as error:  # NotRetractable included
        raise HTTPException(409, str(error)) from None
    ctx.kick_outbox()
    return answer


@router.post("/retractions", responses=ADMIN_ERRORS, summary="Retract several jobs' results (a recall); "
             "each job in its own transaction")
def retract_jobs(ctx: Context, user: Admin, body: BulkRetraction) -> dict[str, Any]:
    outcome = retraction.retract_jobs(ctx.database, storage_of(ctx), body.job_ids, user.name, body.reason)
    if outcome.retracted:
        ctx.kick_outbox()
    return {"retracted": outcome.retracted, "refused": {str(k): v for k, v in outcome.refused.items()}}


@router.post("/models/{name}/recall", responses=ADMIN_ERRORS, summary="Disable a model as recalled; its "
             "version's delivered results are listed for retraction")
def recall(ctx: Context, user: Admin, name: Name, body: Recall) -> Message:
    if name not in ctx.models.manifests:
        raise HTTPException(404, f"no model {name!r} installed")
    with ctx.database.session() as session:
        retraction.recall(session, name, body.version, user.name)
    return Message(message=f"model {name} disabled, version {body.version} recalled")


@router.get("/models/{name}/delivered-results", summary="Jobs of a model version with delivered results not "
            "retracted (default: the recalled version), a page of them")
def delivered_results(ctx: Context, _user: User, name: Name, version: Annotated[str | None, Query(max_length=64)] = None,
                      page: PageNumber = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        version = version or retraction.recalls(session).get(name)
        if version is None:
            raise HTTPException(404, f"model {name!r} is not recalled; name a version")
        return retraction.delivered_results_of(session, name, version, limit=limit, offset=page * limit)
