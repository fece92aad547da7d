"""Login attempts are limited per user name and per client address (issue 10, item 6).

Before: 340 wrong passwords at 25/s, no lockout, nothing audited or logged, and the right
password accepted straight after. Through the web app (in-process, temp SQLite database); the
limiter's clock is a test clock so that lock expiry needs no sleeping.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from dicom_ai_node.db.models import AuditEvent
from dicom_ai_node.web.login_limits import FIRST_LOCK_S, MAX_FAILURES, LoginLimiter
from tests.web_support import PASSWORD, Web

WRONG = "not-the-password-x7"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def web(tmp_path, clock):
    web = Web(tmp_path)
    web.context.login_limits = LoginLimiter(clock=clock)
    return web


def attempt(web, name: str, password: str, address: str = "192.0.2.10"):
    client = TestClient(web.app, follow_redirects=False, client=(address, 40000))
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    return client.post("/login", data={"name": name, "password": password, "csrf_token": csrf})


def logged_in(answer) -> bool:
    return answer.status_code == 303 and answer.headers["location"] == "/"


def audit_rows(web, action: str) -> list[AuditEvent]:
    with web.database.session() as session:
        rows = session.query(AuditEvent).filter(AuditEvent.action == action).order_by(AuditEvent.id).all()
        session.expunge_all()
        return rows


def test_wrong_passwords_lock_the_user_with_growing_back_off(web, clock, caplog):
    caplog.set_level(logging.INFO)
    user_limit = MAX_FAILURES["user"]
    for _ in range(user_limit):
        answer = attempt(web, "alice", WRONG)
        assert answer.status_code == 303 and "wrong+user+name+or+password" in answer.headers["location"]

    refused = attempt(web, "alice", PASSWORD)  # the right password too: the name is locked
    assert refused.status_code == 429 and refused.headers["Retry-After"] == str(int(FIRST_LOCK_S))
    assert "too many failed logins" in refused.text

    clock.now += FIRST_LOCK_S - 1
    assert attempt(web, "alice", PASSWORD).status_code == 429
    clock.now += 2
    for _ in range(user_limit):  # the lock is over; the next series of failures locks twice as long
        assert not logged_in(attempt(web, "alice", WRONG))
    assert attempt(web, "alice", PASSWORD).headers["Retry-After"] == str(int(2 * FIRST_LOCK_S))
    clock.now += 2 * FIRST_LOCK_S + 1
    assert logged_in(attempt(web, "alice", PASSWORD))

    failed = audit_rows(web, "login.failed")
    assert len(failed) == 2 * user_limit
    assert {(row.actor, row.target, row.detail["address"]) for row in failed} == {("anonymous", "alice", "192.0.2.10")}
    locks = audit_rows(web, "login.locked")
    assert [(row.target, row.detail) for row in locks] == [
        ("alice", {"kind": "user", "seconds": FIRST_LOCK_S}), ("alice", {"kind": "user", "seconds": 2 * FIRST_LOCK_S})]
    assert [(row.actor, row.detail["address"]) for row in audit_rows(web, "login")] == [("alice", "192.0.2.10")]
    assert "failed login for user 'alice' from 192.0.2.10" in caplog.text
    assert "logins for user 'alice' refused for 30 s" in caplog.text
    assert WRONG not in caplog.text and PASSWORD not in caplog.text


def test_a_locked_user_name_does_not_lock_the_others(web):
    for _ in range(MAX_FAILURES["user"]):
        attempt(web, "alice", WRONG, address="192.0.2.10")
    assert attempt(web, "alice", PASSWORD, address="198.51.100.7").status_code == 429  # from anywhere
    assert logged_in(attempt(web, "victor", PASSWORD, address="192.0.2.10"))


def test_many_user_names_from_one_address_lock_the_address(web, caplog):
    caplog.set_level(logging.INFO)
    address_limit = MAX_FAILURES["address"]
    for index in range(address_limit):  # spraying: a different name every time, each under its own limit
        assert not logged_in(attempt(web, f"guess{index}", WRONG, address="203.0.113.5"))
    refused = attempt(web, "alice", PASSWORD, address="203.0.113.5")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) == int(FIRST_LOCK_S)
    assert logged_in(attempt(web, "alice", PASSWORD, address="192.0.2.10"))  # others are not affected

    failed = audit_rows(web, "login.failed")
    assert len(failed) == address_limit and {row.target for row in failed} == {None}  # names of no user
    assert [(row.target, row.detail["kind"]) for row in audit_rows(web, "login.locked")] == [("203.0.113.5", "address")]
    assert "guess1" not in caplog.text  # what was typed as a name may be a password: not logged
    assert "failed login for user (unknown user name) from 203.0.113.5" in caplog.text


def test_successful_logins_from_a_shared_address_never_count(web):
    for _ in range(MAX_FAILURES["address"] + 5):
        assert logged_in(attempt(web, "victor", PASSWORD, address="192.0.2.99"))


def test_parallel_attempts_cannot_slip_past_the_limit(web):
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda _: attempt(web, "alice", WRONG), range(32), timeout=120))
    checked = [a for a in answers if a.status_code == 303]
    assert len(checked) <= MAX_FAILURES["user"]
    assert len(checked) + sum(a.status_code == 429 for a in answers) == 32
    assert len(audit_rows(web, "login.failed")) == len(checked)
    assert attempt(web, "alice", PASSWORD).status_code == 429


def test_memory_stays_bounded_under_many_names_and_addresses(clock):
    limits = LoginLimiter(max_tracked=100, clock=clock)
    for index in range(5000):
        assert limits.begin(f"user{index}", f"10.0.{index // 250}.{index % 250}") == 0
        limits.failed(f"user{index}", f"10.0.{index // 250}.{index % 250}")
        assert len(limits) <= 100
    # records nobody touched for longer than any lock are dropped first
    clock.now += limits.forget_s + 1
    limits.begin("late", "10.9.9.9")
    assert len(limits) == 2
