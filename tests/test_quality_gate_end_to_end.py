"""The quality gate with real peers: dcmtk storescu (scanner) -> node (a real process, admin page
on) -> Orthanc (PACS).

Four chest CT phantoms are pushed, each a 9.6 mm slab whose lungs (about 57 mL) are smaller than the bundled
lung model's declared plausible range ([qc] volume_ml = [100, 12000] in its model.toml), so
every result fails a declared check, on the model's real output. Each phantom has its own
patient ID, which routes it by a rule with its own policy: two are held (the rule has no
qc_fail: the node default "hold"); nothing of them reaches Orthanc until an admin logs in and
submits the held-results page's own release form (with its CSRF token) for one, and its
reject button for the other. One is sent flagged (its SR and key images say QC FAILED), one is
dropped. The audit log has the release and the reject.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from html.parser import HTMLParser

import highdicom as hd
import httpx
import pytest
from pydicom import dcmread

from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series
from tests.test_end_to_end import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, SEG, all_results_arrived, results_in_orthanc

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "/usr/sbin/Orthanc")]

PASSWORD = "quality-gate-password"
CROPPED = dict(shape=(16, 64, 64), spacing=(0.6, 3.5, 3.5))  # lungs ~57 mL: below the declared 100 mL


def rule(name: str, patient_id: str, qc_fail: str | None) -> str:
    policy = f'qc_fail = "{qc_fail}"\n' if qc_fail else ""
    return f"""
[[rules]]
name = "{name}"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
{policy}when = {{ all = [ {{ tag = "Modality", equals = "CT" }}, {{ tag = "PatientID", equals = "{patient_id}" }} ] }}
[rules.series]
min_slices = 16
"""


RULES = (rule("lungs-review", "REVIEW-1", None) + rule("lungs-review-2", "REVIEW-2", None)
         + rule("lungs-flag", "FLAG", "send_flagged") + rule("lungs-drop", "DROP", "drop"))


class Forms(HTMLParser):
    """The forms of a page: action, hidden and other inputs, and the buttons' formactions."""

    def __init__(self, html: str):
        super().__init__()
        self.forms: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append({"action": attrs.get("action"), "inputs": {}, "formactions": []})
        elif tag == "input" and self.forms and attrs.get("name"):
            self.forms[-1]["inputs"][attrs["name"]] = attrs.get("value") or ""
        elif tag == "button" and self.forms and attrs.get("formaction"):
            self.forms[-1]["formactions"].append(attrs["formaction"])

    def with_action(self, action: str) -> dict:
        found = [form for form in self.forms if form["action"] == action]
        assert len(found) == 1, f"no single form posting to {action} on the page: {self.forms}"
        return found[0]


def log_in(base: str) -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    form = Forms(client.get("/login").text).with_action("/login")
    answer = client.post("/login", data={**form["inputs"], "name": "admin", "password": PASSWORD})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    return client


def jobs_of(node: NodeProcess, study_uid: str) -> list[dict]:
    return node.study(study_uid)["jobs"]


def job_in(node: NodeProcess, study_uid: str, state: str) -> dict | None:
    jobs = jobs_of(node, study_uid)
    return jobs[0] if jobs and jobs[0]["state"] == state else None


def qc_failed_findings(sr_bytes: bytes) -> list[str]:
    """The TEXT values of the SR's content tree that say QC FAILED (the encoder's finding)."""
    found, stack = [], list(dcmread(io.BytesIO(sr_bytes)).ContentSequence)
    while stack:  # bounded by the size of the tree
        item = stack.pop()
        if item.ValueType == "TEXT" and str(item.TextValue).startswith("QC FAILED"):
            found.append(str(item.TextValue))
        stack.extend(item.get("ContentSequence", []))
    return found


def test_failed_checks_are_held_until_released_on_the_admin_page_flagged_or_dropped(tmp_path, orthanc):
    studies = {name: make_ct_series(tmp_path / "ct" / name, seed=f"gate-{name}", patient_id=patient, **CROPPED)
               for name, patient in (("release", "REVIEW-1"), ("reject", "REVIEW-2"), ("flag", "FLAG"),
                                     ("drop", "DROP"))}
    uid = {name: series.study_instance_uid for name, series in studies.items()}
    node = NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, web=True)
    with node:
        subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(node.config_path), "users", "add",
                        "admin", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True, timeout=60)
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))

        held = {name: wait_for(lambda name=name: job_in(node, uid[name], "held"), timeout=240,
                               what=f"the {name} study's job held") for name in ("release", "reject")}
        dropped = wait_for(lambda: job_in(node, uid["drop"], "dropped"), timeout=240, what="the drop job dropped")
        flagged = wait_for(lambda: all_results_arrived(orthanc, uid["flag"]), timeout=240,
                           what="the flagged results in Orthanc")

        # held: the reason says which declared check failed; encoded, stored, and not sent
        for job in held.values():
            assert job["qc_policy"] == "hold" and job["reason"].startswith("held for review: lung volume ")
            volume = next(c for c in job["quality_checks"] if c["name"] == "lung volume")
            assert not volume["passed"] and volume["value"] < 100 and (volume["low"], volume["high"]) == (100, 12000)
            assert sorted(r["kind"] for r in job["results"]) == ["key_image", "seg", "sr"]
            assert all(r["deliveries"] == [] for r in job["results"])
        assert dropped["qc_policy"] == "drop" and dropped["results"] == []
        assert dropped["reason"].startswith("dropped: quality checks failed: lung volume ")
        time.sleep(3)  # several outbox rounds: still nothing of the held or dropped studies in the PACS
        for name in ("release", "reject", "drop"):
            assert results_in_orthanc(orthanc, uid[name]) == {}, name
            assert orthanc.find_study(uid[name]) is None, name

        # send_flagged: the SR carries the failed check as a finding; key images and series say so
        sr = orthanc.instance_file(flagged[COMPREHENSIVE_3D_SR][0])
        assert any(text.startswith("QC FAILED: lung volume ") for text in qc_failed_findings(sr))
        key_image = dcmread(io.BytesIO(orthanc.instance_file(flagged[SECONDARY_CAPTURE][0])))
        assert "QC FAILED: lung volume " in key_image.ImageComments
        assert key_image.SeriesDescription.startswith("QC FAILED")
        assert wait_for(lambda: job_in(node, uid["flag"], "done"), timeout=30)["qc_policy"] == "send_flagged"

        # an admin logs in, sees the held results with their key image, and uses the page's forms
        admin = log_in(node.web_url)
        page = admin.get("/held")
        assert page.status_code == 200 and "lung volume" in page.text
        release_job, reject_job = held["release"]["id"], held["reject"]["id"]
        key_image_id = next(r["id"] for r in held["release"]["results"] if r["kind"] == "key_image")
        assert f'src="/results/{key_image_id}/image.png"' in page.text
        png = admin.get(f"/results/{key_image_id}/image.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        forms = Forms(page.text)
        release = forms.with_action(f"/jobs/{release_job}/release")
        assert release["inputs"]["csrf_token"]
        answer = admin.post(release["action"], data={**release["inputs"], "comment": "lungs fine, small field of view"})
        assert answer.status_code == 303 and "released" in answer.headers["location"], answer.text
        reject = forms.with_action(f"/jobs/{reject_job}/release")
        [reject_action] = reject["formactions"]  # the form's Reject button
        answer = admin.post(reject_action, data={**reject["inputs"], "comment": "not lung"})
        assert answer.status_code == 303 and "rejected" in answer.headers["location"], answer.text

        released = wait_for(lambda: all_results_arrived(orthanc, uid["release"]), timeout=120,
                            what="the released results in Orthanc")
        done = wait_for(lambda: job_in(node, uid["release"], "done"), timeout=30, what="the released job done")
        rejected = jobs_of(node, uid["reject"])[0]
        audit = admin.get("/api/audit", params={"action": "jobs.re"}).json()
        metrics = httpx.get(f"{node.web_url}/metrics", timeout=30).text
        time.sleep(3)
        assert results_in_orthanc(orthanc, uid["reject"]) == {}  # rejected: never sent

    assert len(released[SEG]) == 1 and len(released[COMPREHENSIVE_3D_SR]) == 1
    seg = hd.seg.segread(io.BytesIO(orthanc.instance_file(released[SEG][0])))
    assert seg.StudyInstanceUID == uid["release"]
    # a released result still says it failed its automatic checks
    assert qc_failed_findings(orthanc.instance_file(released[COMPREHENSIVE_3D_SR][0]))
    assert all(d["state"] == "sent" for r in done["results"] for d in r["deliveries"])
    assert rejected["state"] == "rejected" and rejected["reason"] == "rejected by admin: not lung"
    by_action = {event["action"]: event for event in audit}
    assert by_action["jobs.release"]["actor"] == "admin" and by_action["jobs.release"]["target"] == f"job {release_job}"
    assert by_action["jobs.release"]["detail"]["comment"] == "lungs fine, small field of view"
    assert by_action["jobs.reject"]["detail"]["comment"] == "not lung"
    assert "dicom_ai_node_held_results 0.0" in metrics
    assert 'dicom_ai_node_jobs{state="dropped"} 1.0' in metrics
    fails = [line for line in metrics.splitlines()
             if line.startswith('dicom_ai_node_qc_checks_total{model="lung_ct_seg",outcome="fail"}')]
    assert fails and float(fails[0].split()[-1]) >= 4
