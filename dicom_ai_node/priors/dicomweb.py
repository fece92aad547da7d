"""QIDO-RS and WADO-RS against a DICOMweb source (PS3.18 10.6 and 10.4), beside dimse.py's
C-FIND and C-MOVE, with the same bounds: more than MAX_MATCHES answers or a deadline is an error
(QueryError), never a cut list.

The QIDO-RS answers (DICOM JSON) become pydicom Datasets, so choose.py takes them as it takes
C-FIND answers. The WADO-RS answer, a multipart/related body, is parsed as it streams by
receive/multipart.py, as a STOW-RS request is (web/stow.py): each part goes through StorageSCP.store_instance (the checks, fsync
and index row of a C-STORE) before the next is read, so no part is ever whole in memory. The
HTTP client, its auth and secret, TLS and timeouts are deliver/dicomweb.py's. Errors name the
URL path, never the query (it holds the PatientID).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
from pydicom.dataset import Dataset

from dicom_ai_node.config import DestinationConfig
from dicom_ai_node.deliver.dicomweb import (
    MAX_ANSWER_BYTES,
    DeadlinePassed,
    SecretError,
    open_client,
    read_answer,
    status_text,
)
from dicom_ai_node.priors.dimse import MAX_MATCHES, QueryError
from dicom_ai_node.receive.multipart import (
    MultipartReceiver,
    RequestRefused,
    multipart_boundary,
)
from dicom_ai_node.receive.scp import SUCCESS, StorageSCP

MAX_PART_BYTES = 2**30  # one instance of the prior: a larger part is refused (counted failed), the rest go on
MAX_SERIES_BYTES = 16 * 2**30  # the whole WADO-RS answer: past this the retrieve stops
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # as stored, no transcoding
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "PatientID", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesNumber",
                 "NumberOfSeriesRelatedInstances")


@dataclass(frozen=True)
class Query:
    """One QIDO-RS search: a path under the source's URL and its query parameters."""

    path: str  # "studies" or "studies/{uid}/series"
    params: list[tuple[str, str]]


@dataclass(frozen=True)
class Retrieved:
    stored: int
    failed: int
    size_bytes: int
    first_failure: str | None  # why the first refused part was refused


def study_query(patient_id: str, date_range: str, modality: str | None) -> Query:
    params = [("PatientID", patient_id), ("StudyDate", date_range), *_include(STUDY_FIELDS)]
    return Query("studies", params + ([("ModalitiesInStudy", modality)] if modality else []))


def series_query(study_uid: str) -> Query:
    return Query(f"studies/{study_uid}/series", _include(SERIES_FIELDS))


def _include(fields: tuple[str, ...]) -> list[tuple[str, str]]:
    # one includefield per attribute: PS3.18 allows a comma-separated list too, but not every
    # server reads one (Orthanc's DICOMweb plugin 1.7 ignores it)
    return [("includefield", field) for field in fields]


def find(source: DestinationConfig, query: Query, deadline: float, max_matches: int = MAX_MATCHES) -> list[Dataset]:
    """The matches of a QIDO-RS search; QueryError when the source fails, answers anything but a
    DICOM JSON array, more than ``max_matches`` or the deadline (time.monotonic()) passes."""
    where = f"QIDO-RS {source.url}/{query.path}"
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise QueryError("deadline passed before the query")
    # one more than allowed: a full page means there may be more (a cut list could miss the newest)
    params = [*query.params, ("limit", str(max_matches + 1))]
    timeout = min(source.timeout_s, remaining)  # each network step; the whole answer by the deadline
    try:
        with open_client(source) as client, client.stream(
                "GET", f"{source.url}/{query.path}", params=params, headers={"Accept": "application/dicom+json"},
                timeout=timeout) as answer:
            status = answer.status_code
            more = "additional results" in answer.headers.get("warning", "").lower()  # PS3.18 8.3.4.5
            text = read_answer(answer, deadline) if status == 200 else ""
    except SecretError as error:
        raise QueryError(str(error)) from None
    except DeadlinePassed:
        raise QueryError(f"{where} ran past its deadline") from None
    except httpx.HTTPError as error:
        raise _network_error(source, where, timeout, error) from None
    if status == 204:
        return []  # no match
    if status != 200:
        raise QueryError(f"{where}: {status_text(status)}")
    if text is None:
        raise QueryError(f"{where}: answer over {MAX_ANSWER_BYTES >> 20} MiB")
    try:
        items = json.loads(text) if text.strip() else []
    except ValueError:
        raise QueryError(f"{where}: the answer is not JSON") from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise QueryError(f"{where}: the answer is not a DICOM JSON array of data sets")
    if len(items) > max_matches or more:
        raise QueryError(f"more than {max_matches} matches; refusing to guess which is the prior")
    try:
        return [Dataset.from_json(item) for item in items]
    except Exception as error:  # noqa: BLE001 - any malformed element: the answer is wrong, not the node
        raise QueryError(f"{where}: the answer is not DICOM JSON: {type(error).__name__}") from None


def retrieve(source: DestinationConfig, study_uid: str, series_uid: str, receiver: StorageSCP,
             deadline: float) -> Retrieved:
    """WADO-RS the series into the node's store, part by part as the answer streams. Parts the
    store refuses are counted; QueryError when the source fails, the answer is not
    multipart/related DICOM, is over MAX_SERIES_BYTES, or the deadline passes (the instances
    stored until then stay, like those of a C-MOVE cut short)."""
    path = f"studies/{study_uid}/series/{series_uid}"
    where = f"WADO-RS {source.url}/{path}"
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise QueryError("deadline passed before the retrieve")
    parts: MultipartReceiver | None = None
    timeout = min(source.timeout_s, remaining)
    try:
        with open_client(source) as client, client.stream(
                "GET", f"{source.url}/{path}", headers={"Accept": ACCEPT_DICOM}, timeout=timeout) as answer:
            if answer.status_code not in (200, 206):  # 206: some instances could not be sent
                raise QueryError(f"{where}: {status_text(answer.status_code)}")
            try:
                boundary = multipart_boundary(answer.headers.get("content-type"))
            except RequestRefused:
                raise QueryError(f"{where}: the answer is not multipart/related; type=application/dicom") from None
            # the study of the URL: a part of another study is refused, like a STOW-RS to /studies/{uid}
            parts = MultipartReceiver(receiver, study_uid, f"WADO-RS source {source.name}", boundary,
                                     MAX_PART_BYTES, MAX_SERIES_BYTES, via="WADO-RS")
            for chunk in answer.iter_bytes():
                if time.monotonic() > deadline:
                    raise QueryError(f"{where} ran past its deadline")
                parts.write(chunk)
            parts.finish()
    except RequestRefused as refusal:
        if refusal.status == 413:
            raise QueryError(f"{where}: the series is over {MAX_SERIES_BYTES >> 20} MiB") from None
        raise QueryError(f"{where}: {refusal.reason}") from None
    except SecretError as error:
        raise QueryError(str(error)) from None
    except httpx.HTTPError as error:
        raise _network_error(source, where, timeout, error) from None
    finally:
        if parts is not None:
            parts.discard()  # a part cut off is never kept
            receiver.studies_released(parts.studies)  # like an association release: completes promptly
    refused = [outcome for outcome in parts.outcomes if outcome.status != SUCCESS]
    return Retrieved(len(parts.outcomes) - len(refused), len(refused), parts.received,
                     refused[0].reason if refused else None)


def _network_error(source: DestinationConfig, where: str, timeout: float, error: httpx.HTTPError) -> QueryError:
    if isinstance(error, httpx.TimeoutException):
        return QueryError(f"{where}: no answer within {timeout:.1f} s ({type(error).__name__})")
    return QueryError(f"cannot reach {source.url}: {type(error).__name__}: {error}")
