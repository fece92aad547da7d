"""Checking a received data set's structure, with memory bounded whatever it holds.

Before an instance is acknowledged, every element of its data set is walked once from the
file: each value must end inside the data set and the last one exactly at its end (a data set
cut short, e.g. pixel data declared longer than what came, is refused), items and delimiters
must be where they belong, and sequences may nest at most MAX_DEPTH deep (the same rule for
every instance, whether its header is parsed with pydicom or only scanned). Values are never
read, only their element headers, so a 4 GiB element costs a seek.

The walk also gives the byte ranges of the top-level elements before the pixel data: the
header that pydicom parses for the index. An element larger than MAX_HEADER_ELEMENT is left
out of that header (it is stored in the file as received), and a header that would still be
larger than MAX_HEADER_BYTES is refused.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 32  # sequence nesting; real objects (SR content trees included) stay far below
MAX_HEADER_ELEMENT = 4 * 2**20
MAX_HEADER_BYTES = 16 * 2**20
MAX_INFLATED_BYTES = 4 * 2**30  # a deflated data set inflating to more is refused (zip bomb)

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
# explicit VRs with 2 reserved bytes and a 32-bit length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_READ_CHUNK = 64 * 1024


class DataSetError(ValueError):
    """The data set is cut short, malformed or beyond the limits; the message says how."""


class FileSource:
    """The data set in a file from ``start`` (after the file meta header), ``size`` bytes long;
    its first bytes are also in ``prefix`` (read from memory)."""

    def __init__(self, path: Path, start: int, size: int, prefix: bytes | bytearray):
        self._path, self._start, self._size = path, start, size
        self.prefix = bytes(prefix[:size])
        self._descriptor = -1

    def has(self, end: int) -> bool:
        return end <= self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > self._size:
            raise DataSetError("the data set ends inside an element")
        if offset + length <= len(self.prefix):
            return self.prefix[offset:offset + length]
        if self._descriptor < 0:
            self._descriptor = os.open(self._path, os.O_RDONLY)
        data = bytearray()
        while len(data) < length:  # bounded: each pread returns at least one byte or we stop
            piece = os.pread(self._descriptor, length - len(data), self._start + offset + len(data))
            if not piece:
                raise DataSetError("the file ends before the data set")
            data += piece
        return bytes(data)

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1


class InflatedSource:
    """A Deflated Explicit VR Little Endian data set, inflated as it is walked (never whole
    in memory). Reads go forward; reading behind the window starts inflating again."""

    prefix = b""  # nothing is read in place

    def __init__(self, path: Path, start: int):
        self._path, self._start = path, start
        self._file = None
        self._restart()

    def _restart(self) -> None:
        self.close()
        self._file = open(self._path, "rb")  # noqa: SIM115 - kept open across reads, closed in close()
        self._file.seek(self._start)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._window = b""  # inflated bytes from _window_start
        self._window_start = 0
        self._ended = False

    def _fill(self, offset: int, end: int) -> bool:
        """Inflate until the window holds [offset, end); False when the data set ends first."""
        if offset < self._window_start:
            self._restart()
        while self._window_start + len(self._window) < end:
            if self._ended:
                return False
            keep_from = min(offset, self._window_start + len(self._window)) - self._window_start
            self._window_start += keep_from
            self._window = self._window[keep_from:] + self._inflate_some()
            if self._window_start + len(self._window) > MAX_INFLATED_BYTES:
                raise DataSetError("the deflated data set inflates to more than 4 GiB")
        return True

    def _inflate_some(self) -> bytes:
        if self._inflater.eof:  # the deflate stream ended; bytes after it are not data
            self._ended = True
            return b""
        data = self._inflater.unconsumed_tail or self._file.read(_READ_CHUNK)
        if not data:
            self._ended = True
            return self._inflater.flush()
        try:
            return self._inflater.decompress(data, _READ_CHUNK)
        except zlib.error as error:
            raise DataSetError(f"the deflated data set cannot be inflated: {error}") from None

    def has(self, end: int) -> bool:
        return self._fill(end - 1, end) if end > 0 else True

    def read(self, offset: int, length: int) -> bytes:
        if not self._fill(offset, offset + length):
            raise DataSetError("the data set ends inside an element")
        begin = offset - self._window_start
        return self._window[begin:begin + length]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Walked:
    header: list[tuple[int, int]]  # (start, end) of the top-level elements kept for the header
    values: dict[int, bytes]  # the raw values of the top-level elements asked for (short ones)


def check_data_set(source, implicit_vr: bool, little_endian: bool = True,
                   wanted: Container[int] = ()) -> Walked:
    """Walk the whole data set (see the module's docstring); raises DataSetError."""
    if not implicit_vr and source.has(8) and not source.read(4, 2).isupper():
        implicit_vr = True  # implicit VR despite its transfer syntax: pydicom reads it so too
    walker = _Walker(source, implicit_vr, little_endian)
    walked = Walked([], {})
    header_size = 0
    in_header = True
    offset = 0
    while source.has(offset + 8):
        start = offset
        tag, value, offset = walker.element(offset, depth=0)
        if tag >> 16 == 0xFFFE:
            raise DataSetError(f"item or delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at the top level")
        in_header = in_header and tag >> 16 < 0x7FE0
        if in_header and offset - start <= MAX_HEADER_ELEMENT:
            header_size += offset - start
            if header_size > MAX_HEADER_BYTES:
                raise DataSetError("the header (the data set before its pixel data) is larger than 16 MiB")
            walked.header.append((start, offset))
        if tag in wanted and offset - value <= 1024:
            walked.values[tag] = source.read(value, offset - value)
    for rest in range(7, 0, -1):  # fewer than 8 bytes left: zero padding is tolerated (as pydicom does)
        if source.has(offset + rest):
            if source.read(offset, rest).strip(b"\0"):
                raise DataSetError("the data set ends inside an element")
            break
    return walked


def header_bytes(source, ranges: list[tuple[int, int]]) -> bytes:
    """The kept header elements, to parse with pydicom (at most MAX_HEADER_BYTES)."""
    return b"".join(source.read(start, end - start) for start, end in ranges)


class _Walker:
    def __init__(self, source, implicit_vr: bool, little_endian: bool):
        self.source = source
        self._prefix = source.prefix
        self.implicit_vr = implicit_vr
        order = "<" if little_endian else ">"
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "L")
        self._items = struct.Struct(order + "HHL")  # item and delimiter tags with their length

    def element(self, offset: int, depth: int, implicit_vr: bool | None = None) -> tuple[int, int, int]:
        """Walk the element at ``offset``: (tag, offset of its value, offset after it)."""
        implicit = self.implicit_vr if implicit_vr is None else implicit_vr
        if offset + 12 <= len(self._prefix):  # the usual case, read in place
            data, at = self._prefix, offset
        else:
            data, at = self.source.read(offset, 8), 0
        group, element = self._tag.unpack_from(data, at)
        tag = group << 16 | element
        if group == 0xFFFE:
            return tag, offset + 8, offset + 8
        if implicit:
            vr, length, offset = None, self._u32.unpack_from(data, at + 4)[0], offset + 8
        else:
            vr = data[at + 4:at + 6]
            if vr in _LONG_VRS:
                if not at:
                    data, at = self.source.read(offset, 12), 0
                length, offset = self._u32.unpack_from(data, at + 8)[0], offset + 12
            else:
                length, offset = self._u16.unpack_from(data, at + 6)[0], offset + 8
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA or vr in (b"OB", b"OW"):
                return tag, offset, self._fragments(offset)
            if vr is None or vr in (b"SQ", b"UN"):  # an undefined-length UN is an implicit VR SQ
                return tag, offset, self._sequence(offset, None, depth + 1, implicit or vr == b"UN")
            raise DataSetError(f"undefined length with VR {vr!r}")
        end = offset + length
        if not self.source.has(end):
            raise DataSetError(f"element ({group:04X},{element:04X}) runs past the end of the data set")
        if vr == b"SQ":
            self._sequence(offset, end, depth + 1, implicit)
        elif (vr is None or vr == b"UN") and length >= 8 and tag != _PIXEL_DATA and self._starts_item(offset):
            # pydicom may parse such a value as a sequence: the nesting rule holds for it too
            try:
                self._sequence(offset, end, depth + 1, True)
            except _TooDeep:
                raise
            except DataSetError:
                pass  # not a sequence after all: an opaque value
        return tag, offset, end

    def _starts_item(self, offset: int) -> bool:
        group, element, _length = self._items.unpack_from(self.source.read(offset, 8))
        return group == 0xFFFE and element == 0xE000

    def _sequence(self, offset: int, end: int | None, depth: int, implicit: bool) -> int:
        """Walk a sequence's items from ``offset`` to ``end`` (defined length) or through its
        delimiter (undefined length); returns the offset after it."""
        if depth > MAX_DEPTH:
            raise _TooDeep(f"sequences nested deeper than {MAX_DEPTH}")
        while end is None or offset < end:
            group, element, length = self._items.unpack_from(self.source.read(offset, 8))
            tag = group << 16 | element
            offset += 8
            if tag == _SEQUENCE_END and end is None:
                return offset
            if tag != _ITEM:
                raise DataSetError(f"({group:04X},{element:04X}) where a sequence item belongs")
            if length == _UNDEFINED:
                while True:  # elements up to the item delimiter; each step moves forward
                    tag, _value, offset = self.element(offset, depth, implicit)
                    if tag == _ITEM_END:
                        break
                    if tag >> 16 == 0xFFFE:
                        raise DataSetError("a delimiter where an item's element belongs")
            else:
                item_end = offset + length
                if end is not None and item_end > end or not self.source.has(item_end):
                    raise DataSetError("a sequence item runs past the end of its sequence")
                while offset < item_end:
                    tag, _value, offset = self.element(offset, depth, implicit)
                    if tag >> 16 == 0xFFFE:
                        raise DataSetError("an item or delimiter inside a defined-length item")
                if offset != item_end:
                    raise DataSetError("an element runs past the end of its item")
        if offset != end:
            raise DataSetError("an item runs past the end of its sequence")
        return offset

    def _fragments(self, offset: int) -> int:
        """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
        while True:
            group, element, length = self._items.unpack_from(self.source.read(offset, 8))
            tag = group << 16 | element
            offset += 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM or length == _UNDEFINED:
                raise DataSetError("encapsulated pixel data without its fragment items")
            offset += length
            if not self.source.has(offset):
                raise DataSetError("a pixel data fragment runs past the end of the data set")


class _TooDeep(DataSetError):
    pass
