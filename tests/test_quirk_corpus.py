"""The quirk corpus (tests/quirk_corpus.py): every case really has its quirk on disk, and only
its own study, series and instances."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.errors import BytesLengthException
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from tests.conftest import SHARED_DATA, requires_shared_data
from tests.quirk_corpus import (
    BASE_SERIES,
    BLOCK_SLICES,
    CASE_NAMES,
    CHARSET_TEXT,
    MIN_LUNG_ML,
    MIXED_SIZE_SLICES,
    MISSING_TYPE2,
    PIXEL_PADDING_STORED,
    PRIVATE_WRONG_LENGTH,
    THICK_SLICE_EXPECT,
    THICK_SLICE_MM,
    accession_number,
    lung_volume_ml,
    make_quirk_corpus,
)

pytestmark = [pytest.mark.shared_data, requires_shared_data]

SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD), little endian
ITEM_DELIMITER = b"\xfe\xff\x0d\xe0"  # (FFFE,E00D)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("quirks")
    cases = make_quirk_corpus(root, SHARED_DATA)
    return {case.name: case for case in cases}


def files(case):
    return sorted(case.folder.glob("IM*.dcm"))


def read_all(case, **kwargs):
    return [pydicom.dcmread(path, **kwargs) for path in files(case)]


def hu(ds):
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def clean_hu(corpus):
    return [hu(ds) for ds in read_all(corpus["clean"])]


def test_every_case_is_made_in_order(corpus):
    assert tuple(corpus) == CASE_NAMES
    for case in corpus.values():
        assert case.what and case.expect in ("result", "refused")
        assert (case.reason == case.reason.lower() != "") == (case.expect == "refused")
        assert [p.name for p in files(case)] == [f"IM{i:04d}.dcm" for i in range(1, len(files(case)) + 1)]
        assert len(files(case)) == len(case.sop_instance_uids) == len(list(case.folder.iterdir()))


def test_cases_never_share_a_uid(corpus):
    cases = list(corpus.values())
    assert len({c.study_instance_uid for c in cases}) == len(cases)
    assert len({c.series_instance_uid for c in cases}) == len(cases)
    every_sop = [uid for c in cases for uid in c.sop_instance_uids]
    assert len(set(every_sop)) == len(every_sop)
    frames = {}
    for case in cases:
        for ds in read_all(case, stop_before_pixels=True, force=True):
            assert ds.StudyInstanceUID == case.study_instance_uid
            assert ds.SeriesInstanceUID == case.series_instance_uid
            if "FrameOfReferenceUID" in ds:
                frames.setdefault(ds.FrameOfReferenceUID, set()).add(case.name)
            if "AccessionNumber" in ds:
                assert ds.AccessionNumber == accession_number(case.name) and len(ds.AccessionNumber) <= 16
            assert ds.PatientID == "113_HM10395"
    assert all(len(names) == 1 for names in frames.values())


def test_sop_instance_uids_are_the_files_in_position_order(corpus):
    for case in corpus.values():
        slices = read_all(case, stop_before_pixels=True, force=True)
        assert tuple(ds.SOPInstanceUID for ds in slices) == case.sop_instance_uids
        z = [float(ds.ImagePositionPatient[2]) for ds in slices if "ImagePositionPatient" in ds]
        assert z == sorted(z), case.name


def test_the_same_call_writes_the_same_files(corpus, tmp_path):
    [again] = make_quirk_corpus(tmp_path, SHARED_DATA, ["frame_of_reference_per_slice"])
    case = corpus["frame_of_reference_per_slice"]
    assert again.sop_instance_uids == case.sop_instance_uids
    assert [p.read_bytes() for p in files(again)] == [p.read_bytes() for p in files(case)]


def test_clean_is_a_real_lung_block_downsampled(corpus, clean_hu):
    case = corpus["clean"]
    slices = read_all(case)
    assert len(slices) == BLOCK_SLICES == 40 and case.expect == "result"
    for ds in slices:
        assert (ds.Rows, ds.Columns) == (128, 128)
        assert [str(v) for v in ds.PixelSpacing] == ["3.9064", "3.9064"]
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        # the real headers
        assert ds.Manufacturer == "ADAC" and ds.ManufacturerModelName == "Pinnacle3"
        assert ds[0x0013, 0x0010].value == "CTP" and (0x0013, 0x1010) in ds
        assert len(ds.DeidentificationMethodCodeSequence) == 7
        assert ds.SliceThickness == 3 and ds.BodyPartExamined == "LUNG"
    assert np.allclose(np.diff([float(ds.ImagePositionPatient[2]) for ds in slices]), 3.0)
    assert lung_volume_ml(slices) >= MIN_LUNG_ML
    data = files(case)[0].read_bytes()
    assert data[128:132] == b"DICM" and SEQUENCE_DELIMITER not in data and ITEM_DELIMITER not in data

    # the pixels: 4 x 4 means of the real slice at the same position
    first = slices[0]
    originals = [pydicom.dcmread(p) for p in sorted((SHARED_DATA / BASE_SERIES).glob("*.dcm"))]
    [original] = [o for o in originals
                  if float(o.ImagePositionPatient[2]) == float(first.ImagePositionPatient[2])]
    assert np.abs(hu(original).reshape(128, 4, 128, 4).mean(axis=(1, 3)) - clean_hu[0]).max() <= 0.5
    for axis in (0, 1):
        assert float(first.ImagePositionPatient[axis]) == pytest.approx(
            float(original.ImagePositionPatient[axis]) + 1.5 * 0.9766)


def test_private_wrong_length(corpus, monkeypatch):
    # pydicom's default: the node itself reads such values as bytes (dicom_ai_node/__init__.py),
    # which the whole test session shares once anything imported the node
    monkeypatch.setattr(pydicom.config, "convert_wrong_length_to_UN", False)
    for path in files(corpus["private_wrong_length"]):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        for group, creator, element in PRIVATE_WRONG_LENGTH:
            assert ds[group, 0x0010].value == creator
            assert ds.get_item((group, 0x1000 | element)).length == 4
            with pytest.raises(BytesLengthException):
                ds[group, 0x1000 | element].value  # noqa: B018 - the access is what raises
    with pytest.raises(BytesLengthException):
        pydicom.dcmread(files(corpus["private_wrong_length"])[0])[0x01F1, 0x1026].value  # noqa: B018


def test_frame_of_reference_per_slice(corpus):
    slices = read_all(corpus["frame_of_reference_per_slice"], stop_before_pixels=True)
    assert len({ds.FrameOfReferenceUID for ds in slices}) == len(slices)


def test_no_frame_of_reference(corpus):
    for ds in read_all(corpus["no_frame_of_reference"], stop_before_pixels=True):
        assert "FrameOfReferenceUID" not in ds and "PositionReferenceIndicator" not in ds


def test_missing_type2_patient_study(corpus):
    for ds in read_all(corpus["missing_type2_patient_study"], stop_before_pixels=True):
        assert [k for k in MISSING_TYPE2 if k in ds] == []
        assert ds.PatientID == "113_HM10395"


def test_referenced_items_missing_type1(corpus):
    for ds in read_all(corpus["referenced_items_missing_type1"], stop_before_pixels=True):
        [study] = ds.ReferencedStudySequence
        assert "ReferencedSOPInstanceUID" in study and "ReferencedSOPClassUID" not in study
        [step] = ds.ReferencedPerformedProcedureStepSequence
        assert "ReferencedSOPClassUID" in step and "ReferencedSOPInstanceUID" not in step
        [code] = ds.ProcedureCodeSequence
        assert "CodeValue" in code and "CodingSchemeDesignator" in code and "CodeMeaning" not in code


def test_lowercase_padded_code_strings(corpus):
    for path in files(corpus["lowercase_padded_code_strings"]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BodyPartExamined == "Chest" and ds.Modality == "CT"
        assert ds.PatientSex == "m" and ds.PatientPosition == "hfs"
        assert list(ds.ImageType) == ["original", "primary", "axial"]
        data = path.read_bytes()
        assert b"\x18\x00\x00\x51\x04\x00\x00\x00hfs " in data  # (0018,5100) "hfs " on disk


def test_body_part_chest_padded(corpus):
    for path in files(corpus["body_part_chest_padded"]):
        assert b"\x18\x00\x15\x00\x06\x00\x00\x00chest " in path.read_bytes()  # (0018,0015)
        assert pydicom.dcmread(path, stop_before_pixels=True).BodyPartExamined == "chest"


def test_body_part_absent(corpus):
    for ds in read_all(corpus["body_part_absent"], stop_before_pixels=True):
        assert "BodyPartExamined" not in ds


def test_pn_retired_forms(corpus):
    for path in files(corpus["pn_retired_forms"]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == "DOE JOHN"
        assert ds.get_item("ReferringPhysicianName").value == b"Doe^John^^^^"
        assert str(ds.OperatorsName).count("^") == 5
        data = path.read_bytes()
        assert b"Doe^John^^^^" in data and b"A^B^C^D^E^F" in data


@pytest.mark.parametrize("name", ["charset_latin1", "charset_utf8", "charset_iso2022_ir87"])
def test_charsets(corpus, name):
    charset, patient_name, study_description = CHARSET_TEXT[name]
    encoded = {"charset_latin1": "Müller^Jürgen".encode("latin-1"),
               "charset_utf8": "Øresund^Zoë".encode("utf-8"),
               "charset_iso2022_ir87": b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B="}[name]
    for path in files(corpus[name]):
        assert encoded in path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SpecificCharacterSet == charset
        assert str(ds.PatientName) == patient_name
        if study_description:
            assert ds.StudyDescription == study_description


def test_ds_too_long(corpus, clean_hu):
    slices = read_all(corpus["ds_too_long"])
    clean = read_all(corpus["clean"], stop_before_pixels=True)
    for ds, reference in zip(slices, clean):
        for keyword in ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "RescaleIntercept"):
            raw = ds.get_item(keyword).value
            assert all(len(v) > 16 for v in raw.split(b"\\")), (keyword, raw)
            values = ds[keyword].value if ds[keyword].VM > 1 else [ds[keyword].value]
            expected = reference[keyword].value if reference[keyword].VM > 1 else [reference[keyword].value]
            assert [float(v) for v in values] == [float(v) for v in expected]
    assert b"3.906400000000000001\\3.906400000000000001" in files(corpus["ds_too_long"])[0].read_bytes()
    assert np.array_equal(hu(slices[0]), clean_hu[0])


def test_monochrome1(corpus, clean_hu):
    slices = read_all(corpus["monochrome1"])
    assert {ds.PhotometricInterpretation for ds in slices} == {"MONOCHROME1"}
    assert np.array_equal(hu(slices[5]), clean_hu[5])


def test_pixel_padding(corpus, clean_hu):
    for ds, reference in zip(read_all(corpus["pixel_padding"]), clean_hu):
        assert ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) == -1024
        assert ds.PixelPaddingValue == PIXEL_PADDING_STORED == -2000
        stored = ds.pixel_array
        padded = stored == PIXEL_PADDING_STORED
        assert padded[0, 0] and padded[-1, -1] and not padded[64, 64]
        assert 0.1 < padded.mean() < 0.4  # the corners outside the circle
        assert np.array_equal(hu(ds)[~padded], reference[~padded])


def test_signed_unsigned_mixed(corpus, clean_hu):
    slices = read_all(corpus["signed_unsigned_mixed"])
    assert {(ds.PixelRepresentation, float(ds.RescaleIntercept)) for ds in slices} == {(0, -1024), (1, 0)}
    assert all(np.array_equal(hu(ds), reference) for ds, reference in zip(slices, clean_hu))
    signed = [ds for ds in slices if ds.PixelRepresentation == 1]
    assert min(ds.pixel_array.min() for ds in signed) < 0


def test_rescale_varies(corpus, clean_hu):
    slices = read_all(corpus["rescale_varies"])
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in slices}) >= 3
    assert {float(ds.RescaleSlope) for ds in slices} == {1.0, 0.5}
    assert all(np.array_equal(hu(ds), reference) for ds, reference in zip(slices, clean_hu))


def test_gantry_tilt(corpus):
    slices = read_all(corpus["gantry_tilt"], stop_before_pixels=True)
    clean = read_all(corpus["clean"], stop_before_pixels=True)
    assert {float(ds.GantryDetectorTilt) for ds in slices} == {15.0}
    shift = math.tan(math.radians(15)) * 3.0
    for index, (ds, reference) in enumerate(zip(slices, clean)):
        assert list(ds.ImageOrientationPatient) == list(reference.ImageOrientationPatient)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        rx, ry, rz = (float(v) for v in reference.ImagePositionPatient)
        assert (x, z) == (rx, rz) and y == pytest.approx(ry + index * shift, abs=1e-4)
    assert corpus["gantry_tilt"].expect == "refused" and corpus["gantry_tilt"].reason == "tilt"


def test_missing_position_one_slice(corpus):
    slices = read_all(corpus["missing_position_one_slice"], stop_before_pixels=True)
    missing = [i for i, ds in enumerate(slices) if "ImagePositionPatient" not in ds]
    assert missing == [len(slices) // 2]


def test_duplicate_instance_number(corpus):
    slices = read_all(corpus["duplicate_instance_number"], stop_before_pixels=True)
    assert {ds.InstanceNumber for ds in slices} == {1}


def test_mixed_rows_columns(corpus, clean_hu):
    slices = read_all(corpus["mixed_rows_columns"])
    sizes = [(ds.Rows, ds.Columns) for ds in slices]
    assert sizes == [(128, 128)] * (len(slices) - MIXED_SIZE_SLICES) + [(64, 64)] * MIXED_SIZE_SLICES
    small = slices[-1]
    assert [float(v) for v in small.PixelSpacing] == [7.8128, 7.8128]
    assert small.pixel_array.shape == (64, 64)
    clean = read_all(corpus["clean"], stop_before_pixels=True)[-1]
    for axis in (0, 1):  # the centre of the first 2 x 2 block
        expected = float(clean.ImagePositionPatient[axis]) + 0.5 * 3.9064
        assert float(small.ImagePositionPatient[axis]) == pytest.approx(expected)
    assert np.abs(clean_hu[-1].reshape(64, 2, 64, 2).mean(axis=(1, 3)) - hu(small)).max() <= 0.5


def test_no_preamble(corpus, clean_hu):
    for path in files(corpus["no_preamble"]):
        data = path.read_bytes()
        assert data[128:132] != b"DICM" and b"DICM" not in data[:200]
        assert data[:4] == b"\x08\x00\x05\x00"  # (0008,0005) first: no file meta, no preamble
        assert b"\x02\x00\x10\x00" not in data[:256]  # no (0002,0010)
    ds = pydicom.dcmread(files(corpus["no_preamble"])[0], force=True)
    assert "TransferSyntaxUID" not in ds.file_meta and ds.original_encoding == (True, True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # pydicom needs it for the pixels
    assert np.array_equal(hu(ds), clean_hu[0])


@pytest.mark.parametrize("name, syntax", [("deflate", DeflatedExplicitVRLittleEndian),
                                          ("big_endian", ExplicitVRBigEndian),
                                          ("jpeg_ls", JPEGLSLossless)])
def test_transfer_syntaxes(corpus, clean_hu, name, syntax):
    slices = read_all(corpus[name])
    assert {ds.file_meta.TransferSyntaxUID for ds in slices} == {syntax}
    assert all(np.array_equal(hu(ds), reference) for ds, reference in zip(slices, clean_hu))
    # storescu must propose the file's own syntax first (the node takes the first proposed)
    proposes = {"deflate": ("-xd",), "big_endian": ("-xb",), "jpeg_ls": ("-xt",)}
    assert corpus[name].storescu_args == proposes[name]
    if name == "big_endian":
        data = files(corpus[name])[0].read_bytes()
        assert b"\x00\x28\x00\x10US\x00\x02\x00\x80" in data  # (0028,0010) Rows 128, big endian


def test_undefined_length_sequences(corpus):
    for path in files(corpus["undefined_length_sequences"]):
        data = path.read_bytes()
        assert data.count(SEQUENCE_DELIMITER) == 2 and data.count(ITEM_DELIMITER) == 8
        assert b"\x12\x00\x64\x00SQ\x00\x00\xff\xff\xff\xff" in data  # (0012,0064) SQ, undefined length
        assert b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" in data  # (0008,1140)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert len(ds.ReferencedImageSequence) == 1 and len(ds.DeidentificationMethodCodeSequence) == 7


def test_thick_slices(corpus):
    case = corpus["thick_slices_8mm"]
    slices = read_all(case)
    assert len(slices) >= 16 and case.expect == THICK_SLICE_EXPECT
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    assert np.allclose(np.diff(z), THICK_SLICE_MM)
    assert z[-1] - z[0] >= 280  # the whole scan, not just the block
    assert {float(ds.SliceThickness) for ds in slices} == {THICK_SLICE_MM}
    assert all((ds.Rows, ds.Columns) == (128, 128) for ds in slices)
    assert lung_volume_ml(slices) >= MIN_LUNG_ML


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk not installed")
def test_dcmtk_reads_every_file(corpus):
    """storescu reads files with the same library: dcmdump must parse every one without error."""
    for case in corpus.values():
        result = subprocess.run(["dcmdump", "-q", *map(str, files(case))], capture_output=True,
                                text=True, errors="replace", timeout=60)
        assert result.returncode == 0, (case.name, result.stderr[-500:])
        assert "E:" not in result.stderr and "F:" not in result.stderr, (case.name, result.stderr[-500:])
