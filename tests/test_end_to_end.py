"""The whole path with real peers: dcmtk storescu (scanner) -> node -> Orthanc (PACS).

A CT series is pushed; a few seconds later Orthanc holds a SEG, a TID 1500 SR and key images
in the same study; each passes dciodvfy and reads back with highdicom; the SEG finds the
phantom's lungs where they are. Then the node is killed (SIGKILL) at awkward moments and
must lose nothing and deliver each result exactly once.
"""

from __future__ import annotations

import io
import sqlite3

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from tests.dciodvfy import dciodvfy_errors
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "/usr/sbin/Orthanc")]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

RULES = """
[[rules]]
name = "chest-ct-lungs"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
when = { all = [ { tag = "Modality", equals = "CT" }, { tag = "BodyPartExamined", one_of = ["CHEST"] } ] }
[rules.series]
orientation = "axial"
min_slices = 16
pick = "thinnest"
"""


def results_in_orthanc(orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP class -> Orthanc instance ids of the results in the study."""
    found: dict[str, list[str]] = {}
    for series in orthanc.study_series(study_uid):
        for sop_class in set(series["SOPClassUIDs"]):
            if sop_class in (SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
                found.setdefault(sop_class, []).extend(
                    i["ID"] for i in orthanc.rest_get(f"/series/{series['ID']}/instances"))
    return found


def all_results_arrived(orthanc, study_uid):
    found = results_in_orthanc(orthanc, study_uid)
    return found if {SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE} <= set(found) else None


def make_node(tmp_path, orthanc, **kwargs) -> NodeProcess:
    return NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, **kwargs)


def test_study_gets_seg_sr_and_key_images_in_the_pacs(tmp_path, orthanc):
    series = make_ct_series(tmp_path / "ct", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5))  # an adult-sized chest
    with make_node(tmp_path, orthanc) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        found = wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=180,
                         what="SEG, SR and key images in Orthanc")
        detail = wait_for(lambda: (d := node.study(series.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=30, what="job done")

    assert len(found[SEG]) == 1 and len(found[COMPREHENSIVE_3D_SR]) == 1
    for sop_class, ids in found.items():
        for orthanc_id in ids:
            path = tmp_path / f"{orthanc_id}.dcm"
            path.write_bytes(orthanc.instance_file(orthanc_id))
            assert dciodvfy_errors(path) == [], f"{sop_class}: dciodvfy errors"
            assert dcmread(path).StudyInstanceUID == series.study_instance_uid

    seg = hd.seg.segread(io.BytesIO(orthanc.instance_file(found[SEG][0])))
    # the SEG, read back in source order, overlaps the phantom's lungs (no flips, right slices)
    mask = seg.get_pixels_by_source_instance(series.sop_instance_uids)[..., 0].astype(bool)
    dice = 2 * (mask & series.lung_mask).sum() / (mask.sum() + series.lung_mask.sum())
    assert dice > 0.8, f"lung Dice {dice:.2f}"

    sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(found[COMPREHENSIVE_3D_SR][0])))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups, "TID 1500 report without a volumetric ROI group"
    volume = [m for m in groups[0].get_measurements() if m.name.value == "118565006"]
    assert volume and volume[0].unit.value == "ml"
    seg_ml = mask.sum() * 2.5 * 3.5 * 3.5 / 1000  # the SR measures what the SEG shows
    assert volume[0].value == pytest.approx(seg_ml, rel=1e-3)

    job = detail["jobs"][0]
    assert job["model"] == "lung_ct_seg" and job["timings"]["inference_s"] > 0
    matched = [d for d in detail["decisions"] if d["matched"]]
    assert [d["rule"] for d in matched] == ["chest-ct-lungs"]
    assert any("BodyPartExamined" in reason for reason in matched[0]["detail"]["reasons"])


def test_series_the_model_cannot_take_fails_with_a_reason(tmp_path, orthanc):
    make_ct_series(tmp_path / "ct", shape=(20, 48, 48), spacing=(12.0, 1.0, 1.0), seed="thick")
    with make_node(tmp_path, orthanc) as node:
        storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE)
        study_uid = dcmread(next((tmp_path / "ct").iterdir())).StudyInstanceUID
        job = wait_for(lambda: (jobs := node.study(study_uid)["jobs"]) and jobs[0]["state"] == "failed"
                       and jobs[0], timeout=60, what="job failed")
    assert "spacing" in job["reason"], job["reason"]


def test_pacs_down_then_up_delivers_after_retries(tmp_path, orthanc):
    # an adult-sized chest (64 pixels of 4.5 mm): lungs of about 770 mL, within the plausible range
    series = make_ct_series(tmp_path / "ct", shape=(32, 64, 64), spacing=(2.5, 4.5, 4.5), seed="retry")
    orthanc.stop()  # the PACS is down when results are ready
    with make_node(tmp_path, orthanc, max_attempts=8, backoff_s=1.0) as node:
        storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE)
        wait_for(lambda: any(r["deliveries"][0]["attempts"] >= 1 and r["deliveries"][0]["last_error"]
                             for j in node.study(series.study_instance_uid)["jobs"] for r in j["results"]),
                 timeout=120, what="a failed delivery attempt")
        orthanc.start()
        wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=120,
                 what="results after the PACS came back")
        job = wait_for(lambda: (j := node.study(series.study_instance_uid)["jobs"][0])["state"] == "done" and j,
                       timeout=30, what="job done")
    attempts = [d["attempts"] for r in job["results"] for d in r["deliveries"]]
    assert max(attempts) >= 2


def _count(node, query):
    with sqlite3.connect(node.workdir / "node.db") as connection:
        return connection.execute(query).fetchone()[0]


def test_sigkill_while_the_job_runs_loses_nothing_and_delivers_once(tmp_path, orthanc):
    series = make_ct_series(tmp_path / "ct", shape=(48, 96, 96), spacing=(2.5, 3.5, 3.5), seed="crash")
    node = make_node(tmp_path, orthanc, quiet_period_s=0.5)
    node.start()
    try:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        wait_for(lambda: _count(node, "select count(*) from job where state in ('running','encoding')"),
                 timeout=60, interval=0.02, what="job running")
        node.kill()
        assert _count(node, "select count(*) from instance") == 48  # acknowledged = kept
        node.start()  # resumes the interrupted job
        found = wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=180,
                         what="results after restart")
        wait_for(lambda: node.study(series.study_instance_uid)["jobs"][0]["state"] == "done", timeout=30)
        # a second restart must not produce anything new
        node.stop()
        node.start()
        storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE)  # the scanner resends the study
        wait_for(lambda: node.study(series.study_instance_uid)["state"] == "complete", timeout=30)
        detail = node.study(series.study_instance_uid)
    finally:
        node.stop()
    assert len(detail["jobs"]) == 1 and detail["jobs"][0]["attempts"] == 2
    assert len(found[SEG]) == 1 and len(found[COMPREHENSIVE_3D_SR]) == 1
    again = results_in_orthanc(orthanc, series.study_instance_uid)
    assert {k: len(v) for k, v in again.items()} == {k: len(v) for k, v in found.items()}
