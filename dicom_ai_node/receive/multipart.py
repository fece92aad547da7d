"""A multipart/related body of DICOM parts (PS3.18 8.6), parsed as it streams and stored part by
part: the way in of STOW-RS (web/stow.py, a request's body) and of a prior's WADO-RS retrieve
(priors/dicomweb.py, an answer's body).

python-multipart's MultipartParser keeps headers bounded and no part is ever whole in memory.
Each part's PS3.10 file meta is read from its first bytes (at most MAX_META_BYTES), then its
data set streams into storage/incoming/ behind the node's own file meta, exactly as a C-STORE
data set does (receive/incoming.py). When a part ends it goes through the same checks, durable
write and index row as a C-STORE (StorageSCP.store_instance) before the next part is read. A
part over max_part_bytes is dropped (A700) and the rest go on; a body over max_request_bytes
stops the whole (RequestRefused 413). A part cut off never leaves its temporary file behind.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.filereader import read_dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import (
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    MultipartState,
    parse_options_header,
)

from dicom_ai_node.receive import upper_layer as ul
from dicom_ai_node.receive.incoming import IncomingInstance, file_meta
from dicom_ai_node.receive.scp import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Expected,
    StorageSCP,
)
from dicom_ai_node.storage import is_storable_uid, is_valid_uid

log = logging.getLogger(__name__)

MAX_META_BYTES = 64 * 1024  # preamble and file meta group of one part; real ones are < 1 KiB
_PREAMBLE_END = 132  # 128-byte preamble and "DICM"
_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN")  # 2 reserved bytes, then a 32-bit length


class RequestRefused(Exception):
    """The whole body is refused (``status``: the HTTP status STOW-RS answers with)."""

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
class MultipartReceiver:
    """Feeds the body to the multipart parser and stores each part as it ends (blocking: STOW-RS
    calls it in a worker thread, a prior's retrieve in the fetcher's)."""

    receiver: StorageSCP
    study_uid: str | None
    sender: str  # for logs: "STOW-RS user NAME at ADDRESS", "WADO-RS source NAME"
    boundary: bytes
    max_part_bytes: int
    max_request_bytes: int
    via: str = "STOW-RS"  # how the instances came, for logs (priors/dicomweb.py: "WADO-RS")
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
        if not (is_storable_uid(sop_instance) and is_storable_uid(sop_class) and is_valid_uid(syntax)):
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
            log.warning("refused %s part from %s: %s", self.via, self.sender, part.failure.reason)
            self.outcomes.append(part.failure)
            return
        instance, expected = part.instance, part.expected
        try:
            instance.finish()
            status, reason, study_uid = self.receiver.store_instance(
                instance, part.transfer_syntax, expected, sender=self.sender, calling_ae=None, via=self.via)
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


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a multipart/related; type="application/dicom" body (RequestRefused if not one)."""
    media_type, options = parse_options_header(content_type)
    kind = options.get(b"type", b"").strip().lower()
    if media_type != b"multipart/related" or kind != b"application/dicom":
        raise RequestRefused(415, 'Content-Type must be multipart/related; type="application/dicom"')
    boundary = options.get(b"boundary", b"")
    if not 0 < len(boundary) <= MAX_BOUNDARY_LENGTH:  # not RFC 2046's 70: Orthanc sends two UUIDs (73)
        raise RequestRefused(400, "multipart/related without a usable boundary")
    return boundary
