"""Retraction through the admin page, the API and the CLI, with a real Orthanc as the PACS: a SEG
made by the bundled lung model is delivered to Orthanc, an admin retracts it, and the rejection
KOS ("Rejected for Quality Reasons", 113001) arrives in Orthanc referencing the SEG. A recalled
model version lists its delivered results for retraction in bulk. The dashboard's storage table.
The web app in-process on SQLite, the real runner and outbox."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dicom_ai_node import cli
from dicom_ai_node.db.models import AuditEvent, Delivery, Job, JobState, ResultObject, utcnow
from dicom_ai_node.deliver.outbox import Outbox
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series
from tests.test_quality_gate import CHEST
from tests.web_support import Web, csrf_of

REASON = "vendor recall 2026-11: lungs swapped"


@pytest.fixture(scope="module")
def chests(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chests")
    return [make_ct_series(folder / str(n), **{**CHEST, "seed": f"retract-{n}"}) for n in range(2)]


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    web.storage = Storage(web.context.config.node.storage_dir, 0)
    web.outbox = Outbox(web.context.config, web.database, web.storage, lookup=web.destinations.get)
    web.runner = JobRunner(web.database, web.storage, ModelRegistry())
    web.config_path = str(tmp_path / "config.toml")
    return web


def run_job(web, series) -> int:
    """The series stored and a lung job run by the real runner, its deliveries pending."""
    with web.database.session() as session:
        store_series(session, web.storage, series)
        job_id = queue_job(session, series, "lung_ct_seg", "chest-ct-lungs", destinations=["pacs"])
    web.runner.run(job_id)
    return job_id


def delivered_as_recorded(web, job_id: int) -> None:
    """What the outbox records after a successful send (for tests without a PACS)."""
    with web.database.session() as session:
        job = session.get(Job, job_id)
        for result in job.results:
            for delivery in result.deliveries:
                delivery.state, delivery.sent_at = "sent", utcnow()
        job.state, job.finished_at = JobState.done, utcnow()


def results_of(web, job_id: int) -> dict[str, list[ResultObject]]:
    with web.database.session() as session:
        found: dict[str, list[ResultObject]] = {}
        for result in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)):
            found.setdefault(result.kind, []).append(result)
        return found


def code_values(tags: dict, keyword: str) -> list[str]:
    return [item.get("CodeValue") for item in tags.get(keyword) or []]


def test_a_retracted_seg_gets_a_rejection_kos_in_orthanc(web, chests, orthanc):
    answer = web.client(web.admin_token).put("/api/destinations/pacs", json={
        "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port, "backoff_s": 0, "timeout_s": 10})
    assert answer.status_code == 200, answer.text
    job_id = run_job(web, chests[0])
    [seg] = results_of(web, job_id)["seg"]
    assert web.outbox.process_due() > 0
    orthanc.wait_for_instances([seg.sop_instance_uid])
    with web.database.session() as session:
        assert session.get(Job, job_id).state == JobState.done

    admin, viewer = web.client(web.admin_token), web.client(web.viewer_token)
    assert viewer.post(f"/api/jobs/{job_id}/retract", json={"reason": REASON}).status_code == 403
    assert admin.post("/api/jobs/999/retract", json={"reason": REASON}).status_code == 404
    assert admin.post(f"/api/jobs/{job_id}/retract", json={}).status_code == 422
    answer = admin.post(f"/api/jobs/{job_id}/retract", json={"reason": REASON})
    assert answer.status_code == 200, answer.text
    kos_uid = answer.json()["kos_sop_instance_uid"]
    again = admin.post(f"/api/jobs/{job_id}/retract", json={"reason": REASON})
    assert again.status_code == 409 and "is retracted" in again.json()["detail"]

    assert web.outbox.process_due() == 1
    orthanc.wait_for_instances([kos_uid])
    tags = orthanc.instance_tags(orthanc.find_instance(kos_uid))
    assert tags["Modality"] == "KO" and tags["StudyInstanceUID"] == chests[0].study_instance_uid
    assert code_values(tags, "ConceptNameCodeSequence") == ["113001"]
    referenced = {instance["ReferencedSOPInstanceUID"]
                  for study in tags["CurrentRequestedProcedureEvidenceSequence"]
                  for series in study["ReferencedSeriesSequence"] for instance in series["ReferencedSOPSequence"]}
    assert seg.sop_instance_uid in referenced
    assert referenced == {r.sop_instance_uid for kind, rows in results_of(web, job_id).items()
                          if kind != "rejection" for r in rows}
    with web.database.session() as session:
        [note] = [r for r in session.get(Job, job_id).results if r.kind == "rejection"]
        assert [(d.destination, d.state) for d in note.deliveries] == [("pacs", "sent")]
        assert session.get(Job, job_id).state == JobState.retracted  # the KOS's delivery does not undo it

    # a retry runs the job again: new objects reach Orthanc beside the rejected ones
    assert admin.post(f"/api/jobs/{job_id}/retry").status_code == 200
    assert web.submitted == [job_id]
    web.runner.run(job_id)
    [new_seg] = [r for r in results_of(web, job_id)["seg"] if r.retraction_id is None]
    assert new_seg.sop_instance_uid != seg.sop_instance_uid
    assert web.outbox.process_due() > 0
    orthanc.wait_for_instances([new_seg.sop_instance_uid])


def test_study_page_retracts_with_a_reason_and_csrf_and_the_cli_too(web, chests):
    job_id = run_job(web, chests[0])
    other = run_job(web, chests[1])
    for job in (job_id, other):
        delivered_as_recorded(web, job)
    study = chests[0].study_instance_uid
    page = web.login("victor").get(f"/studies/{study}").text
    assert f'action="/jobs/{job_id}/retract"' not in page  # viewers see no button
    client = web.login()
    page = client.get(f"/studies/{study}").text
    assert f'action="/jobs/{job_id}/retract"' in page
    csrf = csrf_of(client, f"/studies/{study}")
    assert client.post(f"/jobs/{job_id}/retract", data={"study": study, "reason": REASON}).status_code == 403
    answer = client.post(f"/jobs/{job_id}/retract", data={"csrf_token": csrf, "study": study, "reason": " "})
    assert answer.status_code == 303 and "needs+a+reason" in answer.headers["location"]
    answer = client.post(f"/jobs/{job_id}/retract", data={"csrf_token": csrf, "study": study, "reason": REASON})
    assert answer.status_code == 303 and "retracted" in answer.headers["location"], answer.headers["location"]
    page = client.get(f"/studies/{study}").text
    assert "retracted</span>" in page and f'action="/jobs/{job_id}/retract"' not in page
    assert f'action="/jobs/{job_id}/retry"' in page
    with web.database.session() as session:
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "results.retract")).all()
        assert (event.actor, event.detail["reason"]) == ("alice", REASON)

    assert cli.main(["--config", web.config_path, "retract", "--job", str(other), "--reason", REASON]) == 0
    assert cli.main(["--config", web.config_path, "retract", "--job", str(other), "--reason", REASON]) == 1
    with web.database.session() as session:
        assert session.get(Job, other).state == JobState.retracted
        assert session.scalars(select(Delivery).join(ResultObject).where(
            ResultObject.kind == "rejection", ResultObject.job_id == other)).one().state == "pending"


def test_a_recalled_version_lists_its_delivered_results_for_bulk_retraction(web, chests):
    jobs = [run_job(web, series) for series in chests]
    for job in jobs:
        delivered_as_recorded(web, job)
    with web.database.session() as session:
        version = session.get(Job, jobs[0]).model_version
    admin = web.client(web.admin_token)
    assert admin.get("/api/models/lung_ct_seg/delivered-results").status_code == 404  # not recalled
    assert web.client(web.viewer_token).post("/api/models/lung_ct_seg/recall",
                                             json={"version": version}).status_code == 403
    assert admin.post("/api/models/nope/recall", json={"version": "1"}).status_code == 404
    assert admin.post("/api/models/lung_ct_seg/recall", json={"version": version}).status_code == 200
    listed = admin.get("/api/models/lung_ct_seg/delivered-results").json()
    assert [row["job_id"] for row in listed] == jobs and all(row["results"] >= 3 for row in listed)
    assert admin.get("/api/models/lung_ct_seg/delivered-results", params={"limit": 1, "page": 1}).json()[0][
        "job_id"] == jobs[1]
    [lung] = [m for m in admin.get("/api/models").json() if m["name"] == "lung_ct_seg"]
    assert lung["enabled"] is False  # recalled: disabled for new jobs

    client = web.login()
    page = client.get("/models").text
    assert f"Recalled: lung_ct_seg {version}" in page
    assert all(f'name="job_ids" value="{job}"' in page for job in jobs)
    csrf = csrf_of(client, "/models")
    answer = client.post("/models/lung_ct_seg/retract", data={"csrf_token": csrf, "job_ids": jobs, "reason": REASON})
    assert answer.status_code == 303 and "2+job" in answer.headers["location"], answer.headers["location"]
    assert admin.get("/api/models/lung_ct_seg/delivered-results").json() == []
    assert "no delivered results of this version left" in client.get("/models").text
    bulk = admin.post("/api/retractions", json={"job_ids": jobs, "reason": REASON}).json()
    assert bulk["retracted"] == [] and set(bulk["refused"]) == {str(job) for job in jobs}

    # the dashboard's storage table: instances per study state, results per job state
    dashboard = client.get("/").text
    storage = dashboard.split('id="storage"')[1]
    assert "retracted" in storage and "complete" in storage
    with web.database.session() as session:
        from dicom_ai_node.retention import storage_use
        use = storage_use(session)
    assert use["instances"] == [{"state": "complete", "instances": sum(len(s.paths) for s in chests),
                                 "bytes": sum(len(s.paths) for s in chests)}]  # size_bytes=1 per stored test file
    [retracted] = use["results"]
    assert retracted["state"] == "retracted" and retracted["retracted"] == retracted["results"] - 2  # 2 KOS
