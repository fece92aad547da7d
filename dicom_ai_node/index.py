"""Recording received instances in the index (study -> series -> instance rows).

Liberal in what it stores: a header value that cannot be read (a private FD of 4 bytes, a
sequence pydicom cannot parse), a missing Type 1 or 2 attribute or a value its VR does not
allow never costs an instance. The index stores NULL (or leaves the value out of the series'
attributes) and says so: each oddity of a series' first header is one sentence in
``series.header_notes`` and one log line when the series row is made (no values: they may be
patient data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from pydicom.datadict import dictionary_VR, keyword_for_tag, private_dictionary_VR
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
from dicom_ai_node.storage import is_valid_uid

log = logging.getLogger(__name__)

# Binary and nested values are useless for routing and can be huge.
_SKIPPED_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN"}
_BINARY_VRS = _SKIPPED_VRS - {"SQ"}
_MAX_TEXT = 256
MAX_HEADER_NOTES = 20
# what the index and routing read: a Type 1 missing, or a Type 2 absent, is said
_EXPECTED = {"Modality": "1", "SOPClassUID": "1", "PatientID": "2", "PatientName": "2", "StudyDate": "2",
             "StudyTime": "2", "AccessionNumber": "2"}


def header_attributes(dataset: Dataset, notes: list[str] | None = None) -> dict[str, object]:
    """Top-level header values as JSON (keyword -> str | int | float | list): what rules test.
    An enhanced multi-frame object also gets the values all its frames share in its functional
    groups (ImageOrientationPatient, PixelSpacing, SliceThickness, ...) under their classic keywords.
    Values that cannot be read are left out, each said in ``notes`` when given."""
    notes = [] if notes is None else notes
    attributes: dict[str, object] = {}
    for tag in list(dataset.keys()):
        if tag.group == 0x0002:
            continue
        try:
            element = dataset[tag]  # converts the raw element: this is where bad values show
        except Exception as error:  # a malformed value must not stop the instance from being indexed
            notes.append(f"{_tag_name(tag)} could not be read ({type(error).__name__}); kept in the file as received")
            continue
        if isinstance(element.value, (bytes, bytearray)) and element.VR not in _BINARY_VRS:
            notes.append(f"{_tag_name(tag)} holds {len(element.value)} bytes, which are not a whole {element.VR} "
                         "value; kept in the file as received")
            continue
        if element.VR == "UN" and (expected := _dictionary_vr(dataset, tag)) not in (None, "UN"):
            # pydicom read it as UN because its length does not fit the dictionary's VR
            notes.append(f"{_tag_name(tag)} holds {len(element.value or b'')} bytes, which are not a whole "
                         f"{expected} value; kept in the file as received")
            continue
        if element.VR in _SKIPPED_VRS or tag.is_private:
            continue
        keyword = element.keyword or f"{tag.group:04X},{tag.element:04X}"
        try:
            value = _json_value(element.value)
        except Exception:
            notes.append(f"{_tag_name(tag)} could not be read as {element.VR}; left out of the index")
            continue
        if value is not None:
            attributes[keyword] = value
    try:
        lifted = shared_frame_values(dataset)
    except Exception as error:
        notes.append(f"the functional groups could not be read ({type(error).__name__}); the frames' shared "
                     "values are not indexed")
        lifted = {}
    for keyword, value in lifted.items():
        attributes.setdefault(keyword, value)
    for keyword, kind in _EXPECTED.items():
        if keyword not in dataset:
            notes.append(f"{keyword} (Type {kind}) is missing; the index stores none")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_valid_uid(str(attributes.get(keyword, ""))):
            notes.append(f"{keyword} is not a valid DICOM UID (e.g. a leading zero); stored, but results "
                         "cannot reference it")
    return attributes


def _dictionary_vr(dataset: Dataset, tag) -> str | None:
    """The VR the public or private dictionary gives ``tag`` (None when unknown)."""
    try:
        if not tag.is_private:
            return dictionary_VR(tag)
        creator = dataset.get((tag.group, tag.element >> 8))
        return private_dictionary_VR(tag, str(creator.value)) if creator is not None else None
    except (KeyError, ValueError, TypeError):
        return None


def _tag_name(tag) -> str:
    keyword = keyword_for_tag(tag) if not tag.is_private else ""
    return f"{keyword} ({tag.group:04X},{tag.element:04X})" if keyword else f"({tag.group:04X},{tag.element:04X})"


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
        notes: list[str] = []
        attributes = header_attributes(header, notes)
        notes = list(dict.fromkeys(notes))[:MAX_HEADER_NOTES]
        connection.execute(statements.insert_study, dict(
            study_instance_uid=item.study_uid,
            patient_id=_text(header, "PatientID", 64),
            patient_name=_text(header, "PatientName", 324),
            study_date=_text(header, "StudyDate", 8),
            accession_number=_text(header, "AccessionNumber", 16),
            study_description=_text(header, "StudyDescription", 64),
            state="receiving", first_received_at=now, last_received_at=now,
        ))
        if connection.execute(statements.insert_series, dict(
            series_instance_uid=item.series_uid,
            study_instance_uid=item.study_uid,
            modality=_text(header, "Modality", 16),
            series_number=_int(header, "SeriesNumber"),
            series_description=_text(header, "SeriesDescription", 64),
            attributes=attributes,
            header_notes=notes or None,
            is_result=item.is_result,
        )).first() is not None and notes:
            log.warning("series %s: stored as received, with %d oddities in its header: %s",
                        item.series_uid, len(notes), "; ".join(notes))
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
    try:
        value = dataset.get(keyword)
        if value is None or value == "" or isinstance(value, (bytes, bytearray)):
            return None
        return str(value)[:limit]
    except Exception:  # an unreadable value is stored as NULL (header_notes says so)
        return None


def _int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None
