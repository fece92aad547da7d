"""DIMSE command sets (PS3.7 section 9, Annex E) for C-ECHO and C-STORE, as the SCP sees them.

A command set is a flat group-0000 data set in Implicit VR Little Endian: reading it is a
loop over (tag, length, value), and writing a response is the same in reverse. Doing it by
hand here costs microseconds per image instead of a full pydicom round trip.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATA_SET = 0x0101

# command-set tags (element numbers of group 0000)
_COMMAND_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED_TO = 0x0120
_COMMAND_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE_UID = 0x1000

_ELEMENT_HEADER = struct.Struct("<HHL")


class CommandError(ValueError):
    """A command set that cannot be read."""


@dataclass(frozen=True)
class Command:
    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str


def decode_command(data: bytes) -> Command:
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            raise CommandError("command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000 or length > end - offset:
            raise CommandError(f"unexpected element ({group:04X},{element:04X}) in the command set")
        values[element] = data[offset:offset + length]
        offset += length
    try:
        command_field = _us(values[_COMMAND_FIELD])
        data_set_type = _us(values[_COMMAND_DATA_SET_TYPE])
    except (KeyError, struct.error):
        raise CommandError("command set without a valid Command Field or Data Set Type") from None
    try:
        message_id = _us(values.get(_MESSAGE_ID, b"\0\0"))
    except struct.error:
        raise CommandError("command set with an invalid Message ID") from None
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_data_set=data_set_type != NO_DATA_SET,
        affected_sop_class_uid=_ui(values.get(_AFFECTED_SOP_CLASS_UID, b"")),
        affected_sop_instance_uid=_ui(values.get(_AFFECTED_SOP_INSTANCE_UID, b"")),
    )


def encode_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The response to ``request`` (C-STORE-RSP, C-ECHO-RSP, or the response of any other
    command with the same Command Field | 0x8000), with no data set. The request's UIDs are
    echoed when they can be (they are optional in a response): a UID that is not ASCII is left out."""
    elements = []
    if _echoable(request.affected_sop_class_uid):
        elements.append(_element(_AFFECTED_SOP_CLASS_UID, _ui_bytes(request.affected_sop_class_uid)))
    elements.append(_element(_COMMAND_FIELD, struct.pack("<H", request.command_field | 0x8000)))
    elements.append(_element(_MESSAGE_ID_RESPONDED_TO, struct.pack("<H", request.message_id)))
    elements.append(_element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)))
    elements.append(_element(_STATUS, struct.pack("<H", status)))
    if error_comment:
        elements.append(_element(_ERROR_COMMENT, _lo_bytes(error_comment)))
    if _echoable(request.affected_sop_instance_uid):
        elements.append(_element(_AFFECTED_SOP_INSTANCE_UID, _ui_bytes(request.affected_sop_instance_uid)))
    body = b"".join(elements)
    return _element(_COMMAND_GROUP_LENGTH, struct.pack("<L", len(body))) + body


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _us(value: bytes) -> int:
    return struct.unpack("<H", value)[0]


def _ui(value: bytes) -> str:
    # a byte that is not ASCII becomes U+FFFD: such a UID never passes a UID check or reaches a response
    return value.decode("ascii", "replace").rstrip("\0 ").strip()


def _echoable(uid: str) -> bool:
    return bool(uid) and uid.isascii() and len(uid) <= 64


def _ui_bytes(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _lo_bytes(text: str) -> bytes:
    # LO: at most 64 characters, no backslash, padded with a space to an even length
    data = text.replace("\\", "/")[:64].encode("ascii", "replace")
    return data + b" " if len(data) % 2 else data
