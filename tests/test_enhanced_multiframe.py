"""Enhanced multi-frame CT/MR (what current Siemens, Philips and Canon scanners send) is indexed,
routed and segmented like the classic series it came from (issue 10).

Such an object keeps orientation, spacing, thickness and rescale in its functional groups, not
at the top level; before issue 10 the index only saw the top level, so a rule with
``orientation = "axial"`` skipped every enhanced series ("no ImageOrientationPatient").

The enhanced CT is made from a synthetic classic series with highdicom's
LegacyConvertedEnhancedCTImage (one object, one frame per classic slice); the end-to-end test
sends both with storescu to a real node and compares the two SEGs Orthanc receives in
patient space.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_ai_node.db.engine import Database
from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.index import ReceivedInstance, header_attributes, record_instance
from dicom_ai_node.router import series_facts
from dicom_ai_node.routing import SeriesSelector
from model_zoo.manifest import load_manifest
from model_zoo.registry import check_input
from tests.conftest import PROJECT_ROOT, SHARED_DATA
from tests.dciodvfy import dciodvfy_errors
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import CORONAL, SyntheticSeries, make_ct_series
from tests.test_end_to_end import (
    COMPREHENSIVE_3D_SR,
    SECONDARY_CAPTURE,
    SEG,
    results_in_orthanc,
)

LUNG_MANIFEST = PROJECT_ROOT / "model_zoo" / "lung_ct_seg" / "model.toml"


def make_enhanced_ct(series: SyntheticSeries, path: Path) -> Path:
    """The classic series as one Legacy Converted Enhanced CT object (same study and frame of
    reference, a new series)."""
    classic = [pydicom.dcmread(p) for p in series.paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        classic, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(path, enforce_file_format=True)
    return path


def index(database: Database, path: Path) -> None:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    with database.session() as session:
        record_instance(session, ReceivedInstance(
            header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, header.SOPClassUID,
            header.file_meta.TransferSyntaxUID, str(path), path.stat().st_size, "STORESCU", header))


def test_index_and_selector_see_an_enhanced_ct_like_its_classic_series(tmp_path, database):
    classic = make_ct_series(tmp_path / "ct", shape=(20, 32, 32), spacing=(2.5, 0.8, 0.7))
    enhanced = make_enhanced_ct(classic, tmp_path / "enhanced" / "ct.dcm")
    for path in [*classic.paths, enhanced]:
        index(database, path)

    with database.session() as session:
        facts = {f.series_instance_uid: f for f in series_facts(session, classic.study_instance_uid)}
    enhanced_uid = pydicom.dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID
    attributes = facts[enhanced_uid].attributes
    assert attributes["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert attributes["PixelSpacing"] == [0.8, 0.7]
    assert attributes["SliceThickness"] == 2.5
    assert facts[enhanced_uid].instance_count == 20  # its frames

    chosen, reason = SeriesSelector(orientation="axial", min_slices=16).select(list(facts.values()))
    assert sorted(chosen) == sorted([classic.series_instance_uid, enhanced_uid]), reason
    _, reason = SeriesSelector(orientation="axial", pick="thinnest").select([facts[enhanced_uid]])
    assert "SliceThickness 2.5 mm, 20 slices" in reason


def test_per_frame_orientation_counts_when_every_frame_agrees(tmp_path):
    """Siemens XA puts PlaneOrientation and PixelMeasures in every per-frame item instead of the
    shared groups; a frame with another orientation leaves the series' orientation unknown."""
    classic = make_ct_series(tmp_path / "ct", shape=(4, 16, 16))
    enhanced = pydicom.dcmread(make_enhanced_ct(classic, tmp_path / "enhanced" / "ct.dcm"))
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        for frame in enhanced.PerFrameFunctionalGroupsSequence:
            setattr(frame, keyword, copy.deepcopy(shared[keyword].value))
        del shared[keyword]

    attributes = header_attributes(enhanced)
    assert attributes["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert attributes["SliceThickness"] == 2.5

    last = enhanced.PerFrameFunctionalGroupsSequence[-1]
    last.PlaneOrientationSequence[0].ImageOrientationPatient = list(CORONAL)
    assert "ImageOrientationPatient" not in header_attributes(enhanced)
    assert header_attributes(enhanced)["SliceThickness"] == 2.5


def test_loaded_enhanced_ct_equals_its_classic_series_and_fits_the_lung_model(tmp_path):
    classic = make_ct_series(tmp_path / "ct", shape=(20, 32, 32), spacing=(2.5, 3.5, 3.5))
    path = make_enhanced_ct(classic, tmp_path / "enhanced" / "ct.dcm")
    from_classic = load_series(classic.paths)
    from_enhanced = load_series([path])

    np.testing.assert_array_equal(from_enhanced.pixels, from_classic.pixels)
    np.testing.assert_allclose(from_enhanced.origin, from_classic.origin)
    assert from_enhanced.spacing == pytest.approx(from_classic.spacing)
    # RescaleSlope/Intercept live in the functional groups; the lung model requires them
    assert from_enhanced.attributes["RescaleIntercept"] == -1024.0
    assert check_input(load_manifest(LUNG_MANIFEST), from_enhanced.attributes, from_enhanced.shape[0],
                       from_enhanced.spacing) == []


@pytest.mark.parametrize("relative", ["pydicom__pydicom-data/data_store/data/eCT_Supplemental.dcm",
                                      "neurolabusc__dcm_qa_enh/In/Siemens/XA10/6_1.dcm"])
def test_real_enhanced_objects_are_indexed_with_their_orientation(relative):
    """A real Enhanced CT (orientation in the shared groups) and a real Siemens XA Enhanced MR
    (orientation per frame): the index has the orientation the loader builds the volume with."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not present")
    attributes = header_attributes(read_header(path))
    volume = load_series([path])
    np.testing.assert_allclose(attributes["ImageOrientationPatient"],
                               [*volume.row_direction, *volume.column_direction], atol=1e-5)
    assert attributes["PixelSpacing"] == pytest.approx(volume.spacing[1:])


RULES = """
[[rules]]
name = "axial-ct-lungs"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
when = { tag = "Modality", equals = "CT" }
[rules.series]
orientation = "axial"
min_slices = 16
pick = "all"
"""


@pytest.mark.integration
@skip_unless_tools("storescu", "/usr/sbin/Orthanc")
def test_enhanced_ct_gets_the_same_seg_as_its_classic_series(tmp_path, orthanc):
    classic = make_ct_series(tmp_path / "ct", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5), seed="enhanced")
    enhanced_path = make_enhanced_ct(classic, tmp_path / "enhanced" / "ct.dcm")
    enhanced = pydicom.dcmread(enhanced_path, stop_before_pixels=True)
    study_uid = classic.study_instance_uid
    with NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                     rules=RULES) as node:
        sent = storescu("127.0.0.1", node.port, [tmp_path / "ct", enhanced_path], NODE_AE)
        assert not storescu_failures(sent), sent.stdout + sent.stderr
        decision = wait_for(lambda: next((d for d in node.study(study_uid)["decisions"] if d["matched"]), None),
                            timeout=60, what="routing decision")
        # before issue 10: "skipped <enhanced> (no ImageOrientationPatient, not axial)"
        assert sorted(decision["detail"]["selected_series"]) == sorted(
            [classic.series_instance_uid, enhanced.SeriesInstanceUID]), decision["detail"]["reasons"]
        wait_for(lambda: [j["state"] for j in node.study(study_uid)["jobs"]] == ["done", "done"],
                 timeout=300, what="both jobs done")
    found = results_in_orthanc(orthanc, study_uid)
    assert len(found[SEG]) == len(found[COMPREHENSIVE_3D_SR]) == 2 and len(found[SECONDARY_CAPTURE]) >= 2
    for orthanc_id in [i for ids in found.values() for i in ids]:
        path = tmp_path / f"{orthanc_id}.dcm"
        path.write_bytes(orthanc.instance_file(orthanc_id))
        assert dciodvfy_errors(path) == [], f"{pydicom.dcmread(path).SOPClassUID.name}: dciodvfy errors"

    by_source = {}
    for orthanc_id in found[SEG]:
        seg = hd.seg.segread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        by_source[seg.ReferencedSeriesSequence[0].SeriesInstanceUID] = seg
    from_classic = by_source[classic.series_instance_uid].get_volume(segment_numbers=[1])
    from_enhanced = by_source[enhanced.SeriesInstanceUID].get_volume(segment_numbers=[1])

    # the same voxels in the patient: same grid (affine) and the same mask on it
    np.testing.assert_allclose(from_enhanced.affine, from_classic.affine, atol=1e-4)
    assert from_enhanced.array.shape == from_classic.array.shape
    np.testing.assert_array_equal(from_enhanced.array, from_classic.array)
    # and it is the lungs, not an empty mask that would match anything
    mask = by_source[classic.series_instance_uid].get_pixels_by_source_instance(
        classic.sop_instance_uids)[..., 0].astype(bool)
    dice = 2 * (mask & classic.lung_mask).sum() / (mask.sum() + classic.lung_mask.sum())
    assert dice > 0.8, f"lung Dice {dice:.2f}"

    # the SRs measure the same lungs
    volumes = []
    for orthanc_id in found[COMPREHENSIVE_3D_SR]:
        sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        volumes += [m.value for group in sr.content.get_volumetric_roi_measurement_groups()
                    for m in group.get_measurements() if m.name.value == "118565006"]
    assert len(volumes) == 2 and volumes[0] == pytest.approx(volumes[1], rel=1e-6)
