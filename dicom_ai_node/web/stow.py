"""STOW-RS in (DICOM PS3.18 10.5): `POST /dicom-web/studies[/{StudyInstanceUID}]`.

A second way in beside C-STORE, on the admin web server, for a user with an API token and
the role `sender` (or `admin`). The multipart/related body is parsed as it streams
(python-multipart's MultipartParser: bounded headers, no part ever whole in memory); each
part's PS3.10 file meta is read from its first bytes (at most MAX_META_BYTES), then the data
set streams into storage/incoming/ behind the node's own file meta, exactly as a C-STORE data
set does (receive/incoming.py). When a part ends it goes through the same checks, durable
write and index row as a C-STORE (StorageSCP.store_instance), before the next part is read;
the response lists every stored instance (Referenced SOP Sequence) and every refused one with
its Failure Reason (Failed SOP Sequence). Answering the request marks its studies released,
like an association release, so they complete promptly.

Bounded: a part over max_part_mb is dropped (A700) and the rest go on; a request over
max_request_mb is refused (413: by its Content-Length before any byte is read, else when it
passes the limit); the whole upload has request_timeout_s (408). A part cut off by a closed
connection, a timeout or a refusal never leaves its temporary file behind.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.filereader import read_dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import (
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_ai_node.receive import upper_layer as ul
from dicom_ai_node.receive.incoming import IncomingInstance, file_meta
from dicom_ai_node.receive.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SUCCESS,
    Expected,
    StorageSCP,
)
from dicom_ai_node.storage import is_valid_uid
from dicom_ai_node.web.auth import context, principal
from dicom_ai_node.web.users import Principal

log = logging.getLogger(__name__)

STORE_ROLES = ("sender", "admin")
MEDIA_TYPE = "application/dicom+json"
MAX_META_BYTES = 64 * 1024  # preamble and file meta group of one part; real ones are < 1 KiB
_PREAMBLE_END = 132  # 128-byte preamble and "DICM"
_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN")  # 2 reserved bytes, then a 32-bit length

router = APIRouter(tags=["dicomweb"])


def stow_sender(who: Annotated[Principal | None, Depends(principal)]) -> Principal:
    """An API token (no session cookie: no CSRF token travels with STOW-RS) of a sender or admin."""
    if who is None:
        raise HTTPException(401, "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    if who.via != "token":
        raise HTTPException(403, "STOW-RS needs an API token (Authorization: Bearer)")
    if who.role not in STORE_ROLES:
        raise HTTPException(403, f"STOW-RS needs the role sender or admin (you are a {who.role})")
    return who


class RequestRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Outcome:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    status: int
    reason: str | None = None


class _Part:
    """One part on its way in: its file meta first, then its data set into an IncomingInstance."""

    def __init__(self):
        self.content_type = b""
        self.size = 0
        self.meta = bytearray()  # until the file meta group is complete
        self.expected: Expected | None = None
        self.transfer_syntax = ""
        self.instance: IncomingInstance | None = None
        self.failure: Outcome | None = None  # refused before the end: later bytes are dropped


@dataclass
class StowReceiver:
    """Feeds the body to the multipart parser and stores each part as it ends (blocking: the
    endpoint calls it in a worker thread)."""

    receiver: StorageSCP
    study_uid: str | None
    sender: str  # for logs: "STOW-RS user NAME at ADDRESS"
    boundary: bytes
    max_part_bytes: int
    max_request_bytes: int
    outcomes: list[Outcome] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.received = 0
        self._part: _Part | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        callbacks: dict[str, Callable] = {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end}
        self._parser = MultipartParser(self.boundary, callbacks)  # header sizes and counts bounded

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_request_bytes:
            raise RequestRefused(413, f"request larger than max_request_mb ({self.max_request_bytes >> 20} MiB)")
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise RequestRefused(400, f"malformed multipart body: {error}") from None

    def finish(self) -> None:
        if self._parser.state != MultipartState.END:
            raise RequestRefused(400, "the multipart body ends before its closing boundary")

    def discard(self) -> None:
        """The request ended early: drop the part in transfer (never acknowledged)."""
        if self._part is not None and self._part.instance is not None:
            self._part.instance.discard()
        self._part = None

    # -- parser callbacks ----------------------------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        if bytes(self._header_field).strip().lower() == b"content-type":
            self._part.content_type = parse_options_header(bytes(self._header_value))[0]
        self._header_field.clear()
        self._header_value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        chunk = memoryview(data)[start:end]
        part.size += len(chunk)
        if part.failure is not None:
            return
        if part.content_type not in (b"", b"application/dicom"):
            part.failure = Outcome(None, None, CANNOT_UNDERSTAND,
                                   f"part of type {part.content_type.decode('latin-1')[:64]}, not application/dicom")
            return
        if part.size > self.max_part_bytes:
            self._fail(part, OUT_OF_RESOURCES, f"part larger than max_part_mb ({self.max_part_bytes >> 20} MiB)")
            return
        if part.instance is None:
            part.meta += chunk
            chunk = self._read_meta(part)
            if chunk is None:
                return
        part.instance.write(chunk)

    def _read_meta(self, part: _Part) -> memoryview | None:
        """The data set bytes after the file meta once it is complete (the part's instance
        then open), else None (more needed, or the part failed)."""
        meta = part.meta
        if meta[:2] == b"\x02\x00":
            start = 0  # no preamble: how pydicom writes a data set made in memory (dicomweb-client sends those)
        elif len(meta) < _PREAMBLE_END:
            return None
        elif meta[128:132] == b"DICM":
            start = _PREAMBLE_END
        else:
            return self._fail(part, CANNOT_UNDERSTAND, "not a DICOM PS3.10 file (no DICM prefix)")
        try:
            end = _meta_end(meta, start)
        except ValueError as error:
            return self._fail(part, CANNOT_UNDERSTAND, str(error))
        if end is None:
            return None
        try:
            values = read_dataset(BytesIO(bytes(meta[start:end])), False, True)
            sop_class = str(values.get("MediaStorageSOPClassUID", "")).rstrip("\0 ")
            sop_instance = str(values.get("MediaStorageSOPInstanceUID", "")).rstrip("\0 ")
            syntax = str(values.get("TransferSyntaxUID", "")).rstrip("\0 ")
        except Exception as error:  # any undecodable meta is the part's failure, never the request's
            return self._fail(part, CANNOT_UNDERSTAND, f"unreadable file meta: {error}")
        part.expected = Expected(sop_instance, sop_class, "file meta's Media Storage", self.study_uid)
        if not (is_valid_uid(sop_instance) and is_valid_uid(sop_class) and is_valid_uid(syntax)):
            return self._fail(part, CANNOT_UNDERSTAND, "file meta without valid SOP Class, SOP Instance "
                                                       "and Transfer Syntax UIDs")
        part.transfer_syntax = syntax
        part.instance = IncomingInstance(self.receiver.storage, file_meta(
            sop_class, sop_instance, syntax, "", ul.IMPLEMENTATION_CLASS_UID, ul.IMPLEMENTATION_VERSION_NAME))
        rest = memoryview(bytes(meta[end:]))
        part.meta = bytearray()
        return rest

    def _fail(self, part: _Part, status: int, reason: str) -> None:
        expected = part.expected
        part.failure = Outcome(expected and expected.sop_class_uid or None,
                               expected and expected.sop_instance_uid or None, status, reason)
        if part.instance is not None:
            part.instance.discard()
            part.instance = None
        return None

    def _end(self) -> None:
        part, self._part = self._part, None
        if part.failure is None and part.instance is None:
            part.failure = Outcome(None, None, CANNOT_UNDERSTAND, "not a DICOM PS3.10 file (too short)")
        if part.failure is not None:
            log.warning("refused STOW-RS part from %s: %s", self.sender, part.failure.reason)
            self.outcomes.append(part.failure)
            return
        instance, expected = part.instance, part.expected
        try:
            instance.finish()
            status, reason, study_uid = self.receiver.store_instance(
                instance, part.transfer_syntax, expected, sender=self.sender, calling_ae=None, via="STOW-RS")
        finally:
            instance.discard()  # the temporary file, when it was not moved into place
        if study_uid:
            self.studies.add(study_uid)
        self.outcomes.append(Outcome(expected.sop_class_uid, expected.sop_instance_uid, status, reason))


def _meta_end(meta: bytearray, start: int) -> int | None:
    """Where the file meta elements (group 0002, explicit VR little endian, with or without
    their group length) that begin at ``start`` end; None while more bytes are needed.
    Walked element by element rather than trusting (0002,0000), which some writers leave out."""
    position = start
    while len(meta) >= position + 8:
        if meta[position:position + 2] != b"\x02\x00":
            if position == start:
                raise ValueError("no file meta information (group 0002)")
            return position
        if meta[position + 4:position + 6] in _LONG_VRS:
            if len(meta) < position + 12:
                return None
            position += 12 + struct.unpack_from("<L", meta, position + 8)[0]
        else:
            position += 8 + struct.unpack_from("<H", meta, position + 6)[0]
        if position > MAX_META_BYTES:
            raise ValueError(f"file meta larger than {MAX_META_BYTES >> 10} KiB")
    if len(meta) >= MAX_META_BYTES:
        raise ValueError(f"file meta larger than {MAX_META_BYTES >> 10} KiB")
    return None


def response_body(outcomes: list[Outcome]) -> dict:
    """The Store Instances Response Module (PS3.18 10.5.3) in the DICOM JSON model."""
    stored, failed = [], []
    for outcome in outcomes:
        item = {}
        if outcome.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
        if outcome.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
        if outcome.status == SUCCESS:
            stored.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [outcome.status]}
            failed.append(item)
    return {"00081198": {"vr": "SQ", **({"Value": failed} if failed else {})},
            "00081199": {"vr": "SQ", **({"Value": stored} if stored else {})}}


def _boundary(content_type: str | None) -> bytes:
    media_type, options = parse_options_header(content_type)
    kind = options.get(b"type", b"").strip().lower()
    if media_type != b"multipart/related" or kind != b"application/dicom":
        raise RequestRefused(415, 'Content-Type must be multipart/related; type="application/dicom"')
    boundary = options.get(b"boundary", b"")
    if not 0 < len(boundary) <= MAX_BOUNDARY_LENGTH:  # not RFC 2046's 70: Orthanc sends two UUIDs (73)
        raise RequestRefused(400, "multipart/related without a usable boundary")
    return boundary


@router.post("/dicom-web/studies", summary="STOW-RS: store instances (multipart/related; "
             'type="application/dicom"); needs an API token of a sender or admin')
async def store_instances(request: Request, who: Annotated[Principal, Depends(stow_sender)]):
    return await _stow(request, who, None)


@router.post("/dicom-web/studies/{study_uid}", summary="STOW-RS: store instances of this study")
async def store_study_instances(request: Request, study_uid: str,
                                who: Annotated[Principal, Depends(stow_sender)]):
    if not is_valid_uid(study_uid):
        raise HTTPException(400, "the study in the URL is not a valid UID")
    return await _stow(request, who, study_uid)


async def _stow(request: Request, who: Principal, study_uid: str | None):
    ctx = context(request)
    settings = ctx.config.dicomweb
    if ctx.receiver is None or not ctx.receiver.running:
        raise HTTPException(503, "the node's receiver is not running")
    address = request.client.host if request.client else "unknown"
    try:
        boundary = _boundary(request.headers.get("content-type"))
        stow = StowReceiver(ctx.receiver, study_uid, f"STOW-RS user {who.name} at {address}", boundary,
                            settings.max_part_mb << 20, settings.max_request_mb << 20)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > stow.max_request_bytes:
            raise RequestRefused(413, f"request larger than max_request_mb ({settings.max_request_mb} MiB)")
    except RequestRefused as refusal:
        return _refused(refusal, who, address)
    try:
        with anyio.fail_after(settings.request_timeout_s):
            async for chunk in request.stream():
                await run_in_threadpool(stow.write, chunk)  # parse, write, store: never in the event loop
            await run_in_threadpool(stow.finish)
    except RequestRefused as refusal:
        return _refused(refusal, who, address)
    except TimeoutError:
        return _refused(RequestRefused(408, f"upload not finished within request_timeout_s "
                                            f"({settings.request_timeout_s:g} s)"), who, address)
    except ClientDisconnect:
        log.warning("STOW-RS upload from user %s at %s ended by the client", who.name, address)
        raise
    finally:
        stow.discard()
        # instances stored before an early end are kept (like C-STORE before an abort)
        await run_in_threadpool(ctx.receiver.studies_released, stow.studies)
    stored = sum(1 for outcome in stow.outcomes if outcome.status == SUCCESS)
    failed = len(stow.outcomes) - stored
    log.info("STOW-RS from user %s at %s: %d instances stored, %d refused", who.name, address, stored, failed)
    if not stow.outcomes:
        return _refused(RequestRefused(400, "the request holds no part"), who, address)
    status = 200 if not failed else 202 if stored else 409
    return JSONResponse(response_body(stow.outcomes), status_code=status, media_type=MEDIA_TYPE)


def _refused(refusal: RequestRefused, who: Principal, address: str) -> JSONResponse:
    log.warning("refused STOW-RS request from user %s at %s: %s", who.name, address, refusal.reason)
    return JSONResponse({"detail": refusal.reason}, status_code=refusal.status)
