"""Dead letters: deliveries that failed for good (after their destination's max_attempts, or
cancelled). Listed with the error and ids only (no patient data); retried one by one or all at
once (per destination), audited with the errors they had."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from dicom_ai_node.deliver.outbox import dead_letters
from dicom_ai_node.web import actions
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, Message, PageNumber, RowId, http_errors
from dicom_ai_node.web.api.destinations import NAME_PATTERN
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["jobs and deliveries"], responses=ERRORS)

Destination = Annotated[str | None, Query(pattern=NAME_PATTERN)]


@router.get("/dead-letters", summary="Deliveries that failed for good, newest first")
def list_dead_letters(ctx: Context, _user: User, destination: Destination = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100, page: PageNumber = 0) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return dead_letters(session, destination, limit, page * limit)


@router.post("/dead-letters/retry", responses=ADMIN_ERRORS,
             summary="Retry every dead letter (of one destination when named); audited")
def retry_all(ctx: Context, user: Admin, destination: Destination = None) -> Message:
    with ctx.database.session() as session:
        count = actions.retry_dead_letters(session, user.name, destination)
    ctx.kick_outbox()
    return Message(message=f"{count} deliveries queued again")


@router.post("/dead-letters/{delivery_id}/retry", responses=ADMIN_ERRORS,
             summary="Retry one dead letter: pending again, attempts reset; audited")
def retry_one(ctx: Context, user: Admin, delivery_id: RowId) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.retry_dead_letter(session, delivery_id, user.name)
    ctx.kick_outbox()
    return Message(message=f"delivery {delivery_id} queued again")
