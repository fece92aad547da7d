"""Issue 18's quirk corpus end to end: storescu -> node (the shipped rules) -> Orthanc -> dciodvfy.

Each case is a real chest CT series (TCIA 4D-Lung, tests/quirk_corpus.py) with one thing real
archives get wrong: a private element of the wrong length, a Frame of Reference per slice or
none, missing Type 2 attributes, Referenced* items without their Type 1 attributes, lower-case
code strings, retired person names and three character sets, DS of 20 characters, MONOCHROME1,
pixel padding, signed and unsigned slices, rescale per slice, gantry tilt, a slice without a
position, duplicate instance numbers, mixed matrix sizes, files without a preamble, Deflate,
big-endian and JPEG-LS transfer syntaxes, undefined-length sequences, 8 mm slices.

One node and one Orthanc take every case at once (each case its own study); then, per case:
every instance is stored; the job ends with a result in Orthanc or is refused before inference
with its reason (never a failure after inference); the rule's "no result" notice reaches
Orthanc for a refusal; and everything the node sent passes dciodvfy with 0 errors. A case that
gives a result must segment the lungs as the clean case does (same pixels: same mask size).
"""

from __future__ import annotations

import io
import shutil
import tomllib
from dataclasses import dataclass, field

import numpy as np
import pytest
from pydicom import dcmread

from dicom_ai_node.routing.rules import parse_rules
from dicom_ai_node.routing.toml_writer import rules_to_toml
from tests.conftest import PROJECT_ROOT, SHARED_DATA, requires_shared_data
from tests.dciodvfy import DCIODVFY, dciodvfy_errors
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import OrthancPeer, skip_unless_tools, storescu, storescu_failures, wait_for
from tests.quirk_corpus import CASE_NAMES, NOT_KEPT_BY_STORESCU, lung_volume_ml, make_quirk_corpus

pytestmark = [pytest.mark.integration, pytest.mark.shared_data, requires_shared_data,
              skip_unless_tools("storescu", "/usr/sbin/Orthanc")]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
NOTICE_SERIES_NUMBER = 9006
FINISHED = {"done", "failed", "dropped", "held", "rejected"}


def shipped_rules(**changes) -> str:
    """The [[rules]] of the shipped config.toml (what a new site runs), with ``changes`` made
    to each rule (here: the "no result" notice on)."""
    data = tomllib.loads((PROJECT_ROOT / "config.toml").read_text())
    rules = [{**rule, **changes} for rule in data["rules"]]
    return rules_to_toml(parse_rules(rules, "config.toml"))


@dataclass
class Outcome:
    failures: list = field(default_factory=list)  # storescu's
    stored: int = 0
    jobs: list[dict] = field(default_factory=list)
    in_orthanc: dict[str, list[str]] = field(default_factory=dict)  # SOP class -> Orthanc ids
    dciodvfy: dict[str, list[str]] = field(default_factory=dict)  # Orthanc id -> errors
    seg_voxels: int | None = None
    seg_ml: float | None = None
    notice_reason: str | None = None
    sr_repairs: list[str] = field(default_factory=list)  # the SR's "Input repaired" texts
    patient_names: set[str] = field(default_factory=set)  # of every object sent, as read back


@pytest.fixture(scope="module")
def corpus_outcomes(tmp_path_factory):
    """Every case sent at once to one node; the outcome of each, once all have settled."""
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy not installed (apt install dicom3tools)")
    root = tmp_path_factory.mktemp("quirks")
    cases = make_quirk_corpus(root / "corpus", SHARED_DATA)
    orthanc = OrthancPeer(workdir=root / "orthanc", dicomweb=False).start()
    node = NodeProcess(root / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=shipped_rules(no_result_notice=True), quiet_period_s=1.0,
                       extra="[workers]\ncount = 2\n")
    outcomes: dict[str, Outcome] = {}
    try:
        with node:
            for case in cases:
                if case.name in NOT_KEPT_BY_STORESCU:  # its quirk would not reach the node
                    outcomes[case.name] = Outcome(failures=send_with_pynetdicom(node.port, case.folder))
                    continue
                result = storescu("127.0.0.1", node.port, case.folder, NODE_AE, extra_args=case.storescu_args)
                outcomes[case.name] = Outcome(failures=storescu_failures(result))

            def settled(case) -> bool:
                jobs = node.study(case.study_instance_uid)["jobs"]
                return bool(jobs) and all(job["state"] in FINISHED and not _pending(job) for job in jobs)

            wait_for(lambda: all(settled(case) for case in cases), timeout=900, interval=2,
                     what="every quirk case's job finished and its objects delivered")
            for case in cases:
                outcome = outcomes[case.name]
                detail = node.study(case.study_instance_uid)
                outcome.stored = sum(s["instances"] for s in detail["series"] if not s["is_result"])
                outcome.jobs = detail["jobs"]
                for series in orthanc.study_series(case.study_instance_uid):
                    for sop_class in series["SOPClassUIDs"]:
                        outcome.in_orthanc.setdefault(sop_class, []).extend(series["Instances"])
                    for orthanc_id in series["Instances"]:
                        data = orthanc.instance_file(orthanc_id)
                        path = root / "sent" / case.name / f"{orthanc_id}.dcm"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
                        outcome.dciodvfy[orthanc_id] = dciodvfy_errors(path)
                        dataset = dcmread(io.BytesIO(data))
                        outcome.patient_names.add(str(dataset.get("PatientName", "")))
                        if series["SeriesNumber"] == str(NOTICE_SERIES_NUMBER):
                            outcome.notice_reason = str(dataset.ImageComments)
                        elif dataset.SOPClassUID == SEG:
                            import highdicom as hd

                            seg = hd.seg.segread(io.BytesIO(data))
                            volume = seg.get_volume()
                            outcome.seg_voxels = int(volume.array.astype(bool).sum())
                            outcome.seg_ml = outcome.seg_voxels * float(np.prod(volume.spacing)) / 1000
                        elif dataset.SOPClassUID == COMPREHENSIVE_3D_SR:
                            outcome.sr_repairs = _repairs_in(dataset)
            node_log = node.log()
    finally:
        orthanc.cleanup()
    yield cases, outcomes, node_log
    shutil.rmtree(root, ignore_errors=True)


def send_with_pynetdicom(port: int, folder) -> list[str]:
    """C-STORE each file as pydicom read it (undefined lengths kept, unlike storescu); the
    failures, one line each."""
    from pynetdicom import AE

    files = sorted(folder.iterdir())
    first = dcmread(files[0])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert association.is_established
    failures = []
    try:
        for path in files:
            status = association.send_c_store(dcmread(path))
            if not status or status.Status != 0:
                failures.append(f"{path.name}: {status}")
    finally:
        association.release()
    return failures


def _repairs_in(sr) -> list[str]:
    """The TEXT values of the SR's "Input repaired before processing" items (99DAINODE INPUTFIX)."""
    found = []

    def walk(items):
        for item in items:
            names = item.get("ConceptNameCodeSequence", [])
            if names and names[0].CodeValue == "INPUTFIX":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


def _pending(job: dict) -> bool:
    return any(d["state"] == "pending" for r in job["results"] for d in r["deliveries"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_quirk_case_is_stored_then_processed_or_refused_before_inference(corpus_outcomes, name):
    cases, outcomes, _ = corpus_outcomes
    case = next(c for c in cases if c.name == name)
    outcome = outcomes[name]
    summary = f"{name}: {case.what}; jobs {[(j['state'], j['failed_step'], j['reason']) for j in outcome.jobs]}"

    assert not outcome.failures, f"{summary}: storescu failures {outcome.failures}"
    assert outcome.stored == len(case.sop_instance_uids), summary  # everything a PACS stores
    [job] = [j for j in outcome.jobs if j["model"] == "lung_ct_seg"]
    assert job["failed_step"] in (None, "input"), f"{summary}: a job may never fail after inference"
    for orthanc_id, errors in outcome.dciodvfy.items():
        assert errors == [], f"{summary}: dciodvfy errors in what the node sent ({orthanc_id})"

    first = dcmread(next(case.folder.iterdir()), stop_before_pixels=True, force=True)  # force: no preamble
    source_name = str(first.get("PatientName", ""))
    assert outcome.patient_names == {source_name}, f"{summary}: names as sent {outcome.patient_names}"

    if case.expect == "result":
        assert job["state"] == "done", summary
        assert SEG in outcome.in_orthanc, summary
        if name == "thick_slices_8mm":  # the whole scan, other slices: against a threshold estimate
            reference = lung_volume_ml([dcmread(path) for path in sorted(case.folder.iterdir())])
            assert outcome.seg_ml == pytest.approx(reference, rel=0.15), \
                f"{summary}: {outcome.seg_ml:.0f} mL of lung, about {reference:.0f} mL of lung density"
        else:  # the clean case's pixels: the same lungs
            clean = outcomes["clean"].seg_voxels
            assert clean and outcome.seg_voxels == pytest.approx(clean, rel=0.02), \
                f"{summary}: {outcome.seg_voxels} lung voxels, the clean case {clean}"
        assert outcome.notice_reason is None, summary
    else:
        assert job["state"] == "failed" and job["failed_step"] == "input", summary
        assert case.reason in job["reason"].lower(), summary
        assert SEG not in outcome.in_orthanc, summary
        assert outcome.notice_reason and case.reason in outcome.notice_reason.lower(), \
            f"{summary}: the 'no result' notice in Orthanc says {outcome.notice_reason!r}"


def test_repairs_are_said_on_the_job_and_in_the_sr(corpus_outcomes):
    _, outcomes, node_log = corpus_outcomes
    [job] = outcomes["frame_of_reference_per_slice"].jobs
    assert any("Frame of Reference" in note for note in job["input_notes"]), job["input_notes"]
    assert any("Frame of Reference" in text for text in outcomes["frame_of_reference_per_slice"].sr_repairs)
    [job] = outcomes["missing_type2_patient_study"].jobs
    assert any("PatientBirthDate was missing" in note for note in job["input_notes"]), job["input_notes"]
    assert any("PatientBirthDate" in text for text in outcomes["missing_type2_patient_study"].sr_repairs)
    assert outcomes["clean"].sr_repairs == [] and outcomes["clean"].jobs[0]["input_notes"] == []
    assert "Traceback" not in node_log
