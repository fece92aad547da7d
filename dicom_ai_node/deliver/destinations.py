"""Delivery destinations, stored in the database so admins can edit them without a restart.

config.toml's [[destinations]] seed the table at start: a destination the table lacks is
added, and one whose config entry changed since it was last seeded takes the config's values
(the file was edited after the page, so the file wins). Edits on the page otherwise stay.
A destination deleted on the page but still in config.toml comes back at the next start;
remove it from the file to remove it for good.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.config import DestinationConfig, TlsConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import DestinationRow, utcnow

EDITABLE = ("ae_title", "host", "port", "calling_ae_title", "max_attempts", "backoff_s", "timeout_s")


def _config_values(destination: DestinationConfig) -> dict:
    values = asdict(destination)
    values["tls"] = None if destination.tls is None else {
        key: str(value) if value is not None else None for key, value in asdict(destination.tls).items()}
    return values


def to_config(row: DestinationRow) -> DestinationConfig:
    tls = None
    if row.tls:
        tls = TlsConfig(cert_file=Path(row.tls["cert_file"]), key_file=Path(row.tls["key_file"]),
                        ca_file=Path(row.tls["ca_file"]) if row.tls.get("ca_file") else None)
    return DestinationConfig(name=row.name, ae_title=row.ae_title, host=row.host, port=row.port,
                             calling_ae_title=row.calling_ae_title, max_attempts=row.max_attempts,
                             backoff_s=row.backoff_s, timeout_s=row.timeout_s, tls=tls)


def to_json(row: DestinationRow) -> dict:
    return {"name": row.name, **{key: getattr(row, key) for key in EDITABLE},
            "tls": bool(row.tls), "from_config": row.config_values is not None,
            "updated_at": row.updated_at}


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
                for key in EDITABLE:
                    setattr(row, key, values[key])
                row.tls, row.config_values, row.updated_at = values["tls"], values, utcnow()
                audit.record(session, "config", "destinations.seed", destination.name)

    def get(self, name: str) -> DestinationConfig:
        """The destination called `name`; KeyError when there is none (the outbox's lookup)."""
        with self.database.session() as session:
            row = session.get(DestinationRow, name)
            if row is None:
                raise KeyError(name)
            return to_config(row)

    def names(self) -> set[str]:
        with self.database.session() as session:
            return set(session.scalars(select(DestinationRow.name)))


def list_destinations(session: Session) -> list[DestinationRow]:
    return list(session.scalars(select(DestinationRow).order_by(DestinationRow.name)))
