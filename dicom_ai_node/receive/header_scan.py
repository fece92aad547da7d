"""The few header values the receiver needs for every instance, read without pydicom.

For an instance of a series the node already knows, only its UIDs, InstanceNumber and
NumberOfFrames are indexed. pydicom's parser costs ~0.4 ms for a CT header (it builds every
element); this walk over the raw Little Endian bytes skips what it does not need and stops
after (0028,0008). Anything it does not handle (big endian, an undefined-length UN, bytes
that end too early) returns None and the caller parses with pydicom instead.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset

WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200013: "InstanceNumber",
    0x00280008: "NumberOfFrames",
}
_REQUIRED = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)
_LAST_WANTED = 0x00280008
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# explicit VRs with 2 reserved bytes and a 32-bit length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")


class _Unusual(Exception):
    pass


def scan_header(data: bytes | bytearray, implicit_vr: bool) -> Dataset | None:
    """A Dataset with the WANTED elements present in ``data`` (a Little Endian data set, or
    its first bytes), or None when the bytes need the full parser."""
    values: dict[int, bytes] = {}
    try:
        _walk(data, 0, implicit_vr, values, top_level=True)
    except (_Unusual, struct.error):
        return None
    return header_from_values(values)


def header_from_values(values: dict[int, bytes]) -> Dataset | None:
    """A Dataset of the WANTED elements' raw values, or None when pydicom should look."""
    if not all(tag in values for tag in _REQUIRED):
        return None  # let pydicom look (and word the refusal) when a UID seems missing
    header = Dataset()
    for tag, raw in values.items():
        text = raw.decode("ascii", "replace").strip("\0 ")
        if text:
            try:
                setattr(header, WANTED[tag], text)
            except (ValueError, TypeError):  # e.g. an InstanceNumber that is not a number
                return None
    return header


def _walk(data: bytes, offset: int, implicit_vr: bool, values: dict[int, bytes], top_level: bool) -> int:
    """Walk elements from ``offset``: at the top level until the last wanted tag is passed,
    inside an undefined-length item until its delimiter. Returns the offset after it."""
    end = len(data)
    while True:
        if offset + 8 > end:
            raise _Unusual("the bytes end inside the header")
        group, element = _TAG.unpack_from(data, offset)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if top_level:
                raise _Unusual("item delimiter at the top level")
            return offset + 8
        if top_level and tag > _LAST_WANTED:
            return offset
        if implicit_vr:
            vr, length, offset = None, _U32.unpack_from(data, offset + 4)[0], offset + 8
        else:
            vr = bytes(data[offset + 4:offset + 6])
            if vr in _LONG_VRS:
                length, offset = _U32.unpack_from(data, offset + 8)[0], offset + 12
            else:
                length, offset = _U16.unpack_from(data, offset + 6)[0], offset + 8
        if length == _UNDEFINED:
            if vr is None or vr == b"SQ":
                offset = _skip_sequence(data, offset, implicit_vr)
            elif vr in (b"OB", b"OW"):
                offset = _skip_sequence(data, offset, implicit_vr, fragments=True)
            else:
                raise _Unusual(f"undefined length with VR {vr!r}")
            continue
        if offset + length > end:
            raise _Unusual("the bytes end inside a value")
        if top_level and tag in WANTED:
            values[tag] = data[offset:offset + length]
        offset += length


def _skip_sequence(data: bytes, offset: int, implicit_vr: bool, fragments: bool = False) -> int:
    """Skip the items of an undefined-length sequence (or encapsulated fragments) up to and
    including the sequence delimiter."""
    while True:
        if offset + 8 > len(data):
            raise _Unusual("the bytes end inside a sequence")
        group, element = _TAG.unpack_from(data, offset)
        tag = group << 16 | element
        length = _U32.unpack_from(data, offset + 4)[0]
        offset += 8
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _Unusual(f"unexpected tag {tag:08X} in a sequence")
        if length == _UNDEFINED:
            if fragments:
                raise _Unusual("fragment of undefined length")
            offset = _walk(data, offset, implicit_vr, {}, top_level=False)
        else:
            offset += length
