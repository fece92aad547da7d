"""The DICOM Upper Layer (PS3.8) as the Storage SCP needs it: reading PDUs, negotiating.

The receive path reads PDUs straight from the socket and streams each P-DATA value to its
destination without collecting whole messages: no per-fragment queues or polling threads.
Association negotiation reuses pynetdicom's PDU codec and presentation-context negotiation,
so what is accepted and how the A-ASSOCIATE-AC is encoded is what pynetdicom would send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID, generate_uid
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.sop_class import Verification

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# Deterministic, under pydicom's UID root: the same for every node of this software.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicom-ai-node implementation class"])
IMPLEMENTATION_VERSION_NAME = "AI_NODE_010"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = {ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT}

# The largest P-DATA-TF we accept (announced in the A-ASSOCIATE-AC). Values are streamed,
# so this bounds nothing in memory; large PDUs mean fewer headers and reads per image.
MAX_PDU_RECEIVED = 4 * 2**20
# An A-ASSOCIATE-RQ is a few KB; refuse absurd ones before reading them into memory.
MAX_ASSOCIATE_RQ = 1 * 2**20

# A-RELEASE-RQ and A-RELEASE-RP have a fixed length (PS3.8 9.3.6, 9.3.7)
RELEASE_PDU_LENGTH = 4

# A-ABORT source / reason (PS3.8 9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED, REASON_UNRECOGNISED_PDU, REASON_UNEXPECTED_PDU = 0x00, 0x01, 0x02
REASON_INVALID_PARAMETER = 0x06

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


def read_exact(reader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError("the peer closed the connection")
    return data


def read_pdu_header(reader) -> tuple[int, int] | None:
    """(PDU type, length) of the next PDU; None when the peer closed the connection cleanly."""
    data = reader.read(_PDU_HEADER.size)
    if not data:
        return None
    if len(data) != _PDU_HEADER.size:
        raise ConnectionError("the peer closed the connection inside a PDU header")
    return _PDU_HEADER.unpack(data)


def read_pdv_header(reader) -> tuple[int, int, bool, bool]:
    """(value length, presentation context ID, is command, is last fragment) of a PDV item."""
    item_length, context_id, control = _PDV_HEADER.unpack(read_exact(reader, _PDV_HEADER.size))
    if item_length < 2:
        raise ProtocolError("PDV item shorter than its own header")
    return item_length - 2, context_id, bool(control & 0x01), bool(control & 0x02)


PDV_HEADER_SIZE = _PDV_HEADER.size


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF with one PDV: a whole command message (the responses we send are small)."""
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv


def release_rp() -> bytes:
    return _PDU_HEADER.pack(RELEASE_RP, 4) + bytes(4)


def abort(source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(ABORT, 4) + bytes([0, 0, source, reason])


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(ASSOCIATE_RJ, 4) + bytes([0, result, source, reason])


# A-ASSOCIATE-RJ (result, source, reason) - PS3.8 9.3.4
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


@dataclass
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    primitive: A_ASSOCIATE
    protocol_version_ok: bool

    @property
    def proposed_contexts(self) -> int:
        return len(self.primitive.presentation_context_definition_list or [])


def decode_associate_rq(pdu: bytes) -> AssociationRequest:
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(pdu)
        primitive = rq.to_primitive()
    except Exception as error:  # pynetdicom raises assorted errors on malformed items
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {error}") from None
    return AssociationRequest(
        calling_ae_title=str(primitive.calling_ae_title or "").strip(),
        called_ae_title=str(primitive.called_ae_title or "").strip(),
        primitive=primitive,
        protocol_version_ok=bool(rq.protocol_version & 0x0001),
    )


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


def negotiate(request: AssociationRequest) -> tuple[bytes, dict[int, AcceptedContext]]:
    """The A-ASSOCIATE-AC PDU and the accepted presentation contexts by ID.

    Verification, and every storage SOP class (private and unknown ones included) in the
    first transfer syntax the requestor proposes: the node stores bytes as received.
    """
    requested = request.primitive.presentation_context_definition_list
    roles = {}
    for item in request.primitive.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    verification = PresentationContext()
    verification.abstract_syntax = Verification
    verification.transfer_syntax = list(DEFAULT_TRANSFER_SYNTAXES)
    results, role_items = negotiate_unrestricted(requested, [verification], roles)

    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = request.primitive.calling_ae_title
    primitive.called_ae_title = request.primitive.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = [_max_length(), _implementation_uid(), _implementation_version(),
                                  *role_items]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    accepted = {
        int(cx.context_id): AcceptedContext(int(cx.context_id), str(cx.abstract_syntax),
                                            str(cx.transfer_syntax[0]))
        for cx in results if cx.result == 0x00
    }
    return ac.encode(), accepted


def _max_length() -> MaximumLengthNotification:
    item = MaximumLengthNotification()
    item.maximum_length_received = MAX_PDU_RECEIVED
    return item


def _implementation_uid() -> ImplementationClassUIDNotification:
    item = ImplementationClassUIDNotification()
    item.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    return item


def _implementation_version() -> ImplementationVersionNameNotification:
    item = ImplementationVersionNameNotification()
    item.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return item
