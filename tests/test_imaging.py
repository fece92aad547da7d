"""load_series: sorting, geometry, rescale, enhanced multi-frame, and every refusal."""

from __future__ import annotations


import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.imaging.volume import VolumeError
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dciodvfy import dciodvfy_errors
from tests.synthetic import AXIAL, CORONAL, OBLIQUE, SAGITTAL, make_ct_series


def _edit(path, **values):
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL, OBLIQUE])
@pytest.mark.parametrize("reverse", [False, True])
def test_volume_matches_phantom_in_any_orientation_and_file_order(tmp_path, orientation, reverse):
    series = make_ct_series(tmp_path, shape=(8, 20, 24), spacing=(3.0, 0.9, 0.6),
                            orientation=orientation, reverse=reverse)
    volume = load_series(series.paths)

    assert volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels, series.hu)
    assert [f.sop_instance_uid for f in volume.source_frames] == series.sop_instance_uids
    assert volume.spacing == pytest.approx((3.0, 0.9, 0.6), abs=1e-5)
    np.testing.assert_allclose(volume.row_direction, orientation[:3], atol=1e-6)
    np.testing.assert_allclose(volume.column_direction, orientation[3:], atol=1e-6)
    np.testing.assert_allclose(volume.slice_direction, np.cross(orientation[:3], orientation[3:]), atol=1e-6)
    # slice i sits where its source file says it does
    for index in (0, 7):
        header = read_header(volume.source_frames[index].path)
        np.testing.assert_allclose(volume.slice_position(index), [float(v) for v in header.ImagePositionPatient],
                                   atol=1e-3)
    assert volume.modality == "CT"
    assert volume.attributes["BodyPartExamined"] == "CHEST"
    assert "SOPInstanceUID" not in volume.attributes  # per-image values are not series attributes


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    series = make_ct_series(tmp_path, shape=(3, 8, 8), noise_hu=0)
    for path in series.paths:
        _edit(path, RescaleSlope="2", RescaleIntercept="-2048")
    volume = load_series(series.paths)
    np.testing.assert_array_equal(volume.pixels, 2 * (series.hu + 1024) - 2048)


def test_compressed_files_decode_to_the_same_values(tmp_path):
    series = make_ct_series(tmp_path, shape=(4, 16, 16))
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_series(series.paths).pixels, series.hu)


def test_synthetic_files_pass_dciodvfy(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 16, 16), orientation=OBLIQUE)
    assert dciodvfy_errors(series.paths[0]) == []


def test_same_seed_gives_same_uids(tmp_path):
    first = make_ct_series(tmp_path / "a", shape=(2, 8, 8))
    second = make_ct_series(tmp_path / "b", shape=(2, 8, 8))
    assert first.sop_instance_uids == second.sop_instance_uids


# --- refusals: each must say what is wrong ----------------------------------------------------


def _refusal(paths) -> str:
    with pytest.raises(VolumeError) as error:
        load_series(paths)
    return str(error.value)


def test_refuses_duplicate_positions(tmp_path):
    series = make_ct_series(tmp_path, shape=(4, 8, 8))
    position = read_header(series.paths[1]).ImagePositionPatient
    _edit(series.paths[2], ImagePositionPatient=position)
    assert "same position" in _refusal(series.paths)


def test_refuses_a_gap(tmp_path):
    series = make_ct_series(tmp_path, shape=(6, 8, 8))
    assert "not evenly spaced" in _refusal(series.paths[:2] + series.paths[3:])


def test_refuses_mixed_orientations(tmp_path):
    series = make_ct_series(tmp_path, shape=(4, 8, 8))
    _edit(series.paths[1], ImageOrientationPatient=list(CORONAL))
    assert "mixes image orientations" in _refusal(series.paths)


def test_refuses_a_sheared_stack(tmp_path):
    series = make_ct_series(tmp_path, shape=(4, 8, 8), spacing=(2.0, 1.0, 1.0))
    for index, path in enumerate(series.paths):  # 0.5 mm sideways per slice: gantry tilt
        x, y, z = (float(v) for v in read_header(path).ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + 0.5 * index, z])
    assert "drift" in _refusal(series.paths)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_refuses_missing_geometry(tmp_path, keyword):
    series = make_ct_series(tmp_path, shape=(3, 8, 8))
    _edit(series.paths[1], **{keyword: None})
    message = _refusal(series.paths)
    assert keyword in message and series.paths[1].name in message


def test_refuses_a_single_slice(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 8, 8))
    assert "at least 2 slices" in _refusal(series.paths[:1])
    assert "no files" in _refusal([])


def test_refuses_differing_sizes(tmp_path):
    small = make_ct_series(tmp_path / "small", shape=(2, 8, 8))
    large = make_ct_series(tmp_path / "large", shape=(3, 10, 10))
    assert "different sizes" in _refusal([*small.paths, large.paths[2]])


def test_refuses_colour_images(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 8, 8))
    _edit(series.paths[0], SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    assert "colour" in _refusal(series.paths)


def test_refuses_files_of_different_series(tmp_path):
    series = make_ct_series(tmp_path, shape=(3, 8, 8))
    _edit(series.paths[0], SeriesInstanceUID="1.2.3.4")
    assert "different series" in _refusal(series.paths)


def test_refuses_empty_uids(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 8, 8))
    _edit(series.paths[0], SOPInstanceUID="")
    assert "empty SOPInstanceUID" in _refusal(series.paths)


def test_refuses_undecodable_pixel_data(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 16, 16))
    ds = pydicom.dcmread(series.paths[0])
    ds.compress(RLELossless)
    ds.PixelData = ds.PixelData[:40]  # truncated RLE stream
    ds.save_as(series.paths[0])
    message = _refusal(series.paths)
    assert "could not be decoded" in message and "RLE Lossless" in message


def test_refuses_a_file_that_is_not_dicom(tmp_path):
    series = make_ct_series(tmp_path, shape=(2, 8, 8))
    series.paths[0].write_bytes(b"not dicom at all")
    assert "could not be read as a DICOM file" in _refusal(series.paths)


# --- real files --------------------------------------------------------------------------------


@requires_shared_data
def test_real_ct_with_duplicate_positions_is_refused():
    folder = SHARED_DATA / "innolitics__dicom-numpy" / "tests" / "dupe-positions"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    assert "same position" in _refusal(sorted(folder.glob("*.dcm")))


@requires_shared_data
def test_real_ct_with_a_gap_is_refused_and_the_contiguous_part_loads():
    folder = SHARED_DATA / "ct_volumes" / "Project-MONAI__MONAI" / "tests" / "testing_data" / "CT_DICOM"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    paths = sorted(folder.iterdir())  # 7106 is 200 mm away from 7136, 7166, 7196
    assert "not evenly spaced" in _refusal(paths)
    volume = load_series(paths[1:])
    assert volume.shape == (3, 16, 16)
    assert volume.spacing == pytest.approx((1.25, 0.488281, 0.488281), abs=1e-4)
    first = pydicom.dcmread(paths[1])
    np.testing.assert_allclose(volume.pixels[0], first.pixel_array * float(first.RescaleSlope)
                               + float(first.RescaleIntercept))


@requires_shared_data
def test_real_enhanced_mr_loads_frame_by_frame():
    path = SHARED_DATA / "neurolabusc__dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_1.dcm"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    volume = load_series([path])
    ds = pydicom.dcmread(path)
    assert volume.shape == (6, 64, 64)
    assert volume.spacing == pytest.approx((2.4, 3.375, 3.375), abs=1e-3)
    assert [f.frame_number for f in volume.source_frames] == [1, 2, 3, 4, 5, 6]  # already ascending in z
    assert {f.sop_instance_uid for f in volume.source_frames} == {ds.SOPInstanceUID}
    np.testing.assert_allclose(volume.pixels, ds.pixel_array.astype(np.float32))  # slope 1, intercept 0
    assert volume.modality == "MR"


@requires_shared_data
def test_real_enhanced_mr_with_two_volumes_in_one_file_is_refused():
    path = SHARED_DATA / "neurolabusc__dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    message = _refusal([path])
    assert "same position" in message and "frame 33" in message


def test_enhanced_frames_are_sorted_and_rescaled_per_frame(tmp_path):
    """A multi-frame file whose frames are stored top-down, each with its own rescale."""
    series = make_ct_series(tmp_path / "src", shape=(4, 8, 8), noise_hu=0)
    headers = [pydicom.dcmread(p) for p in series.paths]
    ds = _as_enhanced(headers[::-1], slopes=[1, 2, 1, 2])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    assert [f.frame_number for f in volume.source_frames] == [4, 3, 2, 1]
    expected = series.hu.copy()
    expected[[0, 2]] = (series.hu[[0, 2]] + 1024) * 2 - 1024  # frames 4 and 2 have slope 2
    np.testing.assert_array_equal(volume.pixels, expected)


def _as_enhanced(headers, slopes):
    """A minimal multi-frame dataset with per-frame plane position and rescale (not a full IOD)."""
    from pydicom.dataset import Dataset

    first = headers[0]
    ds = Dataset()
    for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
                    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation"):
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.NumberOfFrames = len(headers)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, pixels = [], []
    for header, slope in zip(headers, slopes):
        item, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = header.ImagePositionPatient
        transform.RescaleSlope = slope
        transform.RescaleIntercept = -1024
        item.PlanePositionSequence = [position]
        item.PixelValueTransformationSequence = [transform]
        frames.append(item)
        pixels.append(header.pixel_array)  # same stored values; the slope changes what they mean
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(pixels).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds
