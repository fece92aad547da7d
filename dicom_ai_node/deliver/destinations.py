"""Delivery destinations, stored in the database so admins can edit them without a restart.

config.toml's [[destinations]] seed the table at start: a destination the table lacks is
added, and one whose config entry changed since it was last seeded takes the config's values
(the file was edited after the page, so the file wins). Edits on the page otherwise stay.
A destination deleted on the page but still in config.toml comes back at the next start;
remove it from the file to remove it for good.

An admin may pause a destination (a PACS in maintenance): the outbox then leaves its deliveries
pending, unattempted (no attempt counted, no backoff), until it is resumed. The pause is a
column of the row, so it holds across restarts and across node processes; a change of the
destination in config.toml does not resume it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.config import DestinationConfig, TlsConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, DestinationRow, utcnow

EDITABLE = ("kind", "ae_title", "host", "port", "calling_ae_title", "url", "max_attempts", "backoff_s", "timeout_s")
# DICOMweb fields only config.toml sets: the page never shows a secret's whereabouts, and cannot
# turn certificate checks off
CONFIG_ONLY = ("auth", "username", "secret_file", "secret_env", "verify_tls", "ca_file")
DIMSE_DEFAULTS = {"kind": "dimse", "url": None, "auth": "none", "username": None, "secret_file": None,
                  "secret_env": None, "verify_tls": True, "ca_file": None}


def _config_values(destination: DestinationConfig) -> dict:
    values = asdict(destination)
    values["tls"] = None if destination.tls is None else {
        key: str(value) if value is not None else None for key, value in asdict(destination.tls).items()}
    for key in ("secret_file", "ca_file"):
        values[key] = None if values[key] is None else str(values[key])
    if destination.kind == "dimse":
        # what seeded rows held before DICOMweb (0008): an unchanged DIMSE entry stays unchanged,
        # so page edits survive the upgrade
        for key in DIMSE_DEFAULTS:
            del values[key]
    return values


def to_config(row: DestinationRow) -> DestinationConfig:
    tls = None
    if row.tls:
        tls = TlsConfig(cert_file=Path(row.tls["cert_file"]), key_file=Path(row.tls["key_file"]),
                        ca_file=Path(row.tls["ca_file"]) if row.tls.get("ca_file") else None)
    return DestinationConfig(name=row.name, kind=row.kind, ae_title=row.ae_title, host=row.host, port=row.port,
                             calling_ae_title=row.calling_ae_title, max_attempts=row.max_attempts,
                             backoff_s=row.backoff_s, timeout_s=row.timeout_s, tls=tls, url=row.url,
                             auth=row.auth, username=row.username,
                             secret_file=Path(row.secret_file) if row.secret_file else None,
                             secret_env=row.secret_env, verify_tls=row.verify_tls,
                             ca_file=Path(row.ca_file) if row.ca_file else None)


def to_json(row: DestinationRow) -> dict:
    # the auth kind only: never a secret, nor where it is kept
    return {"name": row.name, **{key: getattr(row, key) for key in EDITABLE},
            "auth": row.auth, "verify_tls": row.verify_tls,
            "tls": bool(row.tls), "from_config": row.config_values is not None,
            "updated_at": row.updated_at, "paused": row.paused_at is not None,
            "paused_at": row.paused_at, "paused_by": row.paused_by}


class DestinationStore:
    def __init__(self, database: Database):
        self.database = database

    def seed_from_config(self, destinations: tuple[DestinationConfig, ...]) -> None:
        with self.database.session() as session:
            for destination in destinations:
                values = _config_values(destination)
                row = session.get(DestinationRow, destination.name)
                if row is not None and row.config_values == values:
                    continue  # unchanged in the file: keep any edits made on the page
                if row is None:
                    row = DestinationRow(name=destination.name)
                    session.add(row)
                for key in EDITABLE + CONFIG_ONLY:
                    setattr(row, key, values.get(key, DIMSE_DEFAULTS.get(key)))
                row.tls, row.config_values, row.updated_at = values["tls"], values, utcnow()
                audit.record(session, "config", "destinations.seed", destination.name)

    def get(self, name: str) -> DestinationConfig:
        """The destination called `name`; KeyError when there is none (the outbox's lookup)."""
        with self.database.session() as session:
            row = session.get(DestinationRow, name)
            if row is None:
                raise KeyError(name)
            return to_config(row)

    def paused(self, name: str) -> bool:
        """Whether an admin paused ``name`` (False when there is no such destination)."""
        with self.database.session() as session:
            row = session.get(DestinationRow, name)
            return row is not None and row.paused_at is not None

    def names(self) -> set[str]:
        with self.database.session() as session:
            return set(session.scalars(select(DestinationRow.name)))


def list_destinations(session: Session) -> list[DestinationRow]:
    return list(session.scalars(select(DestinationRow).order_by(DestinationRow.name)))


class NotPaused(ValueError):
    """Pausing a paused destination, or resuming a running one; the message says which."""


def pause(session: Session, name: str, actor: str) -> int:
    """Stop delivering to ``name``; returns how many deliveries wait for it (pending).
    LookupError: no such destination; NotPaused: paused already."""
    return _set_paused(session, name, actor, paused=True)


def resume(session: Session, name: str, actor: str) -> int:
    """Deliver to ``name`` again; returns how many deliveries wait for it (pending)."""
    return _set_paused(session, name, actor, paused=False)


def _set_paused(session: Session, name: str, actor: str, paused: bool) -> int:
    # one conditional UPDATE: of two admins pausing at once, one wins and the other is told
    changed = session.execute(
        update(DestinationRow)
        .where(DestinationRow.name == name,
               DestinationRow.paused_at.is_(None) if paused else DestinationRow.paused_at.is_not(None))
        .values(paused_at=utcnow() if paused else None, paused_by=actor if paused else None)
        .execution_options(synchronize_session=False))
    row = session.get(DestinationRow, name)
    if row is None:
        raise LookupError(f"no destination {name!r}")
    session.refresh(row)
    if changed.rowcount != 1:
        raise NotPaused(f"destination {name!r} is {'paused' if row.paused_at else 'not paused'} already")
    pending = session.scalar(select(func.count()).where(Delivery.destination == name, Delivery.state == "pending"))
    audit.record(session, actor, "destinations.pause" if paused else "destinations.resume", name, pending=pending)
    return pending


def delivery_counts(session: Session) -> dict[str, dict[str, int]]:
    """Per destination: deliveries pending and failed for good (dead letters)."""
    counts: dict[str, dict[str, int]] = {}
    for destination, state, count in session.execute(
            select(Delivery.destination, Delivery.state, func.count())
            .where(Delivery.state.in_(["pending", "failed"])).group_by(Delivery.destination, Delivery.state)):
        counts.setdefault(destination, {"pending": 0, "failed": 0})[state] = count
    return counts
