"""The admin pages through HTTP: login, every page for both roles, escaping of DICOM text,
CSRF on every form, and the forms doing what their buttons say."""

from __future__ import annotations

import pytest

from dicom_ai_node.db.models import Delivery, DestinationRow, DisabledModel
from tests.web_support import EVIL, PASSWORD, RULES, SERIES, STUDY, Web, csrf_of, store_study

PAGES = ["/", "/studies", f"/studies/{STUDY}", "/held", "/rules", "/rules?version=1", "/destinations", "/models",
         "/audit"]


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    web.ids = store_study(web.database, tmp_path / "storage")
    return web


def test_pages_need_login(web):
    client = web.client()
    for path in PAGES:
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login"), path


def test_login_refusals(web):
    client = web.client()
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    wrong = client.post("/login", data={"name": "alice", "password": "nope", "csrf_token": csrf})
    assert "wrong+user+name+or+password" in wrong.headers["location"]
    stranger = web.client()  # no login-form cookie: a cross-site login attempt
    forged = stranger.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": "x"})
    assert "expired" in forged.headers["location"]
    assert "dan_session" not in stranger.cookies


def test_every_page_renders_and_escapes_dicom_text(web):
    for name in ("alice", "victor"):
        client = web.login(name)
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 200, (name, path)
            assert "<script>" not in answer.text, (name, path)  # only the escaped form appears
        study = client.get(f"/studies/{STUDY}").text
        assert "&lt;script&gt;alert(" in study
        assert ("Retry</button>" in study) == (name == "alice")  # viewers see no buttons


def test_forms_need_csrf_and_admin(web):
    admin = web.login("alice")
    path = f"/deliveries/{web.ids['delivery']}/resend"
    assert admin.post(path, data={"study": STUDY}).status_code == 403
    assert admin.post(path, data={"study": STUDY, "csrf_token": "forged"}).status_code == 403
    viewer = web.login("victor")
    assert viewer.post(path, data={"study": STUDY, "csrf_token": csrf_of(viewer)}).status_code == 403
    answer = admin.post(path, data={"study": STUDY, "csrf_token": csrf_of(admin)})
    assert answer.status_code == 303 and "queued+again" in answer.headers["location"]
    with web.database.session() as session:
        assert session.get(Delivery, web.ids["delivery"]).state == "pending"


def test_retry_and_cancel_buttons(web):
    admin = web.login()
    csrf = csrf_of(admin)
    answer = admin.post(f"/jobs/{web.ids['crashed']}/retry", data={"study": STUDY, "csrf_token": csrf})
    assert "queued+again" in answer.headers["location"] and web.submitted == [web.ids["crashed"]]
    answer = admin.post(f"/jobs/{web.ids['crashed']}/retry", data={"study": STUDY, "csrf_token": csrf})
    assert "error=" in answer.headers["location"]
    answer = admin.post(f"/jobs/{web.ids['queued']}/cancel", data={"study": STUDY, "csrf_token": csrf})
    assert "cancelled" in answer.headers["location"]


def test_rules_editor_validate_dry_run_save_rollback(web):
    admin = web.login()
    csrf = csrf_of(admin, "/rules")
    broken = admin.post("/rules", data={"text": RULES.replace("lung_ct_seg", "nope"), "action": "save",
                                        "csrf_token": csrf})
    assert broken.status_code == 200 and "unknown model &#39;nope&#39;" in broken.text
    assert "nothing was saved" in broken.text
    valid = admin.post("/rules", data={"text": RULES, "action": "validate", "csrf_token": csrf})
    assert "valid: the rule set can be saved" in valid.text
    draft = RULES.replace('equals = "CT"', 'equals = "MR"')
    dry = admin.post("/rules", data={"text": draft, "action": "dryrun", "csrf_token": csrf})
    assert "1 would change" in dry.text and "− lung_ct_seg" in dry.text
    viewer = web.login("victor")
    assert viewer.post("/rules", data={"text": draft, "action": "save",
                                       "csrf_token": csrf_of(viewer, "/rules")}).status_code == 403
    saved = admin.post("/rules", data={"text": draft, "action": "save", "comment": "MR", "csrf_token": csrf})
    assert "saved+as+version+2" in saved.headers["location"]
    back = admin.post("/rules/rollback", data={"version": 1, "csrf_token": csrf})
    assert "version+1+is+active+again" in back.headers["location"]
    assert "rollback to version 1" in admin.get("/rules").text


def test_destinations_and_models_pages(web):
    admin = web.login()
    csrf = csrf_of(admin, "/destinations")
    form = {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": "2", "csrf_token": csrf}
    assert "saved" in admin.post("/destinations", data=form).headers["location"]
    bad = admin.post("/destinations", data={**form, "name": "other", "port": "99999"})
    assert "error=port" in bad.headers["location"]
    edited = admin.post("/destinations", data={**form, "mode": "update", "host": "localhost"})
    assert "saved" in edited.headers["location"]
    assert 'value="localhost"' in admin.get("/destinations?edit=archive").text
    echo = admin.post("/destinations/archive/echo", data={"csrf_token": csrf})
    assert "error=archive" in echo.headers["location"]
    assert "error=" in admin.post("/destinations/pacs/delete", data={"csrf_token": csrf}).headers["location"]
    assert "deleted" in admin.post("/destinations/archive/delete", data={"csrf_token": csrf}).headers["location"]
    with web.database.session() as session:
        assert session.get(DestinationRow, "archive") is None

    off = admin.post("/models/lung_ct_seg/toggle", data={"enable": "false", "csrf_token": csrf})
    assert "disabled" in off.headers["location"]
    with web.database.session() as session:
        assert session.get(DisabledModel, "lung_ct_seg").disabled_by == "alice"
    assert "Enable</button>" in admin.get("/models").text
    audit = admin.get("/audit?actor=alice").text
    assert "models.disable" in audit and "destinations.delete" in audit


def test_result_download_and_logout(web):
    admin = web.login()
    assert admin.get(f"/results/{web.ids['result']}/file").content.endswith(b"DICM")
    assert admin.get("/results/999/file").status_code == 404
    assert admin.post("/logout", data={"csrf_token": csrf_of(admin)}).status_code == 303
    assert admin.get("/").status_code == 303  # the session is gone on the server too


def test_models_page_lists_the_processes_with_worker_devices_and_the_leader(web):
    from dicom_ai_node import cluster

    cluster.ProcessRecord(web.database, "gpu-host/worker:41", "worker", device="cuda", queues="gpu,any",
                          concurrency=2).beat()
    cluster.ProcessRecord(web.database, "node-host/web:8080", "web").beat()
    assert cluster.Leader(web.database, "node-host/web:8080").renew()
    page = web.login().get("/models").text
    section = page.split("<h2>Processes</h2>")[1]
    worker_row = section.split("gpu-host/worker:41")[1].split("</tr>")[0]
    assert "cuda" in worker_row and "gpu,any" in worker_row and ">2<" in worker_row and "alive" in worker_row
    web_row = section.split("node-host/web:8080")[1].split("</tr>")[0]
    assert "leader" in web_row and "leader" not in worker_row


def test_study_page_says_what_was_refused_before_inference_repaired_and_odd_in_a_header(web):
    from dicom_ai_node.db.models import Job, JobState, Series

    with web.database.session() as session:
        series = session.get(Series, SERIES)
        series.header_notes = ["(01F1,1026) holds 4 bytes, which are not a whole FD value; kept in the file as "
                               f"received {EVIL}"]
        refused = session.get(Job, web.ids["crashed"])
        refused.failed_step, refused.reason = "input", "series does not fit model lung_ct_seg: voxel spacing 12 mm"
        repaired = session.get(Job, web.ids["queued"])
        repaired.input_notes = ["the series has no Frame of Reference UID; the results use one made for this series"]
    page = web.login("victor").get(f"/studies/{STUDY}").text
    assert "stored as received, with 1 header oddity" in page and "(01F1,1026) holds 4 bytes" in page
    assert "<b>Refused before inference:</b> series does not fit model lung_ct_seg" in page
    assert "input repaired before inference (1)" in page and "no Frame of Reference UID" in page
    assert "<script>" not in page  # header notes are escaped like every DICOM text
