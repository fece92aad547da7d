"""Recording received instances in the index (study -> series -> instance rows)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from dicom_ai_node.db.models import Instance, Series, Study, utcnow
from dicom_ai_node.imaging.functional_groups import shared_frame_values

# Binary and nested values are useless for routing and can be huge.
_SKIPPED_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN"}
_MAX_TEXT = 256


def header_attributes(dataset: Dataset) -> dict[str, object]:
    """Top-level header values as JSON (keyword -> str | int | float | list): what rules test.
    An enhanced multi-frame object also gets the values all its frames share in its functional
    groups (ImageOrientationPatient, PixelSpacing, SliceThickness, ...) under their classic keywords."""
    attributes: dict[str, object] = {}
    for element in dataset:
        if element.VR in _SKIPPED_VRS or element.tag.is_private or element.tag.group == 0x0002:
            continue
        keyword = element.keyword or f"{element.tag.group:04X},{element.tag.element:04X}"
        try:
            value = _json_value(element.value)
        except Exception:  # a malformed value must not stop the instance from being indexed
            continue
        if value is not None:
            attributes[keyword] = value
    for keyword, value in shared_frame_values(dataset).items():
        attributes.setdefault(keyword, value)
    return attributes


def _json_value(value):
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = [_json_value(item) for item in value]
        return [item for item in items if item is not None]
    if isinstance(value, PersonName):
        return str(value)[:_MAX_TEXT]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return None
    return str(value)[:_MAX_TEXT]


@dataclass(frozen=True)
class ReceivedInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae_title: str | None
    header: Dataset  # the received dataset; only header values are read
    is_result: bool = False


class _Statements:
    """The index's statements for one SQL dialect, built once: building a statement costs
    more than running it at a few hundred instances a second (SQLAlchemy coercions, cache
    keys), so each instance only binds its values."""

    def __init__(self, dialect: str):
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        self.insert_study = self._insert_ignore(insert, Study.__table__)
        self.insert_series = self._insert_ignore(insert, Series.__table__)
        self.insert_instance = self._insert_ignore(insert, Instance.__table__)
        instance = Instance.__table__
        self.update_resent = (update(instance).where(instance.c.sop_instance_uid == bindparam("key"))
                              .values(path=bindparam("path"), size_bytes=bindparam("size_bytes"),
                                      transfer_syntax_uid=bindparam("transfer_syntax_uid"),
                                      received_at=bindparam("received_at")))
        study = Study.__table__
        self.touch_study = (update(study).where(study.c.study_instance_uid == bindparam("key"))
                            .values(last_received_at=bindparam("now")))
        # a new instance for a study already complete makes it "receiving" again: evaluate again
        self.reopen_study = (update(study).where(study.c.study_instance_uid == bindparam("key"))
                             .values(last_received_at=bindparam("now"), state="receiving"))

    @staticmethod
    def _insert_ignore(insert, table):
        """INSERT that does nothing when the primary key exists (concurrent receivers race
        here); it returns the key only when the row was inserted."""
        return insert(table).on_conflict_do_nothing().returning(next(iter(table.primary_key.columns)))


_STATEMENTS: dict[str, _Statements] = {}


def _statements(connection: Session | Connection) -> _Statements:
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    dialect = bind.dialect.name
    if dialect not in _STATEMENTS:
        _STATEMENTS[dialect] = _Statements(dialect)
    return _STATEMENTS[dialect]


def record_instance(connection: Session | Connection, item: ReceivedInstance, now: datetime | None = None,
                    series_known: bool = False) -> bool:
    """Index one stored instance; returns True when it is new (False for a resend).

    ``series_known``: the caller saw this series committed already, so the study and series
    rows (and the header walk that fills them) can be skipped.
    """
    now = now or utcnow()
    header = item.header
    statements = _statements(connection)
    if not series_known:
        connection.execute(statements.insert_study, dict(
            study_instance_uid=item.study_uid,
            patient_id=_text(header, "PatientID", 64),
            patient_name=_text(header, "PatientName", 324),
            study_date=_text(header, "StudyDate", 8),
            accession_number=_text(header, "AccessionNumber", 16),
            study_description=_text(header, "StudyDescription", 64),
            state="receiving", first_received_at=now, last_received_at=now,
        ))
        connection.execute(statements.insert_series, dict(
            series_instance_uid=item.series_uid,
            study_instance_uid=item.study_uid,
            modality=_text(header, "Modality", 16),
            series_number=_int(header, "SeriesNumber"),
            series_description=_text(header, "SeriesDescription", 64),
            attributes=header_attributes(header),
            is_result=item.is_result,
        ))
    is_new = connection.execute(statements.insert_instance, dict(
        sop_instance_uid=item.sop_uid, series_instance_uid=item.series_uid,
        sop_class_uid=item.sop_class_uid, transfer_syntax_uid=item.transfer_syntax_uid,
        instance_number=_int(header, "InstanceNumber"),
        number_of_frames=_int(header, "NumberOfFrames") or 1,
        path=item.path, size_bytes=item.size_bytes, calling_ae_title=item.calling_ae_title,
        received_at=now,
    )).first() is not None
    if not is_new:
        # A resend of the same SOP Instance: the file was replaced atomically; keep one row.
        connection.execute(statements.update_resent, dict(
            key=item.sop_uid, path=item.path, size_bytes=item.size_bytes,
            transfer_syntax_uid=item.transfer_syntax_uid, received_at=now))
    if not item.is_result:
        connection.execute(statements.reopen_study if is_new else statements.touch_study,
                           dict(key=item.study_uid, now=now))
    return is_new


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
