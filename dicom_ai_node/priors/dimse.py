"""C-FIND and C-MOVE SCU against a destination (Study Root), with bounded answers and waits."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelMove)

from dicom_ai_node.config import DestinationConfig
from dicom_ai_node.deliver.dimse import client_ssl_context

MAX_MATCHES = 200  # more answers than this: the query is refused rather than cut (the newest might be cut off)
PENDING = (0xFF00, 0xFF01)


class QueryError(Exception):
    """The source could not answer (down, refused, failed status, too many matches, deadline)."""


@dataclass(frozen=True)
class MoveOutcome:
    completed: int
    failed: int
    warning: int
    status: int


def _associate(source: DestinationConfig, calling_ae: str, context: str, timeout_s: float):
    ae = AE(ae_title=source.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(context)
    ssl_context = client_ssl_context(source)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title,
                         tls_args=(ssl_context, None) if ssl_context else None)
    if not assoc.is_established:
        where = f"{source.ae_title}@{source.host}:{source.port}"
        raise QueryError(f"association rejected by {where}" if assoc.is_rejected
                         else f"cannot connect to {where}, or it aborted the association")
    return assoc


def find(source: DestinationConfig, calling_ae: str, identifier: Dataset, deadline: float,
         max_matches: int = MAX_MATCHES) -> list[Dataset]:
    """The C-FIND matches of ``identifier``; QueryError when the source fails, answers more than
    ``max_matches`` or the deadline (time.monotonic()) passes."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise QueryError("deadline passed before the query")
    assoc = _associate(source, calling_ae, StudyRootQueryRetrieveInformationModelFind, remaining)
    matches: list[Dataset] = []
    try:
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:  # no answer within dimse_timeout: pynetdicom aborted
                raise QueryError("no answer to C-FIND (timed out or the association was aborted)")
            code = int(status.Status)
            if code in PENDING:
                matches.append(answer)
                if len(matches) > max_matches:
                    raise QueryError(f"more than {max_matches} matches; refusing to guess which is the prior")
                if time.monotonic() > deadline:
                    raise QueryError("C-FIND ran past its deadline")
            elif code != 0x0000:
                raise QueryError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.abort() if len(matches) > max_matches or time.monotonic() > deadline else assoc.release()
    return matches


def move(source: DestinationConfig, calling_ae: str, identifier: Dataset, move_to: str,
         deadline: float) -> MoveOutcome:
    """C-MOVE ``identifier`` to the AE ``move_to`` (the node itself); the final counts."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise QueryError("deadline passed before the retrieve")
    assoc = _associate(source, calling_ae, StudyRootQueryRetrieveInformationModelMove, remaining)
    outcome = None
    try:
        for status, _answer in assoc.send_c_move(identifier, move_to, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                raise QueryError("no answer to C-MOVE (timed out or the association was aborted)")
            code = int(status.Status)
            counts = MoveOutcome(int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                                 int(status.get("NumberOfFailedSuboperations", 0) or 0),
                                 int(status.get("NumberOfWarningSuboperations", 0) or 0), code)
            if code in PENDING:
                if time.monotonic() > deadline:
                    raise QueryError("C-MOVE ran past its deadline")
                continue
            outcome = counts
    finally:
        if assoc.is_established:
            assoc.release() if outcome is not None else assoc.abort()
    if outcome is None:
        raise QueryError("C-MOVE ended without a final status")
    if outcome.status not in (0x0000, 0xB000):
        raise QueryError(f"C-MOVE failed with status 0x{outcome.status:04X} "
                         f"({outcome.completed} sent, {outcome.failed} failed)")
    return outcome


def study_query(patient_id: str, date_range: str, modality: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient_id
    identifier.StudyInstanceUID = ""
    identifier.StudyDate = date_range
    identifier.StudyTime = ""
    identifier.ModalitiesInStudy = modality or ""
    identifier.NumberOfStudyRelatedInstances = ""
    return identifier


def series_query(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = ""
    identifier.Modality = ""
    identifier.BodyPartExamined = ""
    identifier.SeriesNumber = ""
    identifier.NumberOfSeriesRelatedInstances = ""
    return identifier


def series_move(study_uid: str, series_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    return identifier
