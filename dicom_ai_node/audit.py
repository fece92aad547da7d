"""The audit log: who changed what, when. Every change an admin makes goes through here."""

from __future__ import annotations

from sqlalchemy.orm import Session

from dicom_ai_node.db.models import AuditEvent


def record(session: Session, actor: str, action: str, target: str | None = None, **detail) -> None:
    """Add an audit event to the caller's transaction (it commits with the change itself)."""
    session.add(AuditEvent(actor=actor, action=action, target=target, detail=detail))
