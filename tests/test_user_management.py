"""Users and API tokens managed through the API, the admin page and the CLI (issue 13 §5):
add, disable, delete, set role, change password, token expiry and revocation, the last admin
kept, every change audited without secrets, scrypt at OWASP's cost with older hashes upgraded.

The web app runs in-process on a temp SQLite database (tests/web_support.py, which hashes at a
low scrypt cost through users.use_cheap_hashes_for_tests); the CLI runs through its main
function and once as a real process, which hashes at the production cost."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
from datetime import timedelta

import pytest

from dicom_ai_node import cli
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import ApiToken, AuditEvent, WebUser, utcnow
from dicom_ai_node.web import users
from tests.web_support import PASSWORD, Web, csrf_of

NEW_PASSWORD = "a new long passphrase"


@pytest.fixture
def web(tmp_path):
    return Web(tmp_path)


@pytest.fixture
def admin(web):
    return web.client(web.admin_token)


def login(web, name: str, password: str = PASSWORD):
    client = web.client()
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    answer = client.post("/login", data={"name": name, "password": password, "csrf_token": csrf})
    return client if answer.status_code == 303 and answer.headers["location"] == "/" else None


def audit_events(web, action: str) -> list[AuditEvent]:
    with web.database.session() as session:
        rows = session.query(AuditEvent).filter(AuditEvent.action == action).order_by(AuditEvent.id).all()
        session.expunge_all()
        return rows


def all_audit_text(web) -> str:
    with web.database.session() as session:
        return json.dumps([[e.actor, e.action, e.target, e.detail] for e in session.query(AuditEvent)], default=str)


def test_admin_adds_disables_enables_and_deletes_a_user_through_the_api(web, admin):
    created = admin.post("/api/users", json={"name": "bob", "password": PASSWORD, "role": "viewer"})
    assert created.status_code == 201 and created.json()["disabled"] is False
    assert admin.post("/api/users", json={"name": "bob", "password": PASSWORD}).status_code == 409
    assert admin.post("/api/users", json={"name": "eve", "password": "short"}).status_code == 422
    bob_session = login(web, "bob")
    alice = login(web, "alice")  # tokens are made from a login, not by another token
    bob_token = alice.post("/api/tokens", json={"user": "bob", "label": "bob's script"},
                           headers={"X-CSRF-Token": csrf_of(alice, "/")}).json()["token"]
    bob = web.client(bob_token)
    assert bob.get("/api/studies").status_code == 200 and bob_session.get("/").status_code == 200

    assert admin.patch("/api/users/bob", json={"disabled": True}).json()["disabled"] is True
    assert bob.get("/api/studies").status_code == 401  # at once, token and session
    assert bob_session.get("/").status_code == 303
    assert login(web, "bob") is None
    assert [u["disabled"] for u in admin.get("/api/users").json() if u["name"] == "bob"] == [True]

    admin.patch("/api/users/bob", json={"disabled": False})
    assert bob.get("/api/studies").status_code == 200  # the token works again
    assert bob_session.get("/").status_code == 303  # the session ended when bob was disabled

    assert admin.patch("/api/users/bob", json={"role": "admin"}).json()["role"] == "admin"
    assert bob.post("/api/models/lung_ct_seg/disable").status_code in (200, 404)  # now allowed to change
    assert admin.patch("/api/users/bob", json={"role": "root"}).status_code == 422

    assert admin.delete("/api/users/bob").status_code == 200
    assert bob.get("/api/studies").status_code == 401
    assert admin.delete("/api/users/bob").status_code == 404
    with web.database.session() as session:
        assert session.query(ApiToken).filter(ApiToken.label == "bob's script").count() == 0
    actions = [(e.actor, e.action, e.target) for e in audit_events(web, "users.delete")]
    assert actions == [("alice", "users.delete", "bob")]
    for action in ("users.add", "users.disable", "users.enable", "users.role", "tokens.create"):
        assert any(e.actor == "alice" and e.target == "bob" for e in audit_events(web, action)), action
    text = all_audit_text(web)
    assert PASSWORD not in text and bob_token not in text and bob_token[:20] not in text


def test_the_last_enabled_admin_is_kept(web, admin):
    for change in (lambda: admin.patch("/api/users/alice", json={"role": "viewer"}),
                   lambda: admin.patch("/api/users/alice", json={"disabled": True}),
                   lambda: admin.delete("/api/users/alice")):
        answer = change()
        assert answer.status_code == 409 and "only enabled admin" in answer.json()["detail"]
    assert admin.get("/api/users").status_code == 200  # still an admin
    admin.post("/api/users", json={"name": "carol", "password": PASSWORD, "role": "admin"})
    admin.patch("/api/users/carol", json={"disabled": True})
    assert admin.delete("/api/users/alice").status_code == 409  # carol is disabled: no admin would remain
    admin.patch("/api/users/carol", json={"disabled": False})
    assert admin.delete("/api/users/alice").status_code == 200  # deleting yourself, with another admin left
    assert admin.get("/api/users").status_code == 401


def test_viewers_cannot_manage_users(web):
    viewer = web.client(web.viewer_token)
    assert viewer.get("/api/users").status_code == 403
    assert viewer.post("/api/users", json={"name": "x1", "password": PASSWORD}).status_code == 403
    assert viewer.patch("/api/users/alice", json={"disabled": True}).status_code == 403
    assert viewer.delete("/api/users/alice").status_code == 403
    assert viewer.post("/api/users/alice/password", json={"password": NEW_PASSWORD}).status_code == 403
    assert web.client().get("/api/users").status_code == 401


def test_password_changes(web, admin):
    viewer = web.client(web.viewer_token)
    wrong = viewer.post("/api/users/victor/password", json={"password": NEW_PASSWORD, "current_password": "nope"})
    assert wrong.status_code == 403
    assert viewer.post("/api/users/victor/password", json={"password": NEW_PASSWORD}).status_code == 403
    assert viewer.post("/api/users/victor/password",
                       json={"password": "short", "current_password": PASSWORD}).status_code == 422
    other_session = login(web, "victor")
    # own change through a session: needs the CSRF header; this session stays, the other one ends
    mine = login(web, "victor")
    body = {"password": NEW_PASSWORD, "current_password": PASSWORD}
    assert mine.post("/api/users/victor/password", json=body).status_code == 403
    answer = mine.post("/api/users/victor/password", json=body, headers={"X-CSRF-Token": csrf_of(mine)})
    assert answer.status_code == 200, answer.text
    assert mine.get("/").status_code == 200 and other_session.get("/").status_code == 303
    assert login(web, "victor") is None and login(web, "victor", NEW_PASSWORD) is not None
    assert viewer.get("/api/studies").status_code == 200  # tokens stay valid

    # an admin sets another user's password without knowing it; that user's sessions end
    victor = login(web, "victor", NEW_PASSWORD)
    assert admin.post("/api/users/victor/password", json={"password": PASSWORD}).status_code == 200
    assert victor.get("/").status_code == 303 and login(web, "victor") is not None
    events = [(e.actor, e.target) for e in audit_events(web, "users.password")]
    assert events == [("victor", "victor"), ("alice", "victor")]
    assert NEW_PASSWORD not in all_audit_text(web)


def test_tokens_listed_revoked_and_expired(web, admin):
    viewer = web.client(web.viewer_token)
    # a token cannot make tokens (a leaked one would renew itself past any expiry); a login can
    refused = viewer.post("/api/tokens", json={"label": "mine", "days": 7})
    assert refused.status_code == 403 and "cannot create tokens" in refused.json()["detail"]
    session = login(web, "victor")
    with_csrf = {"X-CSRF-Token": csrf_of(session, "/")}
    created = session.post("/api/tokens", json={"label": "mine", "days": 7}, headers=with_csrf)
    assert created.status_code == 201
    new = created.json()
    assert new["token"].startswith(new["prefix"]) and new["user"] == "victor"
    own = viewer.get("/api/tokens").json()
    assert {t["user"] for t in own} == {"victor"} and len(own) == 2
    listed = next(t for t in own if t["prefix"] == new["prefix"])
    assert listed["label"] == "mine" and listed["expired"] is False and listed["expires_at"] and listed["created_at"]
    assert "token" not in listed and new["token"] not in json.dumps(own)
    assert {t["user"] for t in admin.get("/api/tokens").json()} == {"alice", "victor"}
    assert [t["user"] for t in admin.get("/api/tokens", params={"user": "alice"}).json()] == ["alice"]

    assert "admin role" in session.post("/api/tokens", json={"user": "alice"}, headers=with_csrf).json()["detail"]
    assert session.post("/api/tokens", json={"days": users.TOKEN_DAYS_MAX + 1}, headers=with_csrf).status_code == 422
    alice_token_id = admin.get("/api/tokens", params={"user": "alice"}).json()[0]["id"]
    assert viewer.delete(f"/api/tokens/{alice_token_id}").status_code == 404  # not theirs
    assert web.client(new["token"]).get("/api/studies").status_code == 200
    assert viewer.get("/api/tokens").json()[1]["last_used_at"] is not None

    # a revoked token is refused at once
    assert viewer.delete(f"/api/tokens/{listed['id']}").status_code == 200
    assert web.client(new["token"]).get("/api/studies").status_code == 401
    assert viewer.delete(f"/api/tokens/{listed['id']}").status_code == 404
    revoked = audit_events(web, "tokens.revoke")
    assert [(e.actor, e.target, e.detail["prefix"]) for e in revoked] == [("victor", "victor", new["prefix"])]

    # an expired token is refused, and shown as expired
    with web.database.session() as session:
        session.query(ApiToken).update({ApiToken.expires_at: utcnow() - timedelta(seconds=1)})
    assert viewer.get("/api/studies").status_code == 401 and admin.get("/api/studies").status_code == 401
    with web.database.session() as session:
        assert all(t["expired"] for t in users.list_tokens(session))


def test_users_page_for_admin_and_viewer(web):
    admin = web.login("alice")
    page = admin.get("/users")
    assert page.status_code == 200 and "victor" in page.text and "Add a user" in page.text
    csrf = csrf_of(admin, "/users")
    assert admin.post("/users", data={"name": "dora", "password": PASSWORD, "role": "viewer"}).status_code == 403
    answer = admin.post("/users", data={"name": "dora", "password": PASSWORD, "role": "viewer", "csrf_token": csrf})
    assert answer.status_code == 303 and "added" in answer.headers["location"]
    answer = admin.post("/users/dora/role", data={"role": "admin", "csrf_token": csrf})
    assert "error" not in answer.headers["location"]
    answer = admin.post("/users/dora/disable", data={"csrf_token": csrf})
    assert "disabled" in answer.headers["location"] and login(web, "dora") is None
    admin.post("/users/dora/disable", data={"enable": "true", "csrf_token": csrf})
    assert admin.post("/users/dora/password", data={"password": NEW_PASSWORD, "csrf_token": csrf}).status_code == 303
    assert login(web, "dora", NEW_PASSWORD) is not None
    refused = admin.post("/users/nobody/delete", data={"csrf_token": csrf})
    assert "error=" in refused.headers["location"]

    # a token made on the page is shown once, in the answer, then only its prefix
    shown = admin.post("/tokens", data={"owner": "dora", "label": "backup", "days": "30", "csrf_token": csrf})
    token = shown.text.split('<code class="new-token">')[1].split("</code>")[0]
    assert shown.status_code == 200 and web.client(token).get("/api/studies").status_code == 200
    listing = admin.get("/users").text
    assert token not in listing and token[:users.TOKEN_PREFIX_LENGTH] in listing
    with web.database.session() as session:
        token_id = next(t["id"] for t in users.list_tokens(session, "dora"))
    assert admin.post(f"/tokens/{token_id}/revoke", data={"csrf_token": csrf}).status_code == 303
    assert web.client(token).get("/api/studies").status_code == 401
    assert admin.post("/users/dora/delete", data={"csrf_token": csrf}).status_code == 303
    assert "dora" not in admin.get("/users").text

    viewer = web.login("victor")
    page = viewer.get("/users")
    assert page.status_code == 200 and "Add a user" not in page.text and "Your password" in page.text
    vcsrf = csrf_of(viewer, "/users")
    assert viewer.post("/users", data={"name": "x2", "password": PASSWORD, "csrf_token": vcsrf}).status_code == 403
    assert viewer.post("/users/alice/password", data={"password": NEW_PASSWORD, "csrf_token": vcsrf}).status_code == 403
    shown = viewer.post("/tokens", data={"label": "mine", "csrf_token": vcsrf})
    assert shown.status_code == 200 and "New API token for victor" in shown.text
    wrong = viewer.post("/users/victor/password",
                        data={"password": NEW_PASSWORD, "current_password": "nope", "csrf_token": vcsrf})
    assert "current+password+is+wrong" in wrong.headers["location"]


@pytest.fixture
def production_cost():
    users.use_cheap_hashes_for_tests(None)
    yield
    users.use_cheap_hashes_for_tests(users.ScryptCost(2**10, 8, 1))


def legacy_hash(password: str) -> str:
    """A hash as the node stored them before issue 13: scrypt N=2^14, r=8, p=1."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${2**14}$8$1${salt.hex()}${digest.hex()}"


def test_production_cost_is_at_least_owasp_and_older_hashes_are_upgraded_at_login(web, production_cost):
    assert not users.PRODUCTION_COST.weaker_than(users.OWASP_MINIMUM)
    assert users.OWASP_MINIMUM == users.ScryptCost(2**17, 8, 1)
    assert users.current_cost() == users.PRODUCTION_COST
    with web.database.session() as session:
        session.query(WebUser).filter(WebUser.name == "victor").update({WebUser.password_hash: legacy_hash(PASSWORD)})
    assert login(web, "victor", "wrong password") is None
    assert login(web, "victor") is not None  # the older hash still verifies ...
    with web.database.session() as session:
        stored = session.query(WebUser).filter(WebUser.name == "victor").one().password_hash
    assert users.hash_cost(stored) == users.PRODUCTION_COST  # ... and is replaced at the current cost
    assert login(web, "victor") is not None
    upgraded = audit_events(web, "users.password_upgraded")
    assert [(e.actor, e.target) for e in upgraded] == [("node", "victor")]
    assert PASSWORD not in all_audit_text(web)


def test_cli_as_a_process_hashes_at_the_production_cost(tmp_path):
    Web(tmp_path)  # a config and a migrated database
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    added = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(tmp_path / "config.toml"),
                            "users", "add", "olga", "--role", "viewer", "--password-stdin"],
                           input=PASSWORD + "\n", capture_output=True, text=True, env=env, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    with database.session() as session:
        stored = session.query(WebUser).filter(WebUser.name == "olga").one().password_hash
    database.dispose()
    assert not users.hash_cost(stored).weaker_than(users.OWASP_MINIMUM)
    assert users.verify_password(PASSWORD, stored) and PASSWORD not in added.stdout + added.stderr


def test_cli_users_and_tokens(web, tmp_path, monkeypatch, capsys):
    config = ["--config", str(tmp_path / "config.toml")]

    def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin + "\n"))
        code = cli.main([*config, *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    assert run("users", "add", "carol", "--role", "viewer", "--password-stdin", stdin=PASSWORD)[0] == 0
    code, out = run("tokens", "create", "carol", "--label", "nightly export", "--days", "10")
    token = out.strip().splitlines()[-1]
    assert code == 0 and web.client(token).get("/api/studies").status_code == 200
    assert run("tokens", "create", "carol", "--days", "1000")[0] == 1
    code, out = run("users", "token", "carol")  # the older spelling still works
    assert code == 0 and out.strip().startswith("dan_")

    code, out = run("tokens", "list", "--user", "carol")
    assert code == 0 and token[:users.TOKEN_PREFIX_LENGTH] in out and "nightly export" in out and token not in out
    assert len(out.strip().splitlines()) == 2

    assert run("users", "role", "carol", "admin")[0] == 0
    assert web.client(token).get("/api/users").status_code == 200
    assert run("users", "disable", "carol")[0] == 0
    assert web.client(token).get("/api/studies").status_code == 401
    code, out = run("users", "list")
    assert "carol" in out and "disabled" in out
    assert run("users", "enable", "carol")[0] == 0
    assert web.client(token).get("/api/studies").status_code == 200

    assert run("users", "password", "carol", "--password-stdin", stdin=NEW_PASSWORD)[0] == 0
    assert login(web, "carol", NEW_PASSWORD) is not None and login(web, "carol") is None

    with web.database.session() as session:
        token_id = next(t["id"] for t in users.list_tokens(session, "carol") if t["label"] == "nightly export")
    assert run("tokens", "revoke", str(token_id))[0] == 0
    assert web.client(token).get("/api/studies").status_code == 401
    assert run("tokens", "revoke", str(token_id))[0] == 1

    # alice and carol are admins: carol may go, alice (then the only one) may not
    assert run("users", "delete", "carol")[0] == 0
    code, out = run("users", "delete", "alice")
    assert code == 1 and "only enabled admin" in out
    assert run("users", "role", "alice", "viewer")[0] == 1 and run("users", "disable", "alice")[0] == 1
    assert run("users", "delete", "nobody")[0] == 1
    with web.database.session() as session:
        assert session.query(WebUser).filter(WebUser.name == "carol").count() == 0
    cli_actions = {e.action for e in audit_events(web, "users.delete") + audit_events(web, "tokens.revoke")}
    assert cli_actions == {"users.delete", "tokens.revoke"}
    assert all(e.actor == "cli" for e in audit_events(web, "users.role"))
    text = all_audit_text(web)
    assert PASSWORD not in text and NEW_PASSWORD not in text and token not in text


def test_migration_gives_older_tokens_an_expiry(tmp_path):
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import text

    from dicom_ai_node.db.engine import MIGRATIONS

    database = Database(f"sqlite:///{tmp_path / 'old.db'}")
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0005")
        connection.execute(text("INSERT INTO web_user (id, name, password_hash, role, created_at) "
                                "VALUES (1, 'old', :hash, 'admin', CURRENT_TIMESTAMP)"), {"hash": legacy_hash(PASSWORD)})
        connection.execute(text("INSERT INTO api_token (user_id, token_hash, label, created_at) "
                                "VALUES (1, :hash, 'old token', CURRENT_TIMESTAMP)"),
                           {"hash": users.token_hash("dan_old-token")})
    database.upgrade()
    with database.session() as session:
        who = users.principal_for_token(session, "dan_old-token")
        tokens = users.list_tokens(session)
        assert who is not None and who.name == "old"
        assert tokens[0]["prefix"] is None and not tokens[0]["expired"]
        assert timedelta(days=89) < tokens[0]["expires_at"].replace(tzinfo=None) - utcnow().replace(tzinfo=None) \
            <= timedelta(days=90)
        assert users.verify_password(PASSWORD, session.query(WebUser).one().password_hash)
        assert session.query(WebUser).one().disabled is False
    database.dispose()
