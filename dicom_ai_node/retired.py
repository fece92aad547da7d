"""Counts of rows that retention deleted, kept so /metrics counters never go down.

/metrics counts from the rows (web/metrics.py): instances received, studies completed, QC
checks, delivery failures. Retention deletes old rows; in the same transaction it adds what it
deleted here (``add``), and a counter is the rows still here plus ``total``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from dicom_ai_node.db.models import RetiredCount

INSTANCES_RECEIVED = "instances_received"
RECEIVED_BYTES = "received_bytes"
STUDIES_COMPLETED = "studies_completed"
QC_CHECKS = "qc_checks"  # labels "model|pass" or "model|fail"
DELIVERY_FAILURES = "delivery_failures"


def add(session: Session, name: str, amount: int, labels: str = "") -> None:
    """Add ``amount`` to a count (in the caller's transaction, beside the delete it counts)."""
    if amount <= 0:
        return
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(RetiredCount).values(name=name, labels=labels, value=amount)
    session.execute(statement.on_conflict_do_update(
        index_elements=[RetiredCount.name, RetiredCount.labels],
        set_={"value": RetiredCount.value + statement.excluded.value}))


def totals(session: Session) -> dict[tuple[str, str], int]:
    """(name, labels) -> what was deleted so far."""
    return {(name, labels): value for name, labels, value in
            session.execute(select(RetiredCount.name, RetiredCount.labels, RetiredCount.value))}
