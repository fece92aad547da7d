"""Which earlier study of the patient is the prior, and which of its series: pure functions of
the current study's facts, the rule's PriorSpec and the source's answers (C-FIND or QIDO-RS,
both as pydicom Datasets)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from pydicom.dataset import Dataset

from dicom_ai_node.routing import PriorSpec
from dicom_ai_node.storage import is_valid_uid

MAX_STUDIES_TRIED = 5  # candidate studies, newest first, whose series are queried
MAX_SERIES_INSTANCES = 100_000  # more than any real series: a count above it is taken for unknown


class NoPrior(Exception):
    """The current study cannot be queried for priors; the message says why."""


@dataclass(frozen=True)
class Current:
    study_instance_uid: str
    patient_id: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS[.f], may be ""
    modality: str


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class SeriesMatch:
    series_instance_uid: str
    instances: int | None


def check_current(current: Current) -> None:
    """Refuse queries that could match another patient or no date range."""
    if not current.patient_id.strip():
        raise NoPrior("the study has no PatientID: a query would match every patient")
    if any(ch in current.patient_id for ch in "*?\\"):
        raise NoPrior("the PatientID holds query wildcard characters: it cannot be matched exactly")
    if not _parse_date(current.study_date):
        raise NoPrior("the study has no valid StudyDate: the prior's date range is unknown")


def date_range(current: Current, spec: PriorSpec) -> str:
    """StudyDate range matching: within_days before the current study, up to its date."""
    day = _parse_date(current.study_date)
    return f"{(day - timedelta(days=spec.within_days)):%Y%m%d}-{day:%Y%m%d}"


def candidate_studies(current: Current, spec: PriorSpec, answers: list[Dataset]) -> list[StudyMatch]:
    """The answers that are earlier studies of this patient in range, newest first. Checked here
    again (a PACS may match loosely): exact PatientID, date, modality, valid UIDs."""
    first = _parse_date(current.study_date) - timedelta(days=spec.within_days)
    now = (current.study_date, _time(current.study_time))
    found: dict[str, StudyMatch] = {}
    for answer in answers:
        uid = str(answer.get("StudyInstanceUID", "") or "")
        day_text = str(answer.get("StudyDate", "") or "")
        day = _parse_date(day_text)
        if (not is_valid_uid(uid) or uid == current.study_instance_uid or day is None or day < first
                or str(answer.get("PatientID", "")) != current.patient_id):
            continue
        if (day_text, _time(str(answer.get("StudyTime", "") or ""))) >= now:
            continue  # not before this study
        if spec.same_modality and current.modality not in _values(answer.get("ModalitiesInStudy")):
            continue
        found[uid] = StudyMatch(uid, day_text, str(answer.get("StudyTime", "") or ""))
    return sorted(found.values(), key=lambda s: (s.study_date, _time(s.study_time)), reverse=True)


def choose_series(current: Current, spec: PriorSpec, answers: list[Dataset]) -> SeriesMatch | None:
    """Of a candidate study's series: same modality (when asked), the body part (when asked),
    the one with the most instances (the thinnest reconstruction of the scan, most likely)."""
    matches = []
    for answer in answers:
        uid = str(answer.get("SeriesInstanceUID", "") or "")
        if not is_valid_uid(uid):
            continue
        if spec.same_modality and str(answer.get("Modality", "")) != current.modality:
            continue
        if spec.body_part and str(answer.get("BodyPartExamined", "") or "").strip().upper() != spec.body_part.upper():
            continue
        matches.append(SeriesMatch(uid, _instance_count(answer.get("NumberOfSeriesRelatedInstances"))))
    if not matches:
        return None
    return max(matches, key=lambda s: (s.instances or 0, s.series_instance_uid))


def _instance_count(value) -> int | None:
    """The answer's instance count when it is one (1 to MAX_SERIES_INSTANCES); anything else,
    from a PACS that leaves it out or gets it wrong, is unknown (the retrieve's own count rules)."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if 1 <= count <= MAX_SERIES_INSTANCES else None


def _parse_date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) == 8 and text.isdigit() else None
    except ValueError:
        return None


def _time(text: str) -> str:
    return (text.replace(":", "") + "000000")[:6]  # "" sorts as midnight


def _values(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if not isinstance(value, str) and hasattr(value, "__iter__") else [str(value)]
