"""Held results on the admin page, in the REST API, the CLI and /metrics: a job whose result
failed its quality checks (policy hold) is listed with its reason, checks and key image;
admins release or reject it (forms with CSRF, API), viewers only look; all audited."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import select

from dicom_ai_node.db.models import AuditEvent, Delivery, Job, JobState, ResultObject
from tests.web_support import STUDY, Web, csrf_of, store_held_job, store_study


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    web.ids = store_study(web.database, tmp_path / "storage")
    web.ids.update(store_held_job(web.database, tmp_path / "storage"))
    return web


def job_state(web, job_id) -> JobState:
    with web.database.session() as session:
        return session.get(Job, job_id).state


def deliveries(web) -> list[Delivery]:
    with web.database.session() as session:
        return list(session.scalars(select(Delivery).join(ResultObject).where(ResultObject.job_id == web.ids["held"])))


def test_held_page_shows_reason_checks_and_key_image_and_only_admins_get_the_forms(web):
    held = web.ids["held"]
    for name, is_admin in (("alice", True), ("victor", False)):
        client = web.login(name)
        page = client.get("/held")
        assert page.status_code == 200
        assert f'id="held-{held}"' in page.text
        assert "lung volume 39.3 mL is below the plausible range 100 to 12000 mL" in page.text
        assert f'src="/results/{web.ids["key_image"]}/image.png"' in page.text
        assert "&lt;script&gt;" in page.text and "<script>" not in page.text  # the patient name, escaped
        assert (f'action="/jobs/{held}/release"' in page.text) == is_admin
        dashboard = client.get("/").text
        assert 'id="held-count">1<' in dashboard and 'href="/held"' in dashboard
        study = client.get(f"/studies/{STUDY}").text
        assert "mean_attenuation on lung -565 HU is within" in study and "on failed quality checks: hold" in study
        assert (f'action="/jobs/{held}/release"' in study) == is_admin


def test_key_image_png_needs_login_and_serves_only_key_images_from_their_place(web, tmp_path):
    path = f"/results/{web.ids['key_image']}/image.png"
    assert web.client().get(path).status_code == 303  # to the login page
    viewer = web.login("victor")
    answer = viewer.get(path)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    assert image.size == (6, 4) and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 1, 2)
    assert viewer.get(f"/results/{web.ids['held_seg']}/image.png").status_code == 404  # a SEG
    assert viewer.get("/results/999/image.png").status_code == 404
    with web.database.session() as session:  # a row pointing elsewhere is refused, not followed
        session.get(ResultObject, web.ids["key_image"]).path = "../../config.toml"
    answer = viewer.get(path)
    assert answer.status_code == 404 and "not stored where" in answer.json()["detail"]


def test_release_from_the_page_form_queues_deliveries_and_is_audited(web):
    held = web.ids["held"]
    viewer = web.login("victor")
    form = {"comment": "small field of view, lungs fine", "next": "/held"}
    assert viewer.post(f"/jobs/{held}/release", data={**form, "csrf_token": csrf_of(viewer)}).status_code == 403
    admin = web.login("alice")
    assert admin.post(f"/jobs/{held}/release", data=form).status_code == 403  # no CSRF token
    answer = admin.post(f"/jobs/{held}/release", data={**form, "csrf_token": csrf_of(admin, "/held")})
    assert answer.status_code == 303 and answer.headers["location"].startswith("/held?msg=job")
    assert "2+deliveries+queued" in answer.headers["location"] and web.kicks == 1
    assert job_state(web, held) == JobState.delivering
    assert sorted((d.destination, d.state) for d in deliveries(web)) == [("pacs", "pending")] * 2
    again = admin.post(f"/jobs/{held}/release", data={**form, "csrf_token": csrf_of(admin)})
    assert "only+held+results+can+be+released" in again.headers["location"]
    assert len(deliveries(web)) == 2
    page = admin.get("/held").text
    assert "no results are held" in page and "small field of view, lungs fine" in page  # recently reviewed
    with web.database.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "jobs.release")).one()
        assert (event.actor, event.target, event.detail["comment"]) == ("alice", f"job {held}",
                                                                       "small field of view, lungs fine")
    # a redirect target elsewhere is not followed
    store = web.login("alice")
    answer = store.post(f"/jobs/{held}/reject", data={"next": "//evil.example/", "csrf_token": csrf_of(store)})
    assert answer.headers["location"].startswith("/held?error=")


def test_reject_from_the_study_page_form(web):
    held = web.ids["held"]
    admin = web.login("alice")
    answer = admin.post(f"/jobs/{held}/reject", data={"comment": "gas, not lung", "next": f"/studies/{STUDY}",
                                                      "csrf_token": csrf_of(admin)})
    assert answer.headers["location"].startswith(f"/studies/{STUDY}?msg=job")
    assert job_state(web, held) == JobState.rejected and deliveries(web) == []


def test_api_release_reject_and_what_viewers_get(web):
    held = web.ids["held"]
    admin, viewer = web.client(web.admin_token), web.client(web.viewer_token)
    listed = viewer.get("/api/jobs", params={"state": "held"}).json()
    assert [j["id"] for j in listed] == [held] and listed[0]["qc_policy"] == "hold"
    assert [c["passed"] for c in listed[0]["quality_checks"]] == [False, True]
    check = listed[0]["quality_checks"][0]
    assert (check["name"], check["value"], check["low"], check["high"], check["unit"]) == \
        ("lung volume", 39.3, 100.0, 12000.0, "mL")
    detail = viewer.get(f"/api/studies/{STUDY}").json()
    assert next(j for j in detail["jobs"] if j["id"] == held)["quality_checks"][0]["message"].startswith("lung volume")
    assert viewer.post(f"/api/jobs/{held}/release").status_code == 403
    assert viewer.post(f"/api/jobs/{held}/reject").status_code == 403
    assert web.client().post(f"/api/jobs/{held}/reject").status_code == 401
    assert admin.post(f"/api/jobs/{held}/reject", json={"comment": "x" * 1001}).status_code == 422
    assert admin.post("/api/jobs/999/reject").status_code == 404
    answer = admin.post(f"/api/jobs/{held}/reject", json={"comment": "wrong organ"})
    assert answer.status_code == 200 and "never sent" in answer.json()["message"]
    assert admin.get(f"/api/jobs/{held}").json()["reason"] == "rejected by alice: wrong organ"
    refused = admin.post(f"/api/jobs/{held}/release")
    assert refused.status_code == 409 and "is rejected" in refused.json()["detail"]
    assert deliveries(web) == []
    assert [e["action"] for e in admin.get("/api/audit", params={"action": "jobs.re"}).json()] == ["jobs.reject"]


def test_api_release_without_a_body(web):
    answer = web.client(web.admin_token).post(f"/api/jobs/{web.ids['held']}/release")
    assert answer.status_code == 200 and answer.json()["message"].endswith("2 deliveries queued")


def test_metrics_count_checks_by_model_and_outcome_and_held_results(web):
    text = web.client().get("/metrics").text
    for line in ('dicom_ai_node_qc_checks_total{model="lung_ct_seg",outcome="fail"} 1.0',
                 'dicom_ai_node_qc_checks_total{model="lung_ct_seg",outcome="pass"} 1.0',
                 "dicom_ai_node_held_results 1.0", 'dicom_ai_node_jobs{state="held"} 1.0',
                 'dicom_ai_node_jobs{state="rejected"} 0.0'):
        assert line in text, line
    web.client(web.admin_token).post(f"/api/jobs/{web.ids['held']}/reject")
    text = web.client().get("/metrics").text
    assert "dicom_ai_node_held_results 0.0" in text and 'dicom_ai_node_jobs{state="rejected"} 1.0' in text


def test_cli_lists_releases_and_rejects_held_results(web, tmp_path, capsys):
    from dicom_ai_node import cli

    config = ["--config", str(tmp_path / "config.toml")]
    held = web.ids["held"]
    assert cli.main([*config, "jobs", "held"]) == 0
    assert f"job {held}: lung_ct_seg" in capsys.readouterr().out
    assert cli.main([*config, "studies", "show", STUDY]) == 0
    shown = capsys.readouterr().out
    assert "quality checks (on failure: hold):" in shown
    assert "FAIL  lung volume 39.3 mL is below the plausible range 100 to 12000 mL" in shown
    assert cli.main([*config, "jobs", "release", str(held), "--comment", "ok after review"]) == 0
    assert "2 deliveries queued" in capsys.readouterr().out
    assert cli.main([*config, "jobs", "reject", str(held)]) == 1
    assert "only held results can be rejected" in capsys.readouterr().err
    assert cli.main([*config, "jobs", "held"]) == 0 and "no results are held" in capsys.readouterr().out
    with web.database.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "jobs.release")).one()
        assert event.actor == "cli" and event.detail["comment"] == "ok after review"


def test_rules_editor_validates_and_dry_runs_qc_fail(web):
    from tests.web_support import RULES

    admin = web.login("alice")
    csrf = csrf_of(admin, "/rules")
    wrong = admin.post("/rules", data={"text": RULES.replace('destinations = ["pacs"]',
                                                             'destinations = ["pacs"]\nqc_fail = "maybe"'),
                                       "action": "save", "csrf_token": csrf})
    assert "rules[0] (chest-ct-lungs).qc_fail: expected one of hold | send_flagged | drop" in wrong.text
    draft = RULES.replace('destinations = ["pacs"]', 'destinations = ["pacs"]\nqc_fail = "drop"')
    dry = admin.post("/rules", data={"text": draft, "action": "dryrun", "csrf_token": csrf})
    assert "on failed quality checks: drop" in dry.text and "qc_fail drop" in dry.text  # a changed policy shows
    saved = admin.post("/rules", data={"text": draft, "action": "save", "csrf_token": csrf})
    assert saved.status_code == 303
    assert 'qc_fail = "drop"' in web.client(web.admin_token).get("/api/rules").json()["text"]
