"""The REST API, endpoint by endpoint: what an admin, a viewer and a stranger get, and how
bad input is refused. The app runs in-process on a temp SQLite database."""

from __future__ import annotations

import pytest

from dicom_ai_node.db.models import AuditEvent, Delivery, Job, JobState
from tests.web_support import EVIL, RULES, STUDY, Web, csrf_of, store_study

# every endpoint that needs a login, with a harmless request
PROTECTED = [("GET", "/api/studies"), ("GET", f"/api/studies/{STUDY}"), ("GET", "/api/jobs"),
             ("GET", "/api/jobs/1"), ("POST", "/api/jobs/1/retry"), ("POST", "/api/jobs/1/cancel"),
             ("POST", "/api/jobs/1/release"), ("POST", "/api/jobs/1/reject"),
             ("GET", "/api/deliveries"), ("POST", "/api/deliveries/1/resend"), ("GET", "/api/rules"),
             ("GET", "/api/rules/versions"), ("GET", "/api/rules/versions/1"), ("POST", "/api/rules/validate"),
             ("POST", "/api/rules/dry-run"), ("POST", "/api/rules"), ("POST", "/api/rules/rollback"),
             ("GET", "/api/destinations"), ("GET", "/api/destinations/pacs"), ("POST", "/api/destinations"),
             ("PUT", "/api/destinations/pacs"), ("DELETE", "/api/destinations/pacs"),
             ("POST", "/api/destinations/pacs/echo"), ("GET", "/api/models"),
             ("POST", "/api/models/lung_ct_seg/enable"), ("POST", "/api/models/lung_ct_seg/disable"),
             ("GET", "/api/audit")]
ADMIN_ONLY = [(m, p) for m, p in PROTECTED if m != "GET" and p not in ("/api/rules/validate", "/api/rules/dry-run")]


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    web.ids = store_study(web.database, tmp_path / "storage")
    return web


@pytest.fixture
def admin(web):
    return web.client(web.admin_token)


@pytest.fixture
def viewer(web):
    return web.client(web.viewer_token)


def audit_actions(web) -> list[str]:
    with web.database.session() as session:
        return [e.action for e in session.query(AuditEvent).filter(AuditEvent.actor == "alice")]


def test_every_endpoint_refuses_without_login(web):
    client = web.client()
    for method, path in PROTECTED:
        assert client.request(method, path).status_code == 401, (method, path)
    assert web.client("dan_not-a-token").get("/api/studies").status_code == 401


def test_viewer_reads_but_cannot_change(web, viewer):
    for method, path in PROTECTED:
        answer = viewer.request(method, path, json={})
        if (method, path) in ADMIN_ONLY:
            assert answer.status_code == 403, (method, path)
            assert "admin role" in answer.json()["detail"]
        elif method == "GET":
            assert answer.status_code in (200, 404), (method, path, answer.text)
    assert viewer.post("/api/rules/validate", json={"text": RULES}).json() == {"valid": True, "problems": []}


def test_session_cookie_needs_csrf_header_for_changes(web):
    client = web.login()
    assert client.get("/api/studies").status_code == 200  # reading needs no CSRF token
    assert client.post(f"/api/jobs/{web.ids['queued']}/cancel").status_code == 403
    assert client.post(f"/api/jobs/{web.ids['queued']}/cancel",
                       headers={"X-CSRF-Token": "forged"}).status_code == 403
    answer = client.post(f"/api/jobs/{web.ids['queued']}/cancel", headers={"X-CSRF-Token": csrf_of(client)})
    assert answer.status_code == 200, answer.text


def test_studies_list_filters_and_detail(web, admin):
    studies = admin.get("/api/studies").json()
    assert [s["study_instance_uid"] for s in studies] == [STUDY]
    assert studies[0]["patient_name"] == EVIL and studies[0]["jobs"] == {"failed": 2, "queued": 1}
    assert admin.get("/api/studies", params={"state": "receiving"}).json() == []
    assert len(admin.get("/api/studies", params={"q": "chest"}).json()) == 1
    assert len(admin.get("/api/studies", params={"job_state": "failed", "model": "lung_ct_seg"}).json()) == 1
    assert admin.get("/api/studies", params={"patient_id": "other"}).json() == []
    assert admin.get("/api/studies", params={"state": "bogus"}).status_code == 422
    assert admin.get("/api/studies", params={"limit": 0}).status_code == 422

    detail = admin.get(f"/api/studies/{STUDY}").json()
    assert detail["series"][0]["instances"] == 3 and len(detail["series"][0]["instance_list"]) == 3
    job = next(j for j in detail["jobs"] if j["id"] == web.ids["delivered"])
    assert job["timings"]["inference_s"] == 2.0
    assert job["results"][0]["deliveries"][0]["state"] == "failed"
    assert admin.get("/api/studies/1.2.3").status_code == 404
    assert admin.get("/api/studies/not-a-uid").status_code == 422


def test_jobs_retry_and_cancel(web, admin):
    ids = web.ids
    assert admin.get("/api/jobs", params={"state": "queued"}).json()[0]["id"] == ids["queued"]
    assert admin.get(f"/api/jobs/{ids['crashed']}").json()["reason"] == "model error"
    assert admin.get("/api/jobs/999").status_code == 404
    assert admin.get("/api/jobs/0").status_code == 422

    # a failed job without results runs again; one with results sends them again
    assert admin.post(f"/api/jobs/{ids['crashed']}/retry").json()["message"] == f"job {ids['crashed']} queued again"
    assert web.submitted == [ids["crashed"]]
    assert "results queued" in admin.post(f"/api/jobs/{ids['delivered']}/retry").json()["message"]
    with web.database.session() as session:
        assert session.get(Job, ids["crashed"]).state == JobState.queued
        assert session.get(Job, ids["delivered"]).state == JobState.delivering
        assert session.get(Delivery, ids["delivery"]).state == "pending"
    refused = admin.post(f"/api/jobs/{ids['crashed']}/retry")  # queued now: nothing to retry
    assert refused.status_code == 409 and "only failed jobs" in refused.json()["detail"]

    assert admin.post(f"/api/jobs/{ids['queued']}/cancel").status_code == 200
    with web.database.session() as session:
        cancelled = session.get(Job, ids["queued"])
        assert cancelled.state == JobState.failed and cancelled.reason == "cancelled by alice"
    assert admin.post(f"/api/jobs/{ids['queued']}/cancel").status_code == 409
    assert admin.post("/api/jobs/999/cancel").status_code == 404
    assert {"jobs.retry", "deliveries.resend", "jobs.cancel"} <= set(audit_actions(web))


def test_deliveries_list_and_resend(web, admin):
    listed = admin.get("/api/deliveries", params={"state": "failed"}).json()
    assert listed[0]["id"] == web.ids["delivery"] and listed[0]["last_error"] == EVIL
    assert admin.get("/api/deliveries", params={"state": "lost"}).status_code == 422
    assert admin.post(f"/api/deliveries/{web.ids['delivery']}/resend").status_code == 200
    assert web.kicks == 1
    assert admin.post(f"/api/deliveries/{web.ids['delivery']}/resend").status_code == 409  # pending already
    assert admin.post("/api/deliveries/999/resend").status_code == 404
    assert "deliveries.resend" in audit_actions(web)


def test_rules_get_validate_dry_run_save_rollback(web, admin):
    active = admin.get("/api/rules").json()
    assert active["version"] == 1 and "chest-ct-lungs" in active["text"]
    assert admin.get("/api/rules/versions").json()[0]["version"] == 1
    assert admin.get("/api/rules/versions/7").status_code == 404

    broken = RULES.replace('models = ["lung_ct_seg"]', 'models = ["no_such_model"]').replace(
        "priority = 10", 'priority = "high"')
    checked = admin.post("/api/rules/validate", json={"text": broken}).json()
    assert not checked["valid"]
    assert any("rules[0] (chest-ct-lungs).priority" in p for p in checked["problems"]), checked
    syntax = admin.post("/api/rules/validate", json={"text": "[[rules]\nname ="}).json()
    assert "line 1" in syntax["problems"][0]
    unknown = admin.post("/api/rules/validate", json={"text": RULES.replace("lung_ct_seg", "nope")}).json()
    assert "unknown model 'nope'" in unknown["problems"][0]
    assert admin.post("/api/rules/validate", json={}).status_code == 422

    # the draft drops the CT rule: the stored study would no longer get the lung model
    draft = RULES.replace('equals = "CT"', 'equals = "MR"')
    dry = admin.post("/api/rules/dry-run", json={"text": draft}).json()
    assert dry["changed"] == 1
    study = dry["studies"][0]
    assert study["draft"] == [] and study["removed"][0]["model"] == "lung_ct_seg"
    assert any("no match" in reason for reason in study["decisions"][0]["reasons"])
    assert admin.post("/api/rules/dry-run", json={"text": broken}).status_code == 422

    refused = admin.post("/api/rules", json={"text": broken})
    assert refused.status_code == 422 and refused.json()["detail"]["problems"]
    saved = admin.post("/api/rules", json={"text": draft, "comment": "MR only"})
    assert saved.status_code == 201 and saved.json() == {"version": 2}
    assert admin.get("/api/rules").json()["author"] == "alice"
    with web.database.session() as session:  # the router sees the new rules without a restart
        assert web.rules.active(session)[0] == 2

    back = admin.post("/api/rules/rollback", json={"version": 1})
    assert back.status_code == 201 and back.json() == {"version": 3}
    assert admin.get("/api/rules").json()["text"] == admin.get("/api/rules/versions/1").json()["text"]
    assert admin.post("/api/rules/rollback", json={"version": 42}).status_code == 404
    assert admin.post("/api/rules/rollback", json={"version": "x"}).status_code == 422
    assert {"rules.save", "rules.rollback"} <= set(audit_actions(web))


def test_destinations_crud_and_echo(web, admin):
    assert [d["name"] for d in admin.get("/api/destinations").json()] == ["pacs"]
    assert admin.get("/api/destinations/pacs").json()["from_config"] is True
    assert admin.get("/api/destinations/nope").status_code == 404

    new = {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 1}
    created = admin.post("/api/destinations", json=new)
    assert created.status_code == 201 and created.json()["max_attempts"] == 5
    assert admin.post("/api/destinations", json=new).status_code == 409
    for bad in ({**new, "name": "a b"}, {**new, "ae_title": "X" * 17}, {**new, "port": 70000},
                {**new, "ae_title": "BAD\\AE"}, {**new, "host": ""}):
        assert admin.post("/api/destinations", json=bad).status_code == 422, bad
    updated = admin.put("/api/destinations/archive", json={**new, "port": 2, "max_attempts": 9})
    assert updated.json()["port"] == 2 and web.destinations.get("archive").max_attempts == 9
    assert admin.put("/api/destinations/ghost", json=new).status_code == 404

    echo = admin.post("/api/destinations/archive/echo").json()  # nothing listens on port 2
    assert echo["ok"] is False and "ARCHIVE@127.0.0.1:2" in echo["message"]
    assert admin.post("/api/destinations/ghost/echo").status_code == 404

    in_use = admin.delete("/api/destinations/pacs")
    assert in_use.status_code == 409 and "chest-ct-lungs" in in_use.json()["detail"]
    assert admin.delete("/api/destinations/archive").status_code == 204
    assert admin.delete("/api/destinations/archive").status_code == 404
    assert {"destinations.create", "destinations.update", "destinations.echo",
            "destinations.delete"} <= set(audit_actions(web))


def test_models_enable_disable(web, admin):
    def lung():
        return next(m for m in admin.get("/api/models").json() if m["name"] == "lung_ct_seg")

    assert lung()["enabled"] is True
    assert admin.post("/api/models/lung_ct_seg/disable").status_code == 200
    assert lung()["enabled"] is False
    assert admin.post("/api/models/nope/disable").status_code == 404
    assert admin.post("/api/models/lung_ct_seg/enable").status_code == 200
    assert audit_actions(web).count("models.disable") == 1


def test_disabled_model_is_refused_by_the_registry(web):
    from dicom_ai_node.node import Node

    node = Node(web.context.config)
    assert node.models.manifest("lung_ct_seg") is not None
    with web.database.session() as session:
        from dicom_ai_node.web.actions import set_model_enabled

        set_model_enabled(web.context, session, "lung_ct_seg", False, "alice")
    assert node.models.manifest("lung_ct_seg") is None  # the runner: "not installed or is disabled"


def test_audit_log(web, admin):
    admin.post("/api/models/lung_ct_seg/disable")
    events = admin.get("/api/audit", params={"actor": "alice"}).json()
    assert events[0]["action"] == "models.disable" and events[0]["target"] == "lung_ct_seg" and events[0]["at"]
    assert admin.get("/api/audit", params={"action": "users."}).json()[0]["actor"] == "test"
    assert admin.get("/api/audit", params={"limit": 5000}).status_code == 422


def test_health_ready_metrics_and_openapi(web):
    client = web.client()  # no login: for load balancers and Prometheus
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "checks": {"database": True}}
    web.context.ready = lambda: {"dicom_listener": False}
    assert client.get("/readyz").status_code == 503
    text = client.get("/metrics").text
    for line in ("dicom_ai_node_instances_received_total 3.0", "dicom_ai_node_received_bytes_total 3000.0",
                 "dicom_ai_node_studies_completed_total 1.0", 'dicom_ai_node_jobs{state="failed"} 2.0',
                 "dicom_ai_node_delivery_failures_total 1.0", 'dicom_ai_node_queue_depth{queue="jobs"} 1.0',
                 "dicom_ai_node_job_duration_seconds_count 0.0"):
        assert line in text, line
    assert "/api/rules/dry-run" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_users_and_tokens(web):
    from dicom_ai_node.web import users

    with web.database.session() as session:
        for bad in (("x y", "long enough", "admin"), ("bob", "short", "admin"), ("bob", "long enough", "root"),
                    ("alice", "long enough", "admin")):
            with pytest.raises(users.UserError):
                users.create_user(session, *bad, actor="test")
        stored = users.list_users(session)[0].password_hash
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert users.verify_password("correct horse battery", stored)
    assert not users.verify_password("wrong", stored) and not users.verify_password("x", "garbage")


def test_cli_users_and_resend(web, tmp_path, monkeypatch, capsys):
    import io

    from dicom_ai_node import cli

    config = str(tmp_path / "config.toml")
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert cli.main(["--config", config, "users", "add", "carol", "--role", "admin", "--password-stdin"]) == 0
    assert cli.main(["--config", config, "users", "token", "carol", "--label", "backup script"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert web.client(token).get("/api/models").status_code == 200
    assert cli.main(["--config", config, "users", "token", "nobody"]) == 1
    assert cli.main(["--config", config, "resend", "--failed"]) == 0  # the shared resend function
    with web.database.session() as session:
        assert session.get(Delivery, web.ids["delivery"]).state == "pending"
    assert "deliveries.resend" in [e["action"] for e in web.client(token).get("/api/audit").json()]
