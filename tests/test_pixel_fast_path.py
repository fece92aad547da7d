"""load_series reads plain native pixel data straight from the file: it must give exactly
what pydicom's decoder gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array

from dicom_ai_node.imaging.load import _stored_frames, read_header
from tests.conftest import requires_shared_data, shared_dicom_files
from tests.peers import write_tiny_ct


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_unused_high_bits_are_ignored_as_pydicom_does(tmp_path, signed, bits_stored):
    dataset = write_tiny_ct(tmp_path / "ct.dcm", rows=256, cols=256)  # pixel data over 64 KB: read from its offset
    rng = np.random.default_rng(1)
    dataset.PixelRepresentation = int(signed)
    dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
    raw = rng.integers(0, 2**16, size=(256, 256), dtype=np.uint16)  # garbage in the unused bits too
    dataset.PixelData = raw.tobytes()
    dataset.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    header = read_header(tmp_path / "ct.dcm")
    assert header.native_pixel_data_offset is not None  # the fast path is taken
    [fast] = list(_stored_frames(str(tmp_path / "ct.dcm"), header, (256, 256)))
    expected = dcmread(tmp_path / "ct.dcm").pixel_array
    assert fast.dtype == expected.dtype
    assert np.array_equal(fast, expected)
    assert "PixelData" not in header  # results never carry (or load) the pixels of their sources


@requires_shared_data
def test_same_pixels_as_pydicom_for_every_native_single_frame_file_in_shared_data():
    compared = 0
    for path in shared_dicom_files(max_bytes=20e6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = read_header(path)
                if header.native_pixel_data_offset is None or int(header.get("NumberOfFrames", 1) or 1) != 1:
                    continue
                if int(header.get("SamplesPerPixel", 1)) != 1:
                    continue
                expected = pixel_array(str(path))
        except Exception:
            continue  # pydicom cannot decode it either: nothing to compare
        stored = list(_stored_frames(str(path), header, expected.shape))
        assert np.array_equal(stored[0], expected), path
        compared += 1
    assert compared > 100
