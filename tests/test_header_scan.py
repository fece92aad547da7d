"""The receiver's quick header scan agrees with pydicom, or steps aside (returns None)."""

from __future__ import annotations

import io
import warnings

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicom_ai_node.receive.header_scan import WANTED, scan_header
from tests.conftest import requires_shared_data, shared_dicom_files


def header(with_sequences: bool = True) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.SOPInstanceUID = "1.2.3.4.5"
    dataset.StudyDescription = "CHEST"
    if with_sequences:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = "9.9.9"
        nested = Dataset()
        nested.CodeValue = "T-D3000"
        item.PurposeOfReferenceCodeSequence = Sequence([nested])
        dataset.ReferencedImageSequence = Sequence([item, Dataset()])
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.4"
    dataset.InstanceNumber = 17
    dataset.Rows = 4
    return dataset


def encode(dataset: Dataset, implicit: bool, undefined_lengths: bool) -> bytes:
    for element in dataset.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined_lengths
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined_lengths
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, dataset)
    return buffer.getvalue()


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("undefined_lengths", [True, False])
def test_the_wanted_values_are_found_past_sequences(implicit, undefined_lengths):
    # a bytearray, as the receiver keeps the first bytes of a data set
    scanned = scan_header(bytearray(encode(header(), implicit, undefined_lengths)), implicit)
    assert scanned is not None
    assert scanned.SOPInstanceUID == "1.2.3.4.5"  # not the referenced image's 9.9.9
    assert scanned.StudyInstanceUID == "1.2.3"
    assert scanned.SeriesInstanceUID == "1.2.3.4"
    assert scanned.InstanceNumber == 17
    assert "StudyDescription" not in scanned


def test_bytes_that_end_before_the_wanted_values_step_aside():
    data = encode(header(), True, True)
    assert scan_header(data[:40], True) is None
    assert scan_header(data[:-2], True) is not None  # only the value of Rows, after the wanted ones, is cut


def test_a_missing_uid_steps_aside():
    dataset = header(with_sequences=False)
    del dataset.SeriesInstanceUID
    assert scan_header(encode(dataset, False, False), False) is None


@requires_shared_data
def test_agrees_with_pydicom_on_every_little_endian_file_in_shared_data():
    from pydicom.filereader import _read_file_meta_info, read_preamble

    checked = 0
    for path in shared_dicom_files(max_bytes=50e6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = dcmread(path, stop_before_pixels=True)
            syntax = reference.file_meta.TransferSyntaxUID
            if not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax.is_deflated:
                continue
            raw = path.read_bytes()
            stream = io.BytesIO(raw)
            read_preamble(stream, False)
            _read_file_meta_info(stream)
        except Exception:
            continue  # not DICOM, or not something pydicom reads: nothing to compare
        scanned = scan_header(raw[stream.tell():stream.tell() + 256 * 1024], syntax.is_implicit_VR)
        if scanned is None:
            continue
        checked += 1
        for keyword in WANTED.values():
            expected = reference.get(keyword)
            expected = str(expected).strip("\0 ") if expected is not None else ""
            assert str(scanned.get(keyword, "")).strip("\0 ") == expected, f"{path}: {keyword}"
    assert checked > 500
