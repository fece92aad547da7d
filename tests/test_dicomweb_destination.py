"""DICOMweb destinations (issue 12 §2): results go by STOW-RS to a real Orthanc with its DICOMweb
plugin and HTTP basic auth, through the same outbox (lease, retries, backoff, dead letters) as
C-STORE. The node end to end, then the real outbox in-process for the failure paths."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from pydicom import dcmread
from sqlalchemy import text

from dicom_ai_node.config import ConfigError, DestinationConfig, load_config
from dicom_ai_node.db.engine import MIGRATIONS, Database
from dicom_ai_node.db.models import AuditEvent, Delivery, DestinationRow, as_utc, utcnow
from dicom_ai_node.deliver.destinations import DestinationStore
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series
from tests.test_destination_pause import delivery, queue_result
from tests.test_destination_pause import web  # noqa: F401  (the in-process web app + outbox fixture)
from tests.test_end_to_end import RULES, all_results_arrived
from tests.web_support import csrf_of

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "/usr/sbin/Orthanc")]

PASSWORD = "s3cret-Pa55word"  # Orthanc's password for user "node"


@pytest.fixture
def pacs(orthanc_factory):
    """Orthanc with the DICOMweb plugin behind HTTP basic auth (user "node")."""
    peer = orthanc_factory(users={"node": PASSWORD})
    assert peer.dicomweb_loaded, "the DICOMweb plugin did not load:\n" + peer.log_tail()
    return peer


def dicomweb_destination(pacs, password_file, **overrides) -> DestinationConfig:
    values = dict(name="pacs", kind="dicomweb", url=pacs.dicomweb_url, auth="basic", username="node",
                  secret_file=password_file, max_attempts=3, backoff_s=0.0, timeout_s=5.0)
    return DestinationConfig(**{**values, **overrides})


def use(web, destination: DestinationConfig) -> None:
    """Make ``pacs`` this destination the way a site does: config.toml seeds the table."""
    web.destinations.seed_from_config((destination,))


def test_results_of_a_study_reach_a_dicomweb_destination(tmp_path, pacs):
    """The synthetic CT through the node: SEG, SR and key images arrive by STOW-RS."""
    series = make_ct_series(tmp_path / "ct", shape=(32, 64, 64), spacing=(2.5, 4.5, 4.5), seed="stow")
    (tmp_path / "password").write_text(PASSWORD + "\n")
    destination = (f'[[destinations]]\nname = "pacs"\nkind = "dicomweb"\nurl = "{pacs.dicomweb_url}/"\n'
                   f'auth = "basic"\nusername = "node"\npassword_file = "{tmp_path / "password"}"\n'
                   "max_attempts = 3\nbackoff_s = 0.5\ntimeout_s = 10\n")
    with NodeProcess(tmp_path / "node", rules=destination + RULES) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        wait_for(lambda: all_results_arrived(pacs, series.study_instance_uid), timeout=180,
                 what="SEG, SR and key images in Orthanc by STOW-RS")
        job = wait_for(lambda: (j := node.study(series.study_instance_uid)["jobs"][0])["state"] == "done" and j,
                       timeout=30, what="job done")
        log = node.log()
    deliveries = [d for r in job["results"] for d in r["deliveries"]]
    assert deliveries and all(d["state"] == "sent" and d["attempts"] == 1 for d in deliveries)
    sent = {r["sop_instance_uid"] for r in job["results"]}
    assert sent <= pacs.sop_instance_uids()  # Orthanc's REST /tools/find: every result is there
    assert PASSWORD not in log


def test_wrong_password_fails_each_attempt_clearly_then_dead_letter_then_a_fixed_file_sends(
        tmp_path, web, pacs, caplog):
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password\n")
    use(web, dicomweb_destination(pacs, password_file, max_attempts=2))
    delivery_id, uid = queue_result(web)
    admin = web.client(web.admin_token)

    with caplog.at_level(logging.DEBUG):
        assert web.outbox.process_due() == 1
        first = delivery(web, delivery_id)
        assert (first.state, first.attempts) == ("pending", 1)
        assert "HTTP 401 Unauthorized" in first.last_error and "password" in first.last_error
        assert "will not succeed on retry" in first.last_error
        assert web.outbox.process_due() == 1
    given_up = delivery(web, delivery_id)
    assert (given_up.state, given_up.attempts) == ("failed", 2) and given_up.failed_at is not None
    assert pacs.find_instance(uid) is None
    letters = admin.get("/api/dead-letters", params={"destination": "pacs"}).json()
    assert [d["error"] for d in letters if d["id"] == delivery_id] == [given_up.last_error]

    # the password is read at each send: fixing the file and retrying needs no restart
    password_file.write_text(PASSWORD + "\n")
    assert admin.post(f"/api/dead-letters/{delivery_id}/retry").status_code == 200  # and sends now
    assert delivery(web, delivery_id).state == "sent"
    assert pacs.find_instance(uid) is not None

    shown = admin.get("/api/destinations/pacs").json()
    assert (shown["kind"], shown["url"], shown["auth"]) == ("dicomweb", pacs.dicomweb_url, "basic")
    assert "password" not in str(shown) and "secret" not in str(shown)
    with web.database.session() as session:
        audited = " ".join(str(e.detail) for e in session.query(AuditEvent))
    assert PASSWORD not in caplog.text and "not-the-password" not in caplog.text + audited


def test_orthanc_down_is_retried_with_backoff_then_sent_when_it_is_back(tmp_path, web, pacs):
    (tmp_path / "password").write_text(PASSWORD)
    use(web, dicomweb_destination(pacs, tmp_path / "password", max_attempts=5, backoff_s=1.0))
    delivery_id, uid = queue_result(web)
    pacs.stop()
    before = utcnow()
    assert web.outbox.process_due() == 1
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error.startswith(f"cannot reach {pacs.dicomweb_url}: ConnectError")
    assert row.last_error.endswith("(retried)")
    # the next attempt waits backoff_s (1 s, then doubling), not the lease
    assert as_utc(row.next_attempt_at) >= before + timedelta(seconds=1)
    assert as_utc(row.next_attempt_at) <= utcnow() + timedelta(seconds=1)

    pacs.start()
    wait_for(lambda: web.outbox.process_due() and delivery(web, delivery_id).state == "sent", timeout=30,
             what="sent once Orthanc is back")
    assert delivery(web, delivery_id).attempts >= 2
    assert pacs.find_instance(uid) is not None


def test_an_instance_the_server_refuses_fails_alone_with_its_failure_reason(tmp_path, web, pacs):
    (tmp_path / "password").write_text(PASSWORD)
    use(web, dicomweb_destination(pacs, tmp_path / "password", max_attempts=1))
    good_id, good_uid = queue_result(web)
    bad_id, bad_uid = queue_result(web)
    with web.database.session() as session:  # a result Orthanc cannot index: no SeriesInstanceUID
        path = web.storage.absolute(session.get(Delivery, bad_id).result.path)
    broken = dcmread(path)
    del broken.SeriesInstanceUID
    broken.save_as(path)
    assert web.outbox.process_due() == 2
    assert delivery(web, good_id).state == "sent" and pacs.find_instance(good_uid) is not None
    bad = delivery(web, bad_id)
    assert bad.state == "failed" and pacs.find_instance(bad_uid) is None
    assert "the server refused the instance (failure reason 0xC000, cannot understand" in bad.last_error


def test_the_admin_page_test_is_a_qido_query_and_page_edits_cannot_move_credentials(tmp_path, web, pacs):
    admin = web.client(web.admin_token)
    created = admin.post("/api/destinations", json={"name": "open", "kind": "dicomweb",
                                                     "url": pacs.dicomweb_url + "/", "timeout_s": 5})
    assert created.status_code == 201, created.text
    assert created.json()["url"] == pacs.dicomweb_url and created.json()["ae_title"] is None
    # no credentials for "open": Orthanc answers QIDO-RS with 401, and the test says so
    answer = admin.post("/api/destinations/open/echo").json()
    assert not answer["ok"] and "HTTP 401" in answer["message"] and "password" in answer["message"]

    (tmp_path / "password").write_text(PASSWORD)
    use(web, dicomweb_destination(pacs, tmp_path / "password"))
    assert admin.post("/api/destinations/pacs/echo").json() == {"ok": True, "message": "QIDO-RS answered HTTP 200"}

    for url in ("http://node:pw@127.0.0.1/dicom-web", "ftp://127.0.0.1/x", "http://127.0.0.1/x?token=1"):
        refused = admin.post("/api/destinations", json={"name": "bad", "kind": "dicomweb", "url": url})
        assert refused.status_code == 422, url
    assert admin.post("/api/destinations", json={"name": "bad", "kind": "dimse"}).status_code == 422
    # config.toml's password goes only where config.toml sends it
    moved = admin.put("/api/destinations/pacs", json={"kind": "dicomweb", "url": "http://127.0.0.2:9/dicom-web"})
    assert moved.status_code == 409 and "config.toml" in moved.json()["detail"]
    assert admin.put("/api/destinations/pacs", json={"kind": "dicomweb", "url": pacs.dicomweb_url,
                                                     "max_attempts": 7}).status_code == 200

    browser = web.login()
    form = {"name": "archive", "kind": "dicomweb", "url": pacs.dicomweb_url, "csrf_token": csrf_of(browser, "/destinations")}
    assert "saved" in browser.post("/destinations", data=form).headers["location"]
    assert admin.get("/api/destinations/archive").json()["url"] == pacs.dicomweb_url
    refused = browser.post("/destinations", data={**form, "name": "bad", "url": "http://u:p@h/dw"})
    assert "user%3Apassword%40" in refused.headers["location"] and admin.get("/api/destinations/bad").status_code == 404

    page = browser.get("/destinations").text
    assert pacs.dicomweb_url in page and "(basic auth)" in page and "Test (QIDO-RS)" in page
    assert str(tmp_path / "password") not in page and PASSWORD not in page


@pytest.mark.parametrize("entry, key, problem", [
    ('url = "http://node:pw@pacs/dicom-web"', "destinations[0].url", "without user:password@"),
    ('url = "https://pacs/dicom-web?access_token=x"', "destinations[0].url", "query"),
    ('url = "https://pacs/dw"\nauth = "basic"\nusername = "n"', "destinations[0].password_file",
     "needs exactly one of password_file or password_env"),
    ('url = "https://pacs/dw"\nauth = "basic"\nusername = "n"\npassword = "x"', "destinations[0].password",
     "unknown key"),
    ('url = "http://pacs.example/dw"\nauth = "bearer"\ntoken_file = "token"', "destinations[0].url",
     "credentials in clear over http://"),
    ('url = "https://pacs/dw"\nauth = "bearer"\ntoken_file = "missing"', "destinations[0].token_file",
     "file not found"),
    ('url = "https://pacs/dw"\nauth = "bearer"\ntoken_env = "DICOM_AI_NODE_TEST_UNSET_TOKEN"',
     "destinations[0].token_env", "names no environment variable"),
    ('url = "https://pacs/dw"\nverify_tls = "missing-ca.pem"', "destinations[0].verify_tls", "file not found"),
    ('url = "https://pacs/dw"\nae_title = "PACS"', "destinations[0].ae_title", "unknown key"),
    ('url = "https://pacs/dw"\nusername = "n"', "destinations[0].username", "does not go with auth = 'none'"),
])
def test_dicomweb_config_errors_name_the_key(tmp_path, entry, key, problem):
    (tmp_path / "token").write_text("t")
    path = tmp_path / "config.toml"
    path.write_text('[node]\nallow_any_caller = true\n[[destinations]]\nname = "w"\nkind = "dicomweb"\n' + entry + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{key}: " in str(error.value) and problem in str(error.value)


def test_dicomweb_config_reads_where_the_secret_is_not_the_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS_TOKEN", "tok")
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "config.toml"
    path.write_text('[node]\nallow_any_caller = true\n[[destinations]]\nname = "w"\nkind = "dicomweb"\n'
                    'url = "https://pacs.example/dicom-web/"\nauth = "bearer"\ntoken_env = "PACS_TOKEN"\n'
                    'verify_tls = "ca.pem"\ntimeout_s = 12\n')
    destination = load_config(path).destination("w")
    assert (destination.kind, destination.url, destination.auth, destination.secret_env) == (
        "dicomweb", "https://pacs.example/dicom-web", "bearer", "PACS_TOKEN")
    assert destination.verify_tls and destination.ca_file == tmp_path / "ca.pem" and destination.timeout_s == 12
    assert "tok" not in repr(destination)


def test_migration_0008_keeps_existing_destinations_dimse_with_their_page_edits(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'old.db'}")
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    seeded = DestinationConfig(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
        # seeded from config before 0008, then its port edited on the page
        connection.execute(text(
            "INSERT INTO destination (name, ae_title, host, port, max_attempts, backoff_s, timeout_s, "
            "config_values, updated_at) VALUES ('pacs', 'ORTHANC', '127.0.0.1', 11112, 5, 2.0, 30.0, "
            ":values, CURRENT_TIMESTAMP)"),
            {"values": '{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, '
                       '"calling_ae_title": null, "max_attempts": 5, "backoff_s": 2.0, "timeout_s": 30.0, "tls": null}'})
    database.upgrade()
    DestinationStore(database).seed_from_config((seeded,))  # the same config.toml after the upgrade
    with database.session() as session:
        row = session.get(DestinationRow, "pacs")
        assert (row.kind, row.port, row.url, row.auth, row.verify_tls) == ("dimse", 11112, None, "none", True)
    with database.engine.begin() as connection:  # and back: DICOMweb rows go, the others stay
        connection.execute(text("INSERT INTO destination (name, kind, url, max_attempts, backoff_s, timeout_s, "
                                "updated_at) VALUES ('web', 'dicomweb', 'https://x/dw', 5, 2, 30, CURRENT_TIMESTAMP)"))
        config.attributes["connection"] = connection
        command.downgrade(config, "0007")
        assert [tuple(r) for r in connection.execute(text("SELECT name, port FROM destination"))] == [("pacs", 11112)]
    database.dispose()


def test_a_server_that_never_answers_costs_one_timeout_and_is_retried(web):
    """A peer that takes the connection and never reads or answers (a hung PACS): the attempt
    ends after timeout_s with a read timeout, and is retried."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections complete in the kernel's backlog; nobody accepts them
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/dicom-web"
        use(web, DestinationConfig(name="pacs", kind="dicomweb", url=url, timeout_s=0.5, backoff_s=0.0))
        delivery_id, _ = queue_result(web)
        assert web.outbox.process_due() == 1
    row = delivery(web, delivery_id)
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error.startswith(f"cannot reach {url}: ReadTimeout") and row.last_error.endswith("(retried)")
