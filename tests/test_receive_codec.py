"""The receive path's hand-written codecs, read back by pydicom/pynetdicom."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from dicom_ai_node.receive.commands import C_STORE_RQ, CommandError, decode_command, encode_response
from dicom_ai_node.receive.incoming import file_meta


def c_store_rq() -> bytes:
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    command.CommandField = C_STORE_RQ
    command.MessageID = 513
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4.5"
    return encode(command, True, True)


def test_a_c_store_request_is_decoded():
    command = decode_command(c_store_rq())
    assert (command.command_field, command.message_id, command.has_data_set) == (C_STORE_RQ, 513, True)
    assert command.affected_sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert command.affected_sop_instance_uid == "1.2.3.4.5"


@pytest.mark.parametrize("cut", [3, 10, 40])
def test_a_truncated_command_set_is_an_error(cut):
    with pytest.raises(CommandError):
        decode_command(c_store_rq()[:-cut])


def test_the_response_is_a_valid_command_set():
    request = decode_command(c_store_rq())
    response = decode(BytesIO(encode_response(request, 0xA700, "Out of resources: disk\\full")), True, True)
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 513
    assert response.CommandDataSetType == 0x0101
    assert response.Status == 0xA700
    assert response.ErrorComment == "Out of resources: disk/full"  # no backslash in LO
    assert response.AffectedSOPInstanceUID == "1.2.3.4.5"
    # the group length counts every element after it
    assert response.CommandGroupLength == len(encode_response(request, 0xA700, "Out of resources: disk\\full")) - 12


def test_file_meta_is_read_back_by_pydicom():
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "SCANNER1",
                     "1.2.826.0.1.3680043.8.498.1", "AI_NODE_010")
    data_set = b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"  # (0008,0018) SOPInstanceUID
    read = dcmread(BytesIO(meta + data_set))
    assert read.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert read.file_meta.SourceApplicationEntityTitle == "SCANNER1"
    assert read.file_meta.ImplementationVersionName == "AI_NODE_010"
    assert read.SOPInstanceUID == "1.2.3.4"


def test_an_incoming_instance_on_a_vanished_storage_folder_reports_instead_of_raising(tmp_path):
    import shutil

    from dicom_ai_node.receive.incoming import IncomingInstance
    from dicom_ai_node.storage import Storage, StorageError

    storage = Storage(tmp_path / "storage")
    shutil.rmtree(tmp_path / "storage")
    instance = IncomingInstance(storage, b"meta")
    instance.write(memoryview(b"data set bytes"))  # later fragments are read and dropped
    instance.finish()
    assert isinstance(instance.error, StorageError)
    assert instance.size == len(b"data set bytes")
