"""The walk over a received data set (receive/data_set_check.py): whole data sets pass in every
uncompressed transfer syntax with their header found, and data sets cut short, nested too deep
or with a giant header are refused or kept out of memory. On files, as the receiver has them."""

from __future__ import annotations

import struct
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicom_ai_node.receive.data_set_check import (
    MAX_DEPTH,
    MAX_HEADER_ELEMENT,
    DataSetError,
    FileSource,
    InflatedSource,
    check_data_set,
    header_bytes,
)
from dicom_ai_node.receive.header_scan import WANTED, header_from_values

META = b"M" * 40  # stands for the file meta header: the data set starts after it


def data_set(pixels: int = 64, depth: int = 2) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    dataset.SOPInstanceUID = "1.2.3.4.5"
    dataset.StudyDescription = "CHEST"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "9.9.9"
    inner = item
    for _ in range(depth - 1):
        nested = Dataset()
        nested.CodeValue = "T-D3000"
        inner.PurposeOfReferenceCodeSequence = Sequence([nested])
        inner = nested
    dataset.ReferencedImageSequence = Sequence([item, Dataset()])
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.4"
    dataset.InstanceNumber = 17
    dataset.Rows = 4
    dataset.BitsAllocated = 8
    dataset.PixelData = bytes(range(256)) * (pixels // 256) + bytes(pixels % 256)
    return dataset


def encode(dataset: Dataset, implicit: bool = False, little: bool = True, undefined: bool = False) -> bytes:
    for element in dataset.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def file_source(tmp_path, data: bytes, prefix_bytes: int = 256 * 1024) -> FileSource:
    path = tmp_path / "incoming.tmp"
    path.write_bytes(META + data)
    return FileSource(path, len(META), len(data), bytearray(data[:prefix_bytes]))


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("prefix_bytes", [256 * 1024, 0])  # header in memory, or read from the file
def test_a_whole_data_set_passes_with_its_header(tmp_path, implicit, little, undefined, prefix_bytes):
    data = encode(data_set(), implicit, little, undefined)
    source = file_source(tmp_path, data, prefix_bytes)
    walked = check_data_set(source, implicit, little, WANTED)
    header = read_dataset(DicomBytesIO(header_bytes(source, walked.header)), implicit, little)
    source.close()
    assert header.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "9.9.9"
    assert header.Rows == 4 and "PixelData" not in header
    quick = header_from_values(walked.values)
    assert (quick.SOPInstanceUID, quick.SeriesInstanceUID, quick.InstanceNumber) == ("1.2.3.4.5", "1.2.3.4", 17)


def test_a_deflated_data_set_is_walked_without_inflating_it_whole(tmp_path):
    data = encode(data_set(pixels=3 * 2**20))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = tmp_path / "incoming.tmp"
    path.write_bytes(META + compressor.compress(data) + compressor.flush())
    source = InflatedSource(path, len(META))
    walked = check_data_set(source, False, True, WANTED)
    header = read_dataset(DicomBytesIO(header_bytes(source, walked.header)), False, True)
    source.close()
    assert header.SOPInstanceUID == "1.2.3.4.5" and "PixelData" not in header
    path.write_bytes(META + zlib.compress(data)[2:-4][:-1000])  # cut short
    with pytest.raises(DataSetError):
        check_data_set(InflatedSource(path, len(META)), False, True)


def test_implicit_vr_under_an_explicit_transfer_syntax_is_walked_as_pydicom_reads_it(tmp_path):
    data = encode(data_set(), implicit=True)
    source = file_source(tmp_path, data)
    walked = check_data_set(source, False, True, WANTED)
    header = read_dataset(DicomBytesIO(header_bytes(source, walked.header)), False, True)
    source.close()
    assert header.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "9.9.9"


def test_bytes_after_the_end_of_a_deflate_stream_end_the_walk(tmp_path):
    data = encode(data_set(pixels=300_000))  # more than one inflated chunk
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = tmp_path / "incoming.tmp"
    path.write_bytes(META + compressor.compress(data) + compressor.flush() + b"trailing")
    walked = check_data_set(InflatedSource(path, len(META)), False, True, WANTED)
    assert header_from_values(walked.values).SOPInstanceUID == "1.2.3.4.5"


@pytest.mark.parametrize("missing", [1, 2, 7, 8, 100])
def test_pixel_data_cut_short_is_refused(tmp_path, missing):
    data = encode(data_set(pixels=256))
    with pytest.raises(DataSetError, match=r"\(7FE0,0010\) runs past the end"):
        check_data_set(file_source(tmp_path, data[:-missing]), False, True)


def test_zero_padding_after_the_last_element_is_tolerated_other_bytes_are_not(tmp_path):
    data = encode(data_set())
    check_data_set(file_source(tmp_path, data + b"\0\0"), False, True)
    with pytest.raises(DataSetError, match="ends inside an element"):
        check_data_set(file_source(tmp_path, data + b"\xe0\x7f\x10\x00"), False, True)


@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("implicit", [True, False])
def test_sequences_may_nest_max_depth_deep_and_no_deeper(tmp_path, implicit, undefined):
    deepest = encode(data_set(depth=MAX_DEPTH), implicit, undefined=undefined)
    check_data_set(file_source(tmp_path, deepest), implicit, True)
    too_deep = encode(data_set(depth=MAX_DEPTH + 1), implicit, undefined=undefined)
    with pytest.raises(DataSetError, match=f"nested deeper than {MAX_DEPTH}"):
        check_data_set(file_source(tmp_path, too_deep), implicit, True)


def test_a_private_value_that_is_a_sequence_in_disguise_is_nested_by_the_same_rule(tmp_path):
    # implicit VR, a private tag the dictionary does not know, defined lengths: pydicom would
    # still parse it as a sequence, so the walk counts its depth too
    inner = b""
    for _ in range(MAX_DEPTH + 1):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HHL", 0x0029, 0x1010, len(item)) + item
    data = encode(data_set(), implicit=True)
    with pytest.raises(DataSetError, match="nested deeper"):
        check_data_set(file_source(tmp_path, inner + data), True, True)


def test_an_opaque_private_value_that_only_starts_like_an_item_is_kept_as_a_value(tmp_path):
    value = struct.pack("<HHL", 0xFFFE, 0xE000, 1000) + b"not a sequence"
    data = struct.pack("<HHL", 0x0029, 0x1010, len(value)) + value + encode(data_set(), implicit=True)
    check_data_set(file_source(tmp_path, data), True, True)


def test_a_giant_value_is_left_out_of_the_header(tmp_path):
    big = MAX_HEADER_ELEMENT + 2
    data = (struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"TEST"
            + struct.pack("<HH2sHL", 0x0009, 0x1000, b"OB", 0, big) + bytes(big) + encode(data_set()))
    source = file_source(tmp_path, data)
    walked = check_data_set(source, False, True, WANTED)
    header = header_bytes(source, walked.header)
    source.close()
    assert len(header) < 4096
    assert read_dataset(DicomBytesIO(header), False, True).SOPInstanceUID == "1.2.3.4.5"


def test_an_item_at_the_top_level_is_refused(tmp_path):
    data = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + encode(data_set())
    with pytest.raises(DataSetError, match="at the top level"):
        check_data_set(file_source(tmp_path, data), False, True)
