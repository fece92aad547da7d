"""Pause and dead letters (issue 13 §3): a paused destination's deliveries stay pending, not
attempted, and go out on resume; deliveries that failed for good are listed (page, API, CLI)
and retried one by one or all at once. The real outbox on SQLite, the web app in-process, and a
real Orthanc as the PACS."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from dicom_ai_node import cli
from dicom_ai_node.db.models import AuditEvent, Delivery, Job, JobState, ResultObject, utcnow
from dicom_ai_node.deliver import destinations
from dicom_ai_node.deliver.outbox import Outbox
from dicom_ai_node.storage import Storage
from tests.peers import free_port, wait_for
from tests.web_support import SERIES, STUDY, Web, csrf_of, store_study


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    store_study(web.database, tmp_path / "storage")  # a study (patient name EVIL) and one old dead letter
    web.storage = Storage(web.context.config.node.storage_dir, 0)
    web.outbox = Outbox(web.context.config, web.database, web.storage, lookup=web.destinations.get)
    web.context.kick_outbox = web.outbox.process_due  # what the node does: send now
    web.config_path = str(tmp_path / "config.toml")
    return web


def set_destination(web, port: int, max_attempts: int = 5) -> None:
    answer = web.client(web.admin_token).put("/api/destinations/pacs", json={
        "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port, "max_attempts": max_attempts,
        "backoff_s": 0, "timeout_s": 5})
    assert answer.status_code == 200, answer.text


def queue_result(web) -> tuple[int, str]:
    """A stored result (a small Secondary Capture of STUDY) with a pending delivery to pacs, its job
    delivering, as the runner leaves them; returns the delivery id and the SOP Instance UID."""
    uid, series_uid = generate_uid(), generate_uid()
    image = Dataset()
    image.SOPClassUID, image.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    image.StudyInstanceUID, image.SeriesInstanceUID, image.PatientID = STUDY, series_uid, "P1"
    image.Modality, image.ConversionType = "OT", "WSD"
    image.Rows, image.Columns, image.SamplesPerPixel, image.PhotometricInterpretation = 2, 2, 1, "MONOCHROME2"
    image.BitsAllocated, image.BitsStored, image.HighBit, image.PixelRepresentation = 8, 8, 7, 0
    image.PixelData = bytes(4)
    image.file_meta = FileMetaDataset()
    image.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    image.file_meta.MediaStorageSOPClassUID, image.file_meta.MediaStorageSOPInstanceUID = image.SOPClassUID, uid
    with web.database.session() as session:
        job = Job(study_instance_uid=STUDY, series_instance_uid=SERIES, model_name="lung_ct_seg",
                  rule_name="chest-ct-lungs", destinations=["pacs"], input_fingerprint=uid, input_count=3,
                  state=JobState.delivering, started_at=utcnow())
        session.add(job)
        session.flush()
        path = web.storage.result_path(job.id, uid)
        web.storage.absolute(path).parent.mkdir(parents=True, exist_ok=True)
        image.save_as(web.storage.absolute(path), enforce_file_format=True)
        result = ResultObject(job_id=job.id, kind="key_image", sop_instance_uid=uid, sop_class_uid=image.SOPClassUID,
                              series_instance_uid=series_uid, path=path)
        result.deliveries.append(Delivery(destination="pacs"))
        session.add(result)
        session.flush()
        return result.deliveries[0].id, uid


def delivery(web, delivery_id: int) -> Delivery:
    with web.database.session() as session:
        return session.get(Delivery, delivery_id)


def audit(web, action: str) -> list[AuditEvent]:
    with web.database.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def test_a_paused_destination_has_nothing_due_and_its_rows_stay_pending(web):
    delivery_id, _ = queue_result(web)
    with web.database.session() as session:
        assert destinations.pause(session, "pacs", "alice") == 1
    with web.database.session() as session, pytest.raises(destinations.NotPaused, match="paused already"):
        destinations.pause(session, "pacs", "bob")
    assert web.outbox.claim("pacs", timeout_s=5) == []
    assert web.outbox.process_due() == 0
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts, row.last_error) == ("pending", 0, None)  # not attempted, no backoff

    # the pause is a row of the database: a new outbox (a restarted node) sees it too
    restarted = Outbox(web.context.config, web.database, web.storage, lookup=web.destinations.get)
    assert restarted.claim("pacs", timeout_s=5) == []
    with web.database.session() as session:
        assert destinations.resume(session, "pacs", "alice") == 1
    assert [claimed for claimed, _ in restarted.claim("pacs", timeout_s=5)] == [delivery_id]
    assert [(e.actor, e.target, e.detail["pending"]) for e in audit(web, "destinations.pause")] == [("alice", "pacs", 1)]
    assert len(audit(web, "destinations.resume")) == 1


def test_pause_resume_via_the_api_holds_then_delivers_to_orthanc(web, orthanc):
    set_destination(web, orthanc.dicom_port)
    admin, viewer = web.client(web.admin_token), web.client(web.viewer_token)
    assert viewer.post("/api/destinations/pacs/pause").status_code == 403
    assert admin.post("/api/destinations/nope/pause").status_code == 404
    assert admin.post("/api/destinations/pacs/pause").json() == {"paused": True, "pending": 0}
    assert admin.post("/api/destinations/pacs/pause").status_code == 409

    delivery_id, uid = queue_result(web)
    assert web.outbox.process_due() == 0
    assert orthanc.find_instance(uid) is None
    assert delivery(web, delivery_id).state == "pending" and delivery(web, delivery_id).attempts == 0
    shown = admin.get("/api/destinations/pacs").json()
    assert shown["paused"] is True and shown["paused_by"] == "alice"
    metrics = web.client().get("/metrics").text
    assert "dicom_ai_node_destinations_paused 1.0" in metrics
    assert 'dicom_ai_node_destination_paused{destination="pacs"} 1.0' in metrics
    assert 'dicom_ai_node_deliveries_pending{destination="pacs"} 1.0' in metrics

    assert admin.post("/api/destinations/pacs/resume").json() == {"paused": False, "pending": 1}
    wait_for(lambda: orthanc.find_instance(uid), timeout=30, what="the result in Orthanc after resume")
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts) == ("sent", 1)
    assert "dicom_ai_node_destinations_paused 0.0" in web.client().get("/metrics").text
    assert [e.actor for e in audit(web, "destinations.resume")] == ["alice"]


def test_pause_and_resume_on_the_destinations_page(web):
    queue_result(web)
    viewer = web.login("victor")
    page = viewer.get("/destinations").text
    assert 'action="/destinations/pacs/pause"' not in page
    assert viewer.post("/destinations/pacs/pause", data={"csrf_token": csrf_of(viewer)}).status_code == 403
    admin = web.login("alice")
    assert 'action="/destinations/pacs/pause"' in admin.get("/destinations").text
    assert admin.post("/destinations/pacs/pause").status_code == 403  # no CSRF token
    answer = admin.post("/destinations/pacs/pause", data={"csrf_token": csrf_of(admin, "/destinations")})
    assert answer.headers["location"].startswith("/destinations?msg=destination+pacs+paused")
    page = admin.get("/destinations").text
    assert "s-paused" in page and "by alice" in page and 'action="/destinations/pacs/resume"' in page
    again = admin.post("/destinations/pacs/pause", data={"csrf_token": csrf_of(admin)})
    assert "paused+already" in again.headers["location"]
    answer = admin.post("/destinations/pacs/resume", data={"csrf_token": csrf_of(admin)})
    assert answer.headers["location"].startswith("/destinations?msg=destination+pacs+resumed")
    assert web.client(web.admin_token).get("/api/destinations/pacs").json()["paused"] is False


def test_dead_letters_listed_and_retried_after_the_pacs_is_up(web, orthanc, capsys):
    set_destination(web, free_port(), max_attempts=2)  # down: nothing listens there
    delivery_id, uid = queue_result(web)
    for _ in range(2):
        assert web.outbox.process_due() == 1
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts) == ("failed", 2) and row.failed_at is not None and row.last_error
    with web.database.session() as session:
        old = session.scalars(select(Delivery.id).where(Delivery.id != delivery_id, Delivery.state == "failed")).one()

    viewer = web.client(web.viewer_token)
    listed = viewer.get("/api/dead-letters", params={"destination": "pacs"}).json()
    assert [d["id"] for d in listed] == [delivery_id, old]
    assert listed[0]["study_instance_uid"] == STUDY and listed[0]["sop_instance_uid"] == uid
    assert listed[0]["attempts"] == 2 and listed[0]["error"] == row.last_error
    assert "P1" not in str(listed) and "script" not in str(listed[0])  # ids and UIDs only
    assert viewer.post(f"/api/dead-letters/{delivery_id}/retry").status_code == 403
    assert viewer.get("/api/dead-letters", params={"destination": "x y"}).status_code == 422

    page = web.login("victor").get("/dead-letters").text
    assert f'id="dead-letter-{delivery_id}"' in page and "pacs: 2" in page
    assert "&lt;script&gt;" in page and "<script>" not in page  # the old one's error, escaped
    assert 'action="/dead-letters/retry"' not in page  # viewers only look
    assert 'href="/dead-letters?destination=pacs">2<' in web.login("alice").get("/destinations").text
    assert 'dicom_ai_node_dead_letters{destination="pacs"} 2.0' in web.client().get("/metrics").text

    assert cli.main(["--config", web.config_path, "deliveries", "failed"]) == 0
    assert f"delivery {delivery_id} to pacs: job" in capsys.readouterr().out

    set_destination(web, orthanc.dicom_port, max_attempts=2)  # the PACS is up (where it was moved)
    admin = web.client(web.admin_token)
    assert admin.post(f"/api/dead-letters/{delivery_id}/retry").json()["message"] == \
        f"delivery {delivery_id} queued again"
    wait_for(lambda: orthanc.find_instance(uid), timeout=30, what="the retried result in Orthanc")
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts, row.last_error, row.failed_at) == ("sent", 1, None, None)
    with web.database.session() as session:
        assert session.get(Job, session.get(ResultObject, row.result_id).job_id).state == JobState.done
    assert admin.post(f"/api/dead-letters/{delivery_id}/retry").status_code == 409  # sent, not failed
    event = audit(web, "deliveries.resend")[-1]
    assert event.actor == "alice" and event.detail["failures"][0][:3] == [delivery_id, "pacs", 2]
    assert event.detail["failures"][0][3] == listed[0]["error"]  # the failure's history is kept

    # all at once, from the page form: the old dead letter is pending again (its file is no DICOM:
    # it fails again, which is the point: it is a dead letter again after max_attempts)
    browser = web.login("alice")
    answer = browser.post("/dead-letters/retry", data={"destination": "pacs",
                                                       "csrf_token": csrf_of(browser, "/dead-letters")})
    assert answer.headers["location"] == "/dead-letters?msg=1+deliveries+queued+again"
    assert audit(web, "deliveries.resend")[-1].target == "all failed deliveries to pacs"
    assert delivery(web, old).attempts >= 1


def test_cli_pause_resume_and_retry(web, capsys):
    config = web.config_path
    delivery_id, _ = queue_result(web)
    assert cli.main(["--config", config, "destinations", "pause", "pacs"]) == 0
    assert cli.main(["--config", config, "destinations", "pause", "pacs"]) == 1
    assert cli.main(["--config", config, "destinations", "list"]) == 0
    assert "paused by cli" in capsys.readouterr().out
    assert web.outbox.claim("pacs", timeout_s=5) == []
    assert cli.main(["--config", config, "destinations", "resume", "pacs"]) == 0
    assert cli.main(["--config", config, "deliveries", "retry", str(delivery_id)]) == 1  # pending, not failed
    assert cli.main(["--config", config, "deliveries", "retry", "--all", "--destination", "pacs"]) == 0
    assert [e.actor for e in audit(web, "destinations.pause")] == ["cli"]
    assert audit(web, "deliveries.resend")[-1].target == "all failed deliveries to pacs"
