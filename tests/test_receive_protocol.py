"""The node's own Upper Layer receive loop against pynetdicom as the sending peer (another real
DICOM implementation) and against a raw socket that breaks the protocol on purpose."""

from __future__ import annotations

import socket
import sqlite3
import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_role
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import echoscu, skip_unless_tools, wait_for, write_tiny_ct
from tests.raw_peer import associate_rq, c_store_rq, p_data, raw_associate, read_exact

pytestmark = [pytest.mark.integration, skip_unless_tools("echoscu")]


def rows(node, query: str, *params):
    with sqlite3.connect(node.workdir / "node.db") as connection:
        return connection.execute(query, params).fetchall()


def associate(node, contexts, ext_neg=None):
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=ext_neg)
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_every_uncompressed_transfer_syntax_is_stored_as_sent(node_factory, tmp_path, syntax):
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "ct.dcm", rows=16, cols=16)
    dataset.file_meta.TransferSyntaxUID = syntax  # pynetdicom encodes it that way on the wire
    assoc = associate(node, [build_context(CTImageStorage, [syntax])])
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    [(path, stored_syntax)] = rows(node, "select path, transfer_syntax_uid from instance")
    assert stored_syntax == syntax
    stored = dcmread(node.workdir / "storage" / path)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert stored.StudyInstanceUID == dataset.StudyInstanceUID
    assert stored.pixel_array.tolist() == dataset.pixel_array.tolist()
    assert rows(node, "select modality, series_description from series") == [("CT", "tiny CT")]
    wait_for(lambda: "released: 1 instances stored, 0 refused" in node.log(), timeout=10)


def test_a_header_beyond_the_first_bytes_is_read_from_the_file(node_factory, tmp_path):
    # a 400 KB private element sorts before the study/series UIDs (group 0020)
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "ct.dcm")
    block = dataset.private_block(0x0009, "DICOM AI NODE TEST", create=True)
    block.add_new(0x01, "OB", bytes(400_000))
    assoc = associate(node, [build_context(CTImageStorage, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(dataset).Status == 0x0000
    finally:
        assoc.release()
    assert rows(node, "select series_instance_uid from instance") == [(dataset.SeriesInstanceUID,)]


def test_negotiation_accepts_storage_and_verification_only(node_factory):
    node = node_factory()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=[role])
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        # the first proposed transfer syntax: the node stores bytes as received
        assert accepted == {CTImageStorage: ExplicitVRLittleEndian, Verification: ImplicitVRLittleEndian}
        [rejected] = assoc.rejected_contexts
        assert rejected.abstract_syntax == PatientRootQueryRetrieveInformationModelFind
        assert assoc.acceptor.maximum_length > 16384
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


# -- a raw socket that breaks the protocol ---------------------------------------------


def test_an_abort_in_the_middle_of_a_data_set_stores_nothing(node_factory, tmp_path):
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "ct.dcm", rows=64, cols=64)
    encoded = data_set_bytes(tmp_path / "ct.dcm")
    connection = raw_associate(node)
    connection.sendall(p_data(True, True, c_store_rq(dataset.SOPInstanceUID)))
    connection.sendall(p_data(False, False, encoded[:len(encoded) // 2]))
    connection.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-ABORT
    connection.close()
    wait_for(lambda: "aborted by the peer" in node.log(), timeout=10)
    assert rows(node, "select count(*) from instance") == [(0,)]
    assert not list((node.workdir / "storage" / "instances").rglob("*.dcm"))
    # the node goes on serving
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0


def test_a_data_set_fragment_without_a_command_aborts_the_association(node_factory):
    node = node_factory()
    connection = raw_associate(node)
    connection.sendall(p_data(False, True, b"\x08\x00\x18\x00"))
    pdu_type, _ = struct.unpack(">BxL", read_exact(connection, 6))
    assert pdu_type == 0x07  # A-ABORT from the node
    connection.close()
    assert "data set fragment without a command" in node.log()
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0


def test_something_that_is_not_dicom_gets_an_abort(node_factory):
    node = node_factory()
    connection = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.recv(6)[:1] == b"\x07"
    connection.close()
    assert "expected an A-ASSOCIATE-RQ" in node.log()
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0


def data_set_bytes(path) -> bytes:
    """The data set of a Part 10 file, without preamble and file meta (Explicit VR LE)."""
    encoded = path.read_bytes()[128 + 4:]
    return encoded[12 + int.from_bytes(encoded[8:12], "little"):]


def read_response_status(connection) -> int:
    from pynetdicom.dsutils import decode

    pdu_type, length = struct.unpack(">BxL", read_exact(connection, 6))
    assert pdu_type == 0x04
    body = read_exact(connection, length)
    return decode(BytesIO(body[6:]), True, True).Status


def test_a_data_set_that_contradicts_its_request_is_refused(node_factory, tmp_path):
    node = node_factory()
    write_tiny_ct(tmp_path / "ct.dcm")
    connection = raw_associate(node)
    connection.sendall(p_data(True, True, c_store_rq(generate_uid())))  # another SOP Instance UID
    connection.sendall(p_data(False, True, data_set_bytes(tmp_path / "ct.dcm")))
    assert read_response_status(connection) == 0xA900
    connection.close()
    assert "differs from the C-STORE request" in node.log()
    assert rows(node, "select count(*) from instance") == [(0,)]


def test_a_c_cancel_is_not_answered_and_the_association_goes_on(node_factory, tmp_path):
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "ct.dcm")
    cancel = Dataset()
    cancel.CommandField = 0x0FFF
    cancel.MessageIDBeingRespondedTo = 1
    cancel.CommandDataSetType = 0x0101
    cancel.CommandGroupLength = len(encode(cancel, True, True))
    connection = raw_associate(node)
    connection.sendall(p_data(True, True, encode(cancel, True, True)))
    connection.sendall(p_data(True, True, c_store_rq(dataset.SOPInstanceUID)))
    connection.sendall(p_data(False, True, data_set_bytes(tmp_path / "ct.dcm")))
    assert read_response_status(connection) == 0x0000  # the first answer is the C-STORE's
    connection.close()
    assert rows(node, "select sop_instance_uid from instance") == [(dataset.SOPInstanceUID,)]


# -- association negotiation and odd commands (issue 10) -----------------------------------


def test_a_called_ae_title_other_than_the_nodes_is_rejected_unless_any_is_allowed(node_factory):
    node = node_factory()
    result = echoscu("127.0.0.1", node.port, "NOT_THIS_NODE", calling_ae="ECHOSCU")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert "called AE title 'NOT_THIS_NODE' is not this node's" in node.log()
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0

    relaxed = node_factory(node_extra="allow_any_called_ae = true")
    assert echoscu("127.0.0.1", relaxed.port, "NOT_THIS_NODE", calling_ae="ECHOSCU").returncode == 0


def associate_reply(node, pdu: bytes) -> tuple[int, bytes]:
    """(PDU type, body) of the node's answer to an A-ASSOCIATE-RQ sent on a fresh connection."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as connection:
        connection.sendall(pdu)
        pdu_type, length = struct.unpack(">BxL", read_exact(connection, 6))
        return pdu_type, read_exact(connection, length)


@pytest.mark.parametrize("abstract_syntaxes", [(), (PatientRootQueryRetrieveInformationModelFind,)],
                         ids=["no context", "no acceptable context"])
def test_an_association_without_a_usable_presentation_context_is_rejected(node_factory, abstract_syntaxes):
    node = node_factory()
    pdu_type, body = associate_reply(node, associate_rq(abstract_syntaxes))
    assert pdu_type == 0x03  # A-ASSOCIATE-RJ
    assert tuple(body[1:4]) == (0x01, 0x01, 0x01)  # permanent, service user, no reason given
    assert "no acceptable presentation context" in node.log()
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0


def release(connection) -> None:
    connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    pdu_type, length = struct.unpack(">BxL", read_exact(connection, 6))
    assert pdu_type == 0x06  # A-RELEASE-RP
    read_exact(connection, length)


def test_a_non_ascii_affected_sop_instance_uid_gets_a_failure_status_and_the_association_goes_on(
        node_factory, tmp_path):
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "ct.dcm")
    placeholder = "1.2.826.0.1.9999"
    command = c_store_rq(placeholder)
    assert command.count(placeholder.encode()) == 1
    command = command.replace(placeholder.encode(), "1.2.826.0.1.éé".encode())  # same length
    connection = raw_associate(node)
    connection.sendall(p_data(True, True, command))
    connection.sendall(p_data(False, True, data_set_bytes(tmp_path / "ct.dcm")))
    assert read_response_status(connection) == 0x0117  # Invalid SOP Instance
    # the same association goes on: a good instance is stored, then a normal release
    connection.sendall(p_data(True, True, c_store_rq(dataset.SOPInstanceUID)))
    connection.sendall(p_data(False, True, data_set_bytes(tmp_path / "ct.dcm")))
    assert read_response_status(connection) == 0x0000
    release(connection)
    connection.close()
    assert rows(node, "select sop_instance_uid from instance") == [(dataset.SOPInstanceUID,)]
    assert "Affected SOP Instance UID is not a valid UID" in node.log()
    assert "Traceback" not in node.log()
