"""SEG, SR, key images and derived series: content read back, geometry, UIDs, dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.results.derived import build_derived_series
from dicom_ai_node.results.key_images import (QC_RED, build_key_images, orientation_letters, pick_key_slices,
                                                qc_banner_lines)
from dicom_ai_node.results.seg import build_segmentation
from dicom_ai_node.results.sr import build_measurement_report
from model_zoo.base import Finding, Measurement, ModelOutput, SegmentMask
from model_zoo.manifest import Code, FindingSpec, InputSpec, Manifest, MeasurementSpec, SegmentSpec
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dciodvfy import dciodvfy_errors
from tests.synthetic import AXIAL, OBLIQUE, SAGITTAL, make_ct_series

LUNG_COLOUR = (0, 128, 255)
BODY_COLOUR = (255, 200, 0)


def lung_manifest(task: str = "segmentation") -> Manifest:
    return Manifest(
        path=Path("/models/lung_ct_seg/model.toml"), name="lung_ct_seg", version="1.0.0", task=task,
        entry="model:LungSegmentation", weights=None, algorithm_name="Lung CT segmentation",
        algorithm_version="1.2.3", manufacturer="Example AI Lab", input=InputSpec(modality=("CT",)),
        segments=(
            SegmentSpec("lung", "Lungs", Code("SCT", "123037004", "Anatomical Structure"),
                        Code("SCT", "39607008", "Lung"), LUNG_COLOUR),
            SegmentSpec("body", "Body", Code("SCT", "123037004", "Anatomical Structure"),
                        Code("SCT", "38266002", "Entire body"), BODY_COLOUR),
        ),
        measurements=(
            MeasurementSpec("volume", Code("SCT", "118565006", "Volume"), Code("UCUM", "ml", "milliliter")),
            MeasurementSpec("mean_hu", Code("SCT", "373098007", "Mean"), Code("UCUM", "[hnsf'U]", "Hounsfield unit")),
        ),
        findings=(
            FindingSpec("emphysema", Code("SCT", "87433001", "Pulmonary emphysema"),
                        {"present": Code("SCT", "52101004", "Present"), "absent": Code("SCT", "2667000", "Absent")}),
        ),
    )


class Job:
    """A synthetic series, its volume, headers and a segmentation model's output."""

    def __init__(self, folder, **series_options):
        self.series = make_ct_series(folder / "ct", **series_options)
        self.volume = load_series(self.series.paths)
        self.headers = [read_header(path) for path in self.series.paths]
        self.manifest = lung_manifest()
        body = self.series.hu > -500
        self.output = ModelOutput(
            segments=[SegmentMask("lung", self.series.lung_mask), SegmentMask("body", body | self.series.lung_mask)],
            measurements=[Measurement("volume", float(self.series.lung_mask.sum()) * self.volume.voxel_volume_ml, "lung"),
                          Measurement("mean_hu", -850.0, "lung"),
                          Measurement("mean_hu", -5.0, None)],
            findings=[Finding("emphysema", "present", 0.87)],
        )
        self.folder = folder

    def save(self, dataset, name) -> Path:
        path = self.folder / name
        dataset.save_as(path, enforce_file_format=True)
        return path


@pytest.fixture
def job(tmp_path):
    return Job(tmp_path, shape=(10, 24, 32), reverse=True)


def _codes(sequence) -> set[tuple[str, str]]:
    return {(item.CodingSchemeDesignator, item.CodeValue) for item in sequence}


def _has_processing_algorithm(dataset, manifest) -> bool:
    for item in dataset.ContributingEquipmentSequence:
        if ("99IHE", "1630") in _codes(item.PurposeOfReferenceCodeSequence):
            return (item.Manufacturer == manifest.manufacturer
                    and item.ManufacturerModelName == manifest.algorithm_name
                    and item.SoftwareVersions == manifest.algorithm_version)
    return False


def _same_patient_and_study(result, source):
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "AccessionNumber", "StudyID"):
        assert result.get(keyword) == source.get(keyword), keyword
    assert result.SeriesInstanceUID != source.SeriesInstanceUID


# --- SEG ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE])
@pytest.mark.parametrize("reverse", [False, True])
def test_seg_equals_mask_per_source_instance(tmp_path, orientation, reverse):
    job = Job(tmp_path, shape=(9, 20, 28), orientation=orientation, reverse=reverse)
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    seg = hd.seg.segread(job.save(seg, "seg.dcm"))

    stored = seg.get_pixels_by_source_instance(job.series.sop_instance_uids, segment_numbers=[1, 2])
    assert stored.shape == (9, 20, 28, 2)
    np.testing.assert_array_equal(stored[..., 0].astype(bool), job.series.lung_mask)
    np.testing.assert_array_equal(stored[..., 1].astype(bool), job.output.segments[1].mask)
    # and via the file's own geometry: frame positions are those of the source images
    for source in job.headers:
        index = job.series.sop_instance_uids.index(source.SOPInstanceUID)
        np.testing.assert_allclose(job.volume.slice_position(index),
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-3)


def test_seg_content(job, tmp_path):
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    path = job.save(seg, "seg.dcm")
    seg = hd.seg.segread(path)

    assert dciodvfy_errors(path) == []
    assert seg.SegmentationType == "BINARY"
    assert seg.NumberOfFrames == 10 * 2  # empty frames kept (lungs absent from the lowest slices)
    assert seg.SeriesNumber == 300
    assert seg.SeriesDescription.startswith("AI: Lung CT segmentation")
    assert seg.BodyPartExamined == "CHEST"
    _same_patient_and_study(seg, job.headers[0])
    assert _has_processing_algorithm(seg, job.manifest)
    lung = seg.SegmentSequence[0]
    assert (lung.SegmentLabel, lung.SegmentAlgorithmType) == ("Lungs", "AUTOMATIC")
    assert _codes(lung.SegmentedPropertyTypeCodeSequence) == {("SCT", "39607008")}
    assert lung.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "Lung CT segmentation"
    assert _codes(lung.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence) == {
        ("DCM", "123110")}
    referenced = {item.ReferencedSOPInstanceUID
                  for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    assert referenced == set(job.series.sop_instance_uids)


def test_uids_are_deterministic_per_seed(job):
    def uids(seed):
        seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, seed, 300)
        sr = build_measurement_report(job.headers, job.volume, job.output, job.manifest, seed, 301, seg)
        images = build_key_images(job.headers, job.volume, job.output, job.manifest, seed, 302)
        job.output.derived_pixels = job.series.hu
        derived = build_derived_series(job.headers, job.volume, job.output, job.manifest, seed, 303)
        objects = [seg, sr, *images, *derived]
        return ([o.SeriesInstanceUID for o in objects], [o.SOPInstanceUID for o in objects],
                seg.SegmentSequence[0].TrackingUID)

    first, again, other = uids("job-1"), uids("job-1"), uids("job-2")
    assert first == again
    series, instances, _ = first
    assert len(set(series)) == 4  # SEG, SR, key images, derived
    assert len(set(instances)) == len(instances)
    assert not set(series + instances) & set(other[0] + other[1])


@requires_shared_data
def test_seg_on_real_enhanced_mr_matches_per_frame(tmp_path):
    path = SHARED_DATA / "neurolabusc__dcm_qa_enh" / "In" / "Siemens" / "XA10" / "6_1.dcm"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    volume = load_series([path])
    mask = volume.pixels > np.percentile(volume.pixels, 80)
    manifest = lung_manifest()
    output = ModelOutput(segments=[SegmentMask("lung", mask)])
    seg = build_segmentation([read_header(path)], volume, output, manifest, "mr-job", 400)
    out = tmp_path / "seg.dcm"
    seg.save_as(out)
    seg = hd.seg.segread(out)
    frames = [f.frame_number for f in volume.source_frames]
    stored = seg.get_pixels_by_source_frame(str(volume.source_frames[0].sop_instance_uid), frames,
                                            segment_numbers=[1])
    np.testing.assert_array_equal(stored[..., 0].astype(bool), mask)
    assert dciodvfy_errors(out) == []


# --- SR -------------------------------------------------------------------------------------------


def _content_items(item):
    """Every content item of an SR tree, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def _numbers(dataset) -> list[tuple[str, float, str]]:
    return [(item.ConceptNameCodeSequence[0].CodeMeaning, float(item.MeasuredValueSequence[0].NumericValue),
             item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for item in _content_items(dataset) if item.ValueType == "NUM"]


def test_sr_with_segmentation(job):
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    sr = build_measurement_report(job.headers, job.volume, job.output, job.manifest, "job-1", 301, seg)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)

    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.Manufacturer == "dicom-ai-node"
    assert sr.SeriesDescription.startswith("AI: Lung CT segmentation")
    _same_patient_and_study(sr, job.headers[0])
    assert _has_processing_algorithm(sr, job.manifest)

    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    lung = next(g for g in groups if g.tracking_identifier == "Lungs")
    assert lung.tracking_uid == seg.SegmentSequence[0].TrackingUID
    reference = lung.referenced_segment
    assert (reference.referenced_sop_instance_uid, reference.referenced_segment_numbers) == (seg.SOPInstanceUID, [1])
    values = {(m.name.meaning, m.unit.value): m.value for m in lung.get_measurements()}
    assert values[("Volume", "ml")] == pytest.approx(job.output.measurements[0].value)
    assert values[("Mean", "[hnsf'U]")] == pytest.approx(-850.0)
    algorithm = [i for i in _content_items(lung[0]) if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]
    assert algorithm and algorithm[0].TextValue == "Lung CT segmentation"

    numbers = _numbers(sr)
    assert ("Probability", 87.0, "%") in numbers  # the finding's probability
    assert ("Mean", -5.0, "[hnsf'U]") in numbers  # the image-level measurement
    finding = [i for i in _content_items(sr) if i.ValueType == "CODE"
               and i.ConceptNameCodeSequence[0].CodeValue == "87433001"]
    assert finding and finding[0].ConceptCodeSequence[0].CodeMeaning == "Present"


def test_sr_without_segmentation_references_the_source_images(job):
    output = ModelOutput(findings=[Finding("emphysema", "absent", 0.12)])
    sr = build_measurement_report(job.headers, job.volume, output, lung_manifest("classification"), "cls", 301)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    assert groups == []
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for i in _content_items(sr) if i.ValueType == "IMAGE"}
    assert referenced == set(job.series.sop_instance_uids)
    assert ("Probability", 12.0, "%") in _numbers(sr)


def test_sr_rejects_undeclared_finding_values(job):
    output = ModelOutput(findings=[Finding("emphysema", "maybe", 0.5)])
    with pytest.raises(ValueError, match="maybe"):
        build_measurement_report(job.headers, job.volume, output, job.manifest, "x", 301)


# --- key images -----------------------------------------------------------------------------------


def test_key_images_show_mask_banner_and_pass_dciodvfy(job):
    images = build_key_images(job.headers, job.volume, job.output, job.manifest, "job-1", 302, max_images=2)
    assert len(images) == 2
    lung_area = job.series.lung_mask.reshape(10, -1).sum(axis=1) + job.output.segments[1].mask.reshape(10, -1).sum(1)
    expected = sorted(np.argsort(-lung_area, kind="stable")[:2].tolist())
    assert [int(i.DerivationDescription.split()[1]) - 1 for i in images] == expected

    for image in images:
        path = job.save(image, f"key{image.InstanceNumber}.dcm")
        assert dciodvfy_errors(path) == []
        image = pydicom.dcmread(path)
        assert (image.PhotometricInterpretation, image.SamplesPerPixel, image.BitsAllocated) == ("RGB", 3, 8)
        assert image.BurnedInAnnotation == "YES" and image.ConversionType == "WSD"
        assert image.BodyPartExamined == "CHEST"
        assert list(image.PatientOrientation) == ["L", "P"]
        _same_patient_and_study(image, job.headers[0])
        assert _has_processing_algorithm(image, job.manifest)
        source_uid = image.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source_uid in job.series.sop_instance_uids

        pixels = image.pixel_array
        banner = pixels[:20].reshape(-1, 3)
        assert (banner == (255, 255, 0)).all(axis=1).any()  # yellow disclaimer text
        assert (pixels == LUNG_COLOUR).all(axis=2).any()  # lung outline in the segment colour
        zoom = pixels.shape[1] // 32
        assert float(image.PixelSpacing[0]) == pytest.approx(job.volume.spacing[1] / zoom)


def test_key_images_honour_model_key_slices_and_saliency(job):
    saliency = np.zeros(job.volume.shape, dtype=np.float32)
    saliency[6, 5:15, 5:15] = 1.0
    output = ModelOutput(saliency=saliency, findings=[Finding("emphysema", "present", 0.9)])
    assert pick_key_slices(job.volume, output, 3) == [6]
    images = build_key_images(job.headers, job.volume, output, job.manifest, "cls", 302)
    assert len(images) == 1
    pixels = images[0].pixel_array
    assert (pixels[..., 0] > pixels[..., 2] + 100).any()  # red end of the heat map is visible
    assert dciodvfy_errors(job.save(images[0], "saliency.dcm")) == []
    output.key_slices = [9, 2, 2]
    assert pick_key_slices(job.volume, output, 3) == [2, 9]
    assert pick_key_slices(job.volume, ModelOutput(), 3) == []


def test_orientation_letters():
    assert orientation_letters(np.array([1.0, 0, 0])) == "L"
    assert orientation_letters(np.array([0, 0, -1.0])) == "F"
    assert orientation_letters(np.array([0, 0.94, -0.34])) == "PF"


# --- derived series -------------------------------------------------------------------------------


def test_derived_series_keeps_geometry_and_values(job, tmp_path):
    denoised = np.round(job.series.hu * 0.5)
    denoised[0, 0, 0] = 5000.0  # beyond the 12-bit stored range: clipped, not wrapped
    job.output.derived_pixels = denoised
    results = build_derived_series(job.headers, job.volume, job.output, job.manifest, "job-1", 303,
                                   derivation_description="Denoised with Lung CT segmentation")
    assert len(results) == 10
    paths = [job.save(ds, f"derived{i}.dcm") for i, ds in enumerate(results)]
    assert dciodvfy_errors(paths[0]) == []

    derived = load_series(paths)
    expected = denoised.copy()
    expected[0, 0, 0] = 4095 - 1024
    np.testing.assert_array_equal(derived.pixels, expected)
    np.testing.assert_allclose(derived.origin, job.volume.origin)
    assert derived.spacing == job.volume.spacing

    first = pydicom.dcmread(paths[0])
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.DerivationDescription == "Denoised with Lung CT segmentation"
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == job.volume.source_frames[0].sop_instance_uid
    assert first.SeriesDescription.startswith("AI: Lung CT segmentation")
    _same_patient_and_study(first, job.headers[0])
    assert first.FrameOfReferenceUID == job.headers[0].FrameOfReferenceUID
    assert _has_processing_algorithm(first, job.manifest)


def _shoelace(points) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def _groups(sr) -> list:
    """The measurement groups of a TID 1500 report, in document order (raw content items)."""
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(container.ContentSequence)


def _children(item, value_type=None, code=None) -> list:
    return [i for i in item.get("ContentSequence", [])
            if (value_type is None or i.ValueType == value_type)
            and (code is None or i.ConceptNameCodeSequence[0].CodeValue == code)]


def _text(group, code) -> str | None:
    items = _children(group, "TEXT", code)
    return items[0].TextValue if items else None


def _tracking_uid(group) -> str:
    return _children(group, "UIDREF", "112040")[0].UID


FREEHAND, ARROW = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI", "Cornerstone3DTools@^0.1.0:ArrowAnnotate"


def _assert_ohif_can_draw_and_track(sr):
    """What OHIF 3.12 needs (docs/viewer-check.md): every tracking UID has a SCOORD on an image,
    in its first group (the one OHIF takes the tracking identifier from): a group-level one, or
    the only child of the group's first NUM, with one SELECTED FROM image; no other NUM has a
    child; a group naming OHIF's freehand tool starts with the Area of a closed outline, one
    naming its arrow with the NUM of a point, and both have a Comment label."""
    first_of_uid = {}
    for group in _groups(sr):
        uid = _tracking_uid(group)
        first = first_of_uid.setdefault(uid, group) is group
        numbers = _children(group, "NUM")
        for number in numbers[1:]:
            assert "ContentSequence" not in number
        scoords = _children(group, "SCOORD") or (numbers[0].get("ContentSequence", []) if numbers else [])
        assert scoords or not first, "OHIF throws on a tracking UID without coordinates"
        for scoord in scoords:
            (image,) = scoord.ContentSequence
            assert image.ValueType == "IMAGE" and len(image.ReferencedSOPSequence) == 1
            points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
            if scoord.GraphicType == "POLYLINE":
                np.testing.assert_array_equal(points[0], points[-1])  # closed
        tool = _text(group, "112039")
        if tool in (FREEHAND, ARROW):
            (scoord,) = numbers[0].ContentSequence
            assert (scoord.RelationshipType, scoord.GraphicType) == (
                "INFERRED FROM", "POLYLINE" if tool == FREEHAND else "POINT")
            assert tool == ARROW or numbers[0].ConceptNameCodeSequence[0].CodeValue == "42798000"  # Area
            assert first and _text(group, "121106")
    return first_of_uid


def test_sr_outlines_each_segment_in_the_shape_ohif_tracks(job):
    """Per region of a segment on its key slice a TID 1501 group (what OHIF draws and hydrates as a
    PlanarFreehandROI): the region's Area, INFERRED FROM its closed outline on that source image,
    labelled "Lungs (1/2)", "Lungs (2/2)"; then the volumetric group (TID 1411) with the tracking
    UID of the largest region's group."""
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    sr = build_measurement_report(job.headers, job.volume, job.output, job.manifest, "job-1", 301, seg)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    first_of_uid = _assert_ohif_can_draw_and_track(pydicom.dcmread(path))
    sr = hd.sr.srread(path)

    lung_uid = seg.SegmentSequence[0].TrackingUID
    assert _text(first_of_uid[lung_uid], "112039") == "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
    assert [_text(g, "121106") for g in _groups(pydicom.dcmread(path))] == [
        "Lungs (1/2)", "Lungs (2/2)", None, "Body", None, "Pulmonary emphysema: Present (87 %)", "Image measurements"]
    (outlined,) = sr.content.get_image_measurement_groups(tracking_uid=lung_uid)
    (volumetric,) = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=lung_uid)
    assert volumetric.tracking_identifier == "Lungs"
    assert [m.name.meaning for m in volumetric.get_measurements()] == ["Volume", "Mean"]
    assert outlined.finding_type.value == "39607008"

    mask = job.series.lung_mask
    key = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    (area,) = outlined.get_measurements()
    assert (area.name.value, area.unit.value) == ("42798000", "mm2")
    (scoord,) = area.referenced_coordinates
    source = scoord.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == job.volume.source_frames[key].sop_instance_uid
    assert source.ReferencedSOPClassUID == job.headers[0].SOPClassUID

    points = scoord.value  # (column, row) image coordinates, (0, 0) = top left corner of the image
    assert 4 <= len(points) <= 201
    slice_mask = np.pad(mask[key], 1)  # index + 1: a corner (x, y) touches pixels [y-1:y+1, x-1:x+1]
    for x, y in points:
        assert float(x).is_integer() and float(y).is_integer()  # pixel corners
        around = slice_mask[int(y):int(y) + 2, int(x):int(x) + 2]
        assert around.any() and not around.all(), (x, y)  # on the boundary: inside and outside pixels meet

    from dicom_ai_node.results.sr import largest_region
    largest = largest_region(mask[key])
    pixel_area = job.volume.spacing[1] * job.volume.spacing[2]
    assert area.value == pytest.approx(largest.sum() * pixel_area, rel=1e-6)
    assert _shoelace(points) * pixel_area == pytest.approx(area.value, rel=0.05)
    other = _children(_groups(sr)[1], "NUM")[0]  # the other lung, a tracking UID of its own
    assert _tracking_uid(_groups(sr)[1]) != lung_uid
    assert float(other.MeasuredValueSequence[0].NumericValue) == pytest.approx(
        (mask[key] & ~largest).sum() * pixel_area)


def test_sr_anchors_an_empty_segment_and_an_image_level_finding_on_a_whole_slice(job):
    """Nothing to outline (an empty segment, a finding without saliency): the group's first
    measurement refers to the whole of a slice, so OHIF still draws it (it throws on a tracking
    UID without coordinates); it keeps its readable tracking identifier (not hydratable)."""
    job.output.segments[1].mask[:] = False
    job.output.key_slices = [7]
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    sr = build_measurement_report(job.headers, job.volume, job.output, job.manifest, "job-1", 301, seg)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    first_of_uid = _assert_ohif_can_draw_and_track(pydicom.dcmread(path))

    body = first_of_uid[seg.SegmentSequence[1].TrackingUID]
    assert _text(body, "112039") == _text(body, "121106") == "Body"
    (area,) = _children(body, "NUM")
    assert float(area.MeasuredValueSequence[0].NumericValue) == 0.0
    scoord = area.ContentSequence[0]
    assert list(scoord.GraphicData) == [0, 0, 32, 0, 32, 24, 0, 24, 0, 0]  # the whole 32 x 24 image
    assert (scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == job.volume.source_frames[7].sop_instance_uid)  # the model's key slice

    finding = next(g for g in first_of_uid.values() if _children(g, "CODE", "87433001"))
    assert _text(finding, "121106") == "Pulmonary emphysema: Present (87 %)"
    (probability,) = _children(finding, "NUM")
    assert probability.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
    assert "ContentSequence" in probability
    hd.sr.srread(path)


def test_outline_of_a_large_region_is_simplified_but_stays_on_its_boundary():
    from dicom_ai_node.results.sr import MAX_OUTLINE_POINTS, largest_region, region_outline
    rows, cols = np.mgrid[:400, :400]
    mask = ((rows - 200) / 170.0) ** 2 + ((cols - 190) / 120.0) ** 2 < 1
    mask[:, 300:] |= (rows[:, 300:] - 50) ** 2 + (cols[:, 300:] - 350) ** 2 < 400  # a smaller second region
    region = largest_region(mask)
    assert region.sum() < mask.sum() and region[200, 190]
    outline = region_outline(region)
    assert len(outline) <= MAX_OUTLINE_POINTS + 1
    assert _shoelace(outline) == pytest.approx(region.sum(), rel=0.02)
    padded = np.pad(region, 1)
    assert all(padded[int(y):int(y) + 2, int(x):int(x) + 2].any()
               and not padded[int(y):int(y) + 2, int(x):int(x) + 2].all() for x, y in outline)


def test_sr_points_where_a_classifier_looked_and_outlines_where_measurements_were_taken(job):
    """A finding with a saliency map: its probability is inferred from the point of highest
    saliency (OHIF tracks it as an arrow labelled with the finding). Measurements with a
    measurement region: a planar ROI group (TID 1410) outlining it on the key slice, after the
    outline's tracked Area with the same tracking UID."""
    saliency = np.zeros(job.volume.shape, dtype=np.float32)
    saliency[4, 5:12, 6:15] = 0.8  # the model looked here ...
    saliency[4, 7, 9] = 1.0  # ... most of all here
    saliency[2, 3, 3] = 0.9  # a key slice with less above half the maximum
    uniform = np.zeros(job.volume.shape, dtype=bool)
    uniform[6, 10:14, 10:20] = True  # where the image-level measurement was taken
    output = ModelOutput(findings=[Finding("emphysema", "present", 0.9)],
                         measurements=[Measurement("mean_hu", -5.0, None)],
                         saliency=saliency, measurement_region=uniform, key_slices=[2, 4])
    sr = build_measurement_report(job.headers, job.volume, output, lung_manifest("classification"), "cls", 301)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    dataset = pydicom.dcmread(path)
    finding, outline, planar = _groups(dataset)
    _assert_ohif_can_draw_and_track(dataset)
    assert [_text(g, "112039") for g in (finding, outline, planar)] == [ARROW, FREEHAND, "Measurement region"]
    assert [_text(g, "121106") for g in (finding, outline)] == [
        "Pulmonary emphysema: Present (90 %)", "Measurement region"]
    assert _tracking_uid(outline) == _tracking_uid(planar)

    (probability,) = _children(finding, "NUM")
    assert float(probability.MeasuredValueSequence[0].NumericValue) == 90.0
    point = probability.ContentSequence[0]
    assert list(point.GraphicData) == [9.5, 7.5]  # centre of pixel (row 7, column 9)
    assert (point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == job.volume.source_frames[4].sop_instance_uid)

    sr = hd.sr.srread(path)
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert [m.value for m in group.get_measurements()] == [-5.0]
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        job.volume.source_frames[6].sop_instance_uid)
    points = group.roi.value
    assert (points.min(axis=0).tolist(), points.max(axis=0).tolist()) == ([10, 10], [20, 14])
    (area,) = _children(outline, "NUM")
    np.testing.assert_array_equal(np.asarray(area.ContentSequence[0].GraphicData).reshape(-1, 2), points)
    assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(
        40 * job.volume.spacing[1] * job.volume.spacing[2])
    (group,) = sr.content.get_image_measurement_groups(tracking_uid=_tracking_uid(finding))
    assert "52101004" in [e.value.value for e in group.get_qualitative_evaluations()]


QC_FAILURES = ["Lungs: volume 8.2 mL is below the plausible minimum 100 mL",
               "mean_attenuation on lung -420 HU is above the plausible maximum -500 HU"]


def test_sr_of_a_flagged_result_says_which_quality_checks_failed(job):
    """Sent flagged: TID 1500 "Qualitative Evaluations" holds one "QC FAILED: <reason>" per failed
    check, the series description starts with QC FAILED and every label a viewer shows says so."""
    seg = build_segmentation(job.headers, job.volume, job.output, job.manifest, "job-1", 300)
    sr = build_measurement_report(job.headers, job.volume, job.output, job.manifest, "job-1", 301, seg,
                                  qc_failures=QC_FAILURES)
    path = job.save(sr, "sr.dcm")
    assert dciodvfy_errors(path) == []
    dataset = pydicom.dcmread(path)
    groups = _assert_ohif_can_draw_and_track(dataset).values()
    assert [_text(g, "121106") for g in groups] == [
        "Lungs (1/2) (QC FAILED)", "Lungs (2/2) (QC FAILED)", "Body (QC FAILED)",
        "Pulmonary emphysema: Present (87 %) (QC FAILED)",
        "Image measurements (QC FAILED)"]
    assert dataset.SeriesDescription.startswith("QC FAILED AI: Lung CT segmentation")
    (evaluations,) = [i for i in dataset.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert [(i.ValueType, i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue)
            for i in evaluations.ContentSequence] == [
        ("TEXT", "Quality Finding", f"QC FAILED: {r}") for r in QC_FAILURES]
    assert (dataset.CompletionFlag, dataset.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert len(hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()) == 2

    unflagged = build_measurement_report(job.headers, job.volume, job.output, job.manifest, "job-1", 301, seg)
    assert "QC FAILED" not in str(unflagged.ContentSequence) and "QC" not in unflagged.SeriesDescription
    assert not [i for i in unflagged.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]


def test_key_images_of_a_flagged_result_carry_a_red_qc_failed_line_under_the_disclaimer(job):
    flagged = build_key_images(job.headers, job.volume, job.output, job.manifest, "job-1", 302,
                               max_images=1, qc_failures=QC_FAILURES)[0]
    plain = build_key_images(job.headers, job.volume, job.output, job.manifest, "job-1", 302, max_images=1)[0]
    assert dciodvfy_errors(job.save(flagged, "flagged.dcm")) == []
    assert flagged.SOPInstanceUID == plain.SOPInstanceUID  # the same image, flagged
    assert flagged.SeriesDescription.startswith("QC FAILED AI: Lung CT segmentation")
    assert flagged.ImageComments == ("AI RESULT - NOT FOR PRIMARY DIAGNOSIS; QC FAILED: " + QC_FAILURES[0]
                                     + "; QC FAILED: " + QC_FAILURES[1])
    assert plain.ImageComments == "AI RESULT - NOT FOR PRIMARY DIAGNOSIS" and "QC" not in plain.SeriesDescription

    red_rows = np.flatnonzero((flagged.pixel_array == QC_RED).all(axis=2).any(axis=1))
    yellow_rows = np.flatnonzero((flagged.pixel_array == (255, 255, 0)).all(axis=2).any(axis=1))
    assert len(red_rows) > 0 and red_rows.min() > yellow_rows.max()  # right under the disclaimer
    assert not (plain.pixel_array == QC_RED).all(axis=2).any()
    changed = np.flatnonzero((flagged.pixel_array != plain.pixel_array).any(axis=(1, 2)))
    assert changed.max() < flagged.Rows // 3  # only the (taller) banner differs; the image is the same


def test_qc_banner_lines_wrap_cut_and_summarise():
    def fits(text):
        return len(text) <= 30

    assert qc_banner_lines([], fits) == []
    assert qc_banner_lines(["volume too small"], fits) == ["QC FAILED: volume too small"]
    assert qc_banner_lines(["lung volume 8.2 mL is below the minimum"], fits) == [
        "QC FAILED: lung volume 8.2 mL", "is below the minimum"]
    long = qc_banner_lines(["word " * 40], fits)  # at most two lines per failure
    assert len(long) == 2 and long[1].endswith("...") and fits(long[1])
    many = qc_banner_lines([f"check {n} failed" for n in range(6)], fits)
    assert many == ["QC FAILED: check 0 failed", "QC FAILED: check 1 failed", "QC FAILED: check 2 failed",
                    "+3 more failed quality checks (see the SR)"]


def test_key_image_is_where_the_segment_is_largest_not_its_first_slice(job):
    """Without the model's key slices the key image is the slice with the largest segment area
    (for lungs: mid-lung), not the first slice that has any mask; a model key slice without any
    segment on it is not shown."""
    mask = np.zeros(job.volume.shape, dtype=bool)
    mask[2, 10:12, 10:12] = True  # the first slice with mask: a sliver
    mask[3:9, 5:20, 5:25] = True
    mask[6, 3:22, 3:28] = True  # largest here
    output = ModelOutput(segments=[SegmentMask("lung", mask)])
    assert pick_key_slices(job.volume, output, 1) == [6]
    output.key_slices = [0, 1]  # no mask on either
    assert pick_key_slices(job.volume, output, 1) == [6]
    output.key_slices = [4]
    assert pick_key_slices(job.volume, output, 1) == [4]
    (image,) = build_key_images(job.headers, job.volume, ModelOutput(segments=[SegmentMask("lung", mask)]),
                                job.manifest, "job-1", 302, max_images=1)
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == job.volume.source_frames[6].sop_instance_uid
    output.key_slices = []  # the SR outlines the segment on the same slice
    sr = build_measurement_report(job.headers, job.volume, output, job.manifest, "job-1", 301,
                                  build_segmentation(job.headers, job.volume, output, job.manifest, "job-1", 300))
    (area,) = _children(_groups(sr)[0], "NUM")
    source = area.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == job.volume.source_frames[6].sop_instance_uid


def test_encode_results_flags_every_series_of_a_flagged_result(job):
    from dicom_ai_node.jobs.encode import encode_results
    job.output.derived_pixels = job.series.hu
    flagged = encode_results(job.headers, job.volume, job.output, job.manifest, "job-1", qc_failures=QC_FAILURES)
    plain = encode_results(job.headers, job.volume, job.output, job.manifest, "job-1")
    assert {kind for kind, _ in flagged} == {"seg", "derived", "sr", "key_image"}
    for (kind, dataset), (_, unflagged) in zip(flagged, plain):
        assert dataset.SOPInstanceUID == unflagged.SOPInstanceUID
        assert dataset.SeriesDescription == f"QC FAILED {unflagged.SeriesDescription}"[:64], kind
        assert "QC" not in unflagged.SeriesDescription
