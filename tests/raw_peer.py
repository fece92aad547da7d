"""A DICOM peer by hand, on a raw socket: PDUs built byte for byte so tests can send what a
well-behaved library never would (broken, slow or huge), and read the node's answers."""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from tests.node_process import NODE_AE


def associate_rq(abstract_syntaxes=(CTImageStorage,), called_ae: str = NODE_AE) -> bytes:
    """An A-ASSOCIATE-RQ PDU, contexts 1, 3, ... in Explicit VR LE, by hand."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = called_ae
    contexts = []
    for index, abstract_syntax in enumerate(abstract_syntaxes):
        context = build_context(abstract_syntax, [ExplicitVRLittleEndian])
        context.context_id = 2 * index + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return rq.encode()


def raw_associate(node, timeout: float = 10) -> socket.socket:
    """An association for CT Image Storage (context 1, Explicit VR LE), accepted by the node."""
    connection = socket.create_connection(("127.0.0.1", node.port), timeout=timeout)
    connection.sendall(associate_rq())
    pdu_type, length = struct.unpack(">BxL", read_exact(connection, 6))
    assert pdu_type == 0x02, "the node did not accept the association"  # A-ASSOCIATE-AC
    read_exact(connection, length)
    return connection


def read_exact(connection, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        assert chunk, "the node closed the connection"
        data += chunk
    return data


def p_data(is_command: bool, last: bool, value: bytes | memoryview) -> bytes:
    """A P-DATA-TF PDU with one PDV on presentation context 1."""
    pdv = struct.pack(">LBB", len(value) + 2, 1, (1 if is_command else 0) | (2 if last else 0)) + bytes(value)
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def c_store_rq(sop_uid: str) -> bytes:
    """The command set of a C-STORE-RQ for a CT image, with a data set to follow."""
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_uid
    command.CommandGroupLength = len(encode(command, True, True))
    return encode(command, True, True)
