"""Issue 12 §3/§4 with real peers: Orthanc is the PACS holding a patient's prior chest CT; the
follow-up CT arrives at the node by storescu; the node C-FINDs (study, then series level) and
C-MOVEs the prior from Orthanc to itself, the lung job gets both volumes, and the SR delivered
to Orthanc reports both studies' measurements and their change. The prior study gets no
results of its own. Without a prior in the PACS, or with the source down, the job runs and
says why it has no prior. tests/test_priors_dicomweb.py does the same by QIDO-RS and WADO-RS.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from tests.dciodvfy import dciodvfy_errors
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import free_port, skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series
from tests.test_end_to_end import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, SEG, all_results_arrived

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "/usr/sbin/Orthanc")]

VOLUME, MEAN_HU, LAA = "118565006", "112181", "LAA950"
PATIENT = "PRIOR-PATIENT-7"

RULES = """
[[rules]]
name = "chest-ct-lungs-with-prior"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
priors = {{ same_modality = true, body_part = "CHEST", within_days = 1095, max = 1 }}
source = "{source}"
when = {{ all = [ {{ tag = "Modality", equals = "CT" }}, {{ tag = "BodyPartExamined", one_of = ["CHEST"] }} ] }}
[rules.series]
orientation = "axial"
min_slices = 16
pick = "thinnest"
{extra}
"""
CALLERS = '{ ae_title = "STORESCU" }, { ae_title = "ECHOSCU" }, { ae_title = "ORTHANC" }'


def set_study_date(series, day: str) -> None:
    for path in series.paths:
        ds = dcmread(path)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
        ds.save_as(path, enforce_file_format=True)


def follow_up(tmp_path):
    series = make_ct_series(tmp_path / "follow-up", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5),
                            seed="follow-up", patient_id=PATIENT)
    return series


def node_for(tmp_path, orthanc, source: str = "pacs", extra: str = "") -> NodeProcess:
    return NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES.format(source=source, extra=extra), allowed_callers=CALLERS)


def measurements(group) -> dict[str, float]:
    return {m.name.value: m.value for m in group.get_measurements()}


def sr_of(orthanc, tmp_path, study_uid):
    found = wait_for(lambda: all_results_arrived(orthanc, study_uid), timeout=300,
                     what="SEG, SR and key images in Orthanc")
    sr_bytes = orthanc.instance_file(found[COMPREHENSIVE_3D_SR][0])
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    return found, hd.sr.srread(io.BytesIO(sr_bytes))


def comparison_text(sr) -> list[str]:
    """The report's "Comparison with prior study" texts (TID 1500 Qualitative Evaluations)."""
    return [str(inner.TextValue) for outer in sr.ContentSequence
            if outer.ConceptNameCodeSequence[0].CodeValue == "C0034375"
            for inner in outer.ContentSequence if inner.ConceptNameCodeSequence[0].CodeValue == "PRIOR"]


def priors_in(orthanc, tmp_path):
    """The patient's prior chest CT (20230110) and another patient's later CT, in Orthanc."""
    prior = make_ct_series(tmp_path / "prior", shape=(40, 96, 96), spacing=(2.5, 3.8, 3.8), seed="prior",
                           patient_id=PATIENT)
    set_study_date(prior, "20230110")
    other_patient = make_ct_series(tmp_path / "other", shape=(20, 48, 48), spacing=(2.5, 3.5, 3.5), seed="other",
                                   patient_id="SOMEONE-ELSE")
    set_study_date(other_patient, "20231201")
    for path in [*prior.paths, *other_patient.paths]:
        orthanc.upload(path)
    return prior


def test_follow_up_gets_the_change_since_its_prior_fetched_from_orthanc(tmp_path, orthanc):
    prior = priors_in(orthanc, tmp_path)
    current = follow_up(tmp_path)
    with node_for(tmp_path, orthanc) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "follow-up", NODE_AE))
        found, sr = sr_of(orthanc, tmp_path, current.study_instance_uid)
        detail = wait_for(lambda: (d := node.study(current.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")
        prior_detail = node.study(prior.study_instance_uid)

    (fetch,) = detail["prior_fetches"]
    assert fetch["state"] == "done" and fetch["prior_study_instance_uid"] == prior.study_instance_uid
    assert fetch["prior_series_instance_uid"] == prior.series_instance_uid
    assert fetch["received_instances"] == fetch["expected_instances"] == 40
    assert [s["step"] for s in fetch["steps"]] == ["C-FIND STUDY", "C-FIND SERIES", "C-MOVE"]
    assert_compared_with_prior(tmp_path, orthanc, detail, prior_detail, found, sr, current, prior)


def assert_compared_with_prior(tmp_path, orthanc, detail, prior_detail, found, sr, current, prior) -> None:
    """The job compared with the prior; its SR (and SEG, key images) report both studies and the
    change, and pass dciodvfy; the prior itself got no results."""
    assert detail["jobs"][0]["prior"] == f"compared with prior study {prior.study_instance_uid} (20230110)"
    # the prior came to the node, but was not routed: no jobs, nothing sent back for it
    assert prior_detail["state"] == "complete" and prior_detail["jobs"] == []
    assert prior_detail["prior_fetches"][0]["is_prior_here"]
    assert [s["SeriesInstanceUID"] for s in orthanc.study_series(prior.study_instance_uid)] == [
        prior.series_instance_uid]

    voxel_now, voxel_then = 2.5 * 3.5 * 3.5 / 1000, 2.5 * 3.8 * 3.8 / 1000
    (now,) = sr.content.get_volumetric_roi_measurement_groups()
    values = measurements(now)
    assert values[VOLUME] == pytest.approx(current.lung_mask.sum() * voxel_now, rel=0.15)
    priors = [g for g in sr.content.get_image_measurement_groups(tracking_uid=now.tracking_uid)
              if VOLUME in measurements(g)]
    assert len(priors) == 1
    before = measurements(priors[0])
    assert before[VOLUME] == pytest.approx(prior.lung_mask.sum() * voxel_then, rel=0.15)
    assert before[VOLUME] > values[VOLUME] * 1.05  # the prior's larger voxels: more lung
    changes = {m.name.value: m.value for m in now.get_measurements() if m.name.value.startswith("CHG-")}
    assert changes["CHG-" + VOLUME] == pytest.approx(values[VOLUME] - before[VOLUME], abs=1e-3)
    assert changes["CHG-" + MEAN_HU] == pytest.approx(values[MEAN_HU] - before[MEAN_HU], abs=1e-3)
    assert changes["CHG-" + LAA] == pytest.approx(values[LAA] - before[LAA], abs=1e-3)
    # the same tracking identifier and UID for this study and the prior; both studies referenced
    assert priors[0].tracking_identifier == now.tracking_identifier
    assert now.tracking_uid.startswith("2.25.")
    other = [str(item.StudyInstanceUID) for item in sr.PertinentOtherEvidenceSequence]
    assert other == [prior.study_instance_uid]
    referenced = {str(s.ReferencedSOPInstanceUID) for item in sr.PertinentOtherEvidenceSequence
                  for series in item.ReferencedSeriesSequence for s in series.ReferencedSOPSequence}
    assert referenced == set(prior.sop_instance_uids)
    assert any("compared with prior study " + prior.study_instance_uid in t for t in comparison_text(sr))
    seg = hd.seg.segread(io.BytesIO(orthanc.instance_file(found[SEG][0])))
    assert seg.SegmentSequence[0].TrackingUID == now.tracking_uid

    for orthanc_id in found[SECONDARY_CAPTURE]:
        path = tmp_path / f"{orthanc_id}.dcm"
        path.write_bytes(orthanc.instance_file(orthanc_id))
        assert dciodvfy_errors(path) == []


def test_without_a_prior_in_the_pacs_the_job_runs_and_says_so(tmp_path, orthanc):
    current = follow_up(tmp_path)
    with node_for(tmp_path, orthanc) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "follow-up", NODE_AE))
        _found, sr = sr_of(orthanc, tmp_path, current.study_instance_uid)
        detail = wait_for(lambda: (d := node.study(current.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")
    (fetch,) = detail["prior_fetches"]
    assert fetch["state"] == "not_found" and fetch["prior_study_instance_uid"] is None
    assert fetch["steps"][0]["outcome"].startswith("0 studies answered")
    assert detail["jobs"][0]["prior"].startswith("ran without prior: no prior in pacs")
    assert any(t.startswith("ran without prior: no prior in pacs") for t in comparison_text(sr))
    assert "PertinentOtherEvidenceSequence" not in sr


def test_a_source_that_is_down_fails_the_fetch_and_the_job_runs_without_it(tmp_path, orthanc):
    current = follow_up(tmp_path)
    archive = (f'[[destinations]]\nname = "archive"\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\n'
               f"port = {free_port()}\ntimeout_s = 5\n")
    with node_for(tmp_path, orthanc, source="archive", extra=archive) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "follow-up", NODE_AE))
        _found, sr = sr_of(orthanc, tmp_path, current.study_instance_uid)
        detail = wait_for(lambda: (d := node.study(current.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")
    (fetch,) = detail["prior_fetches"]
    assert fetch["state"] == "failed" and "cannot connect to ARCHIVE@127.0.0.1" in fetch["reason"]
    assert detail["jobs"][0]["prior"] == "ran without prior: " + fetch["reason"]
    assert any(t.startswith("ran without prior: archive: cannot connect") for t in comparison_text(sr))
