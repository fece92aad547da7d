"""The audit log: who changed what, when."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node.db.models import AuditEvent
from dicom_ai_node.web.api.common import ERRORS
from dicom_ai_node.web.auth import Context, User

router = APIRouter(tags=["audit"], responses=ERRORS)


def audit_events(session: Session, actor: str | None = None, action: str | None = None,
                 limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action.startswith(action, autoescape=True))
    return [{"id": e.id, "at": e.at, "actor": e.actor, "action": e.action, "target": e.target,
             "detail": e.detail} for e in session.scalars(query)]


@router.get("/audit", summary="Audit events, newest first")
def list_audit(ctx: Context, _user: User,
               actor: Annotated[str | None, Query(max_length=64)] = None,
               action: Annotated[str | None, Query(max_length=64, description="prefix, e.g. rules.")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return audit_events(session, actor, action, limit, offset)
