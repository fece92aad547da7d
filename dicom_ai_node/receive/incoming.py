"""One C-STORE data set on its way to disk.

The data set's fragments go straight from the socket into a temporary file behind a file
meta header built from the C-STORE request, so memory does not grow with the instance. The
first bytes are also kept in memory: the header (UIDs, what rules test) is read from them
without touching the file again, and from the file only when the header is unusually big.

While it streams, the free-disk reserve is checked every RESERVE_CHECK_BYTES: an instance
that would eat into it is dropped (its file removed) and refused with A700. Before any
answer, the whole data set is walked (data_set_check): one cut short, malformed or nested too
deep is refused, and giant non-pixel values never reach memory.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_ai_node.receive.data_set_check import (
    FileSource,
    InflatedSource,
    Walked,
    check_data_set,
    header_bytes,
)
from dicom_ai_node.receive.header_scan import WANTED, header_from_values
from dicom_ai_node.storage import Storage, StorageError, storage_error

HEADER_PREFIX_BYTES = 256 * 1024
RESERVE_CHECK_BYTES = 2**20  # the reserve may be overrun by at most this much per association
_PREAMBLE = bytes(128) + b"DICM"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae_title: str, implementation_class_uid: str, implementation_version: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1), Explicit VR Little
    Endian. Written by hand: pydicom's writer costs half a millisecond per instance."""
    elements = [
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0")),
        _explicit(0x0012, b"UI", _padded(implementation_class_uid, b"\0")),
        _explicit(0x0013, b"SH", _padded(implementation_version, b" ")),
    ]
    if source_ae_title:
        elements.append(_explicit(0x0016, b"AE", _padded(source_ae_title[:16], b" ")))
    group = b"".join(elements)
    return _PREAMBLE + _explicit(0x0000, b"UL", struct.pack("<L", len(group))) + group


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN", b"SQ", b"UT", b"OW"):  # 2 reserved bytes and a 32-bit length
        return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<HL", 0, len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    data = text.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


class IncomingInstance:
    """Receives one data set. ``error`` is set (and later bytes dropped) when the disk fails,
    so the association can read the rest of the message and answer with a failure status."""

    def __init__(self, storage: Storage, meta: bytes):
        self.error: StorageError | None = None
        self.size = 0  # bytes of the data set (without the meta header)
        self.prefix = bytearray()
        self.path: Path | None = None
        self._descriptor = -1
        self._storage = storage
        self._meta_size = len(meta)
        self._next_reserve_check = RESERVE_CHECK_BYTES
        self._walked: Walked | None = None  # the data set's walk, once it is in
        try:
            storage.check_free_space(0)
            self._descriptor, self.path = storage.open_incoming()
            self._write(meta)
        except StorageError as error:
            self._fail(error)
        except OSError as error:  # e.g. the storage folder is gone: a failure status, not an abort
            self._fail(storage_error(error, "a received instance"))
        self.file_size = len(meta)

    def write(self, chunk: memoryview) -> None:
        self.size += len(chunk)
        if len(self.prefix) < HEADER_PREFIX_BYTES:
            self.prefix += chunk[:HEADER_PREFIX_BYTES - len(self.prefix)]
        if self.error is None:
            try:
                self._write(chunk)
                self.file_size += len(chunk)
                if self.file_size >= self._next_reserve_check:
                    self._next_reserve_check = self.file_size + RESERVE_CHECK_BYTES
                    self._storage.check_free_space(0)
            except StorageError as error:
                self._fail(error)

    def finish(self) -> None:
        """Make the file's data durable (the rename into place is made durable by Storage)."""
        if self.error is not None:
            return
        try:
            os.fdatasync(self._descriptor)
        except OSError as error:
            self._fail(storage_error(error, "a received instance"))
        finally:
            self._close()

    def discard(self) -> None:
        self._close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def scan_header(self, transfer_syntax_uid: str) -> Dataset | None:
        """UIDs, InstanceNumber and NumberOfFrames only, quickly (from the walk, without
        pydicom); None when read_header is needed. Raises ValueError when the data set is
        refused (see check)."""
        self.check(transfer_syntax_uid)
        return header_from_values(self._walked.values)

    def read_header(self, transfer_syntax_uid: str) -> Dataset:
        """The data set up to its pixel data, less values over MAX_HEADER_ELEMENT (see
        data_set_check). Raises ValueError when it cannot be decoded or is refused."""
        syntax = self.check(transfer_syntax_uid)
        source = self._source(syntax)
        try:
            data = header_bytes(source, self._walked.header)
        finally:
            source.close()
        return read_dataset(io.BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)

    def check(self, transfer_syntax_uid: str) -> UID:
        """Walk the whole data set once (data_set_check); raises ValueError (DataSetError)
        when it is cut short, malformed or beyond the limits."""
        syntax = UID(transfer_syntax_uid)
        if not syntax.is_transfer_syntax:
            raise ValueError(f"unknown transfer syntax {transfer_syntax_uid}")
        if self._walked is None:
            source = self._source(syntax)
            try:
                self._walked = check_data_set(source, syntax.is_implicit_VR, syntax.is_little_endian, WANTED)
            finally:
                source.close()
        return syntax

    def _source(self, syntax: UID):
        if self.path is None:
            raise ValueError("the data set could not be kept to read it")
        if syntax == DeflatedExplicitVRLittleEndian:
            return InflatedSource(self.path, self._meta_size)
        return FileSource(self.path, self._meta_size, self.size, self.prefix)

    def _write(self, data) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._descriptor, view):]
        except OSError as error:
            raise storage_error(error, "a received instance") from error

    def _fail(self, error: StorageError) -> None:
        self.error = error
        self.discard()

    def _close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
