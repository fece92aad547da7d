"""Notifications (issue 13 §2): [[notify]] targets get the events they asked for, without
patient data unless configured, from a bounded queue and one sender thread. Real parts: an
aiosmtpd SMTP server and an http.server webhook receiver on loopback, the real outbox."""

from __future__ import annotations

import email
import hashlib
import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from dicom_ai_node.config import ConfigError, NotifyConfig, load_config
from dicom_ai_node.notify import Notifier, message, webhook
from tests.peers import free_port, wait_for
from tests.test_destination_pause import delivery, queue_result, set_destination, web  # noqa: F401
from tests.web_support import STUDY

SECRET = "s3cret-key"


class Receiver:
    """A webhook receiver: http.server on loopback answering ``status`` and keeping every request."""

    def __init__(self, status: int = 204):
        self.status, self.requests = status, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Mailbox:
    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, email.message_from_bytes(envelope.content)))
        return "250 OK"

    def __init__(self):
        self.messages = []


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def mailbox():
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    mailbox.port = controller.port
    yield mailbox
    controller.stop()


def hook(url: str, events=("delivery_failed",), **kwargs) -> NotifyConfig:
    values = {"retries": 0, "backoff_s": 0.0, "timeout_s": 5.0, "secret": SECRET} | kwargs
    return NotifyConfig(name="ops-hook", kind="webhook", events=tuple(events), url=url, **values)


def mail(port: int, events=("delivery_failed",), **kwargs) -> NotifyConfig:
    return NotifyConfig(name="ops-mail", kind="email", events=tuple(events), smtp_host="127.0.0.1",
                        smtp_port=port, starttls=False, from_addr="node@example.org",
                        to=("ops@example.org",), timeout_s=5.0, **kwargs)


@pytest.fixture
def notifier_of():
    made = []

    def make(*targets, **kwargs):
        notifier = Notifier(targets, node="AI_NODE", **kwargs)
        made.append(notifier)
        notifier.start()
        return notifier

    yield make
    for notifier in made:
        notifier.stop()


# -- config ---------------------------------------------------------------------------

def write(tmp_path, notify: str):
    path = tmp_path / "config.toml"
    path.write_text('[node]\nallow_any_caller = true\n' + notify)
    return path


def test_config_reads_both_kinds(tmp_path):
    config = load_config(write(tmp_path, """
[[notify]]
kind = "webhook"
url = "https://hooks.example.org/x"
secret = "hush-hush-42"
events = ["job_failed", "delivery_failed"]
[[notify]]
kind = "email"
smtp_host = "smtp.example.org"
from = "node@example.org"
to = ["a@example.org"]
events = ["disk_high"]
"""))
    hook_target, mail_target = config.notify
    assert (hook_target.kind, hook_target.events, hook_target.retries, hook_target.include_phi) == \
        ("webhook", ("job_failed", "delivery_failed"), 3, False)
    assert (mail_target.smtp_port, mail_target.starttls, mail_target.to) == (587, True, ("a@example.org",))
    assert "hush-hush-42" not in repr(hook_target)  # the secret stays out of reprs (and so logs)


@pytest.mark.parametrize("table, problem", [
    ('kind = "webhook"\nurl = "https://x.org"\nevents = ["job_faild"]', "notify[0].events: unknown event 'job_faild'"),
    ('kind = "webhook"\nurl = "ftp://x.org"\nevents = ["job_failed"]', "notify[0].url: must be an http://"),
    ('kind = "webhook"\nurl = "https://x.org"\nevents = []', "notify[0].events: must list at least one"),
    ('kind = "email"\nsmtp_host = "h"\nfrom = "a@b"\nto = ["nobody"]\nevents = ["disk_high"]',
     "notify[0].to: not an e-mail address"),
    ('kind = "pager"\nevents = ["disk_high"]', "notify[0].kind: must be 'webhook' or 'email'"),
])
def test_config_refuses_mistakes(tmp_path, table, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.").replace("/", "/")):
        load_config(write(tmp_path, "[[notify]]\n" + table + "\n"))


# -- units ----------------------------------------------------------------------------

def test_only_wanted_events_are_queued_and_the_queue_drops_the_oldest(caplog):
    notifier = Notifier([hook("http://127.0.0.1:1/", events=["job_failed"])], max_pending=2)  # not started
    notifier.emit("disk_high", reason="full")
    assert notifier.pending() == 0
    with caplog.at_level(logging.WARNING):
        for job_id in (1, 2, 3):
            notifier.emit("job_failed", job_id=job_id)
    assert notifier.pending() == 2 and notifier.dropped == 1
    assert [fields["job_id"] for _, fields, _ in notifier._pending] == [2, 3]
    assert "dropped the oldest, job_failed" in caplog.text


def test_repeated_refusals_are_sent_once():
    notifier = Notifier([hook("http://127.0.0.1:1/", events=["association_refused"])])
    for _ in range(5):
        notifier.emit("association_refused", calling_ae="ROGUE", address="10.0.0.9")
    notifier.emit("association_refused", calling_ae="OTHER", address="10.0.0.8")
    assert notifier.pending() == 2


def test_no_patient_data_unless_configured():
    fields = {"job_id": 7, "patient_name": "DOE^JANE", "patient_id": "P1", "study_instance_uid": STUDY}
    plain = message.payload("job_failed", "AI_NODE", "now", fields, include_phi=False)
    assert plain["details"] == {"job_id": 7, "study_instance_uid": STUDY}
    assert b"DOE" not in message.body(plain) and "P1" not in message.text(plain)
    with_phi = message.payload("job_failed", "AI_NODE", "now", {"job_id": 7}, include_phi=True,
                               patient={"patient_name": "DOE^JANE"})
    assert with_phi["details"]["patient_name"] == "DOE^JANE"


def test_signature_is_hmac_sha256_of_the_body():
    body = b'{"event": "job_failed"}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert webhook.signature(SECRET, body) == "sha256=" + expected


# -- real receivers ---------------------------------------------------------------------

def verify(headers: dict, body: bytes) -> dict:
    """What a receiver does: check the signature over the raw body, then read it."""
    sent = headers[webhook.SIGNATURE_HEADER]
    assert hmac.compare_digest(sent, webhook.signature(SECRET, body))
    return json.loads(body)


def test_a_delivery_that_fails_for_good_reaches_the_webhook_and_the_mailbox(web, receiver, mailbox,  # noqa: F811
                                                                           notifier_of, caplog):
    notifier = notifier_of(hook(receiver.url), mail(mailbox.port),
                           patient_of=lambda uid: {"patient_name": "DOE^JANE"})
    web.outbox.notify = notifier.emit
    set_destination(web, free_port(), max_attempts=1)  # nothing listens there
    delivery_id, _ = queue_result(web)
    assert web.outbox.process_due() >= 1
    assert delivery(web, delivery_id).state == "failed"

    wait_for(lambda: receiver.requests and mailbox.messages, timeout=15, what="webhook and e-mail")
    headers, body = receiver.requests[0]
    sent = verify(headers, body)
    assert sent["event"] == "delivery_failed" and sent["node"] == "AI_NODE"
    assert sent["details"]["destination"] == "pacs" and delivery_id in sent["details"]["delivery_ids"]
    assert sent["details"]["error"]
    recipients, mail_message = mailbox.messages[0]
    assert recipients == ["ops@example.org"]
    assert "results not delivered" in mail_message["Subject"]
    text = mail_message.get_payload()
    assert "destination: pacs" in text and f"{delivery_id}" in text
    for raw in (body.decode(), text):
        assert "DOE" not in raw and "EVIL" not in raw and "<script>" not in raw  # no patient data
    assert "token=abc" not in caplog.text and SECRET not in caplog.text


def test_a_webhook_that_is_down_is_retried_a_bounded_number_of_times(notifier_of, mailbox, caplog):
    failing = Receiver(status=503)
    try:
        notifier = notifier_of(hook(failing.url, events=["job_failed"], retries=2),
                               mail(mailbox.port, events=["job_failed"]))
        with caplog.at_level(logging.WARNING):
            notifier.emit("job_failed", job_id=1, model="lung_ct_seg", reason="boom")
            wait_for(lambda: "given up after 3 attempts" in caplog.text, timeout=15, what="give-up log line")
            assert len(failing.requests) == 3  # the first try and 2 retries, then no more
            assert "ops-hook" in caplog.text and "token=abc" not in caplog.text
            # the sender goes on: the e-mail of that event and the next event still go out
            notifier.emit("job_failed", job_id=2, model="lung_ct_seg", reason="boom again")
            wait_for(lambda: len(mailbox.messages) == 2, timeout=15, what="both e-mails")
        assert len(failing.requests) == 6
    finally:
        failing.close()


def test_a_receiver_that_is_not_there_makes_the_sender_give_up(notifier_of, caplog):
    notifier = notifier_of(hook(f"http://127.0.0.1:{free_port()}/", events=["disk_high"], retries=1))
    with caplog.at_level(logging.WARNING):
        notifier.emit("disk_high", reason="disk full", calling_ae="CT1")  # returns at once
        wait_for(lambda: "given up after 2 attempts" in caplog.text, timeout=15, what="give-up log line")
    assert notifier.pending() == 0


def test_a_held_result_and_a_failed_job_reach_the_webhook(tmp_path, receiver, notifier_of):
    from dicom_ai_node.db.models import Job
    from tests.synthetic import make_ct_series
    from tests.test_quality_gate import CROPPED, Gate

    gate = Gate(tmp_path)
    try:
        notifier = notifier_of(hook(receiver.url, events=["result_held", "job_failed"]))
        gate.runner.notify = notifier.emit
        series = make_ct_series(tmp_path / "cropped", **CROPPED)
        held = gate.run(series)  # lungs far too small: held by the quality gate
        failing = gate.job_for(make_ct_series(tmp_path / "other", **{**CROPPED, "seed": "other"}))
        with gate.database.session() as session:
            session.get(Job, failing).model_name = "not_installed"
        gate.runner.run(failing)
        wait_for(lambda: len(receiver.requests) == 2, timeout=15, what="two webhooks")
        first, second = (verify(*request) for request in receiver.requests)
        assert (first["event"], first["details"]["job_id"], first["details"]["model"]) == \
            ("result_held", held, "lung_ct_seg")
        assert first["details"]["reason"].startswith("held for review: lung volume")
        assert first["details"]["study_instance_uid"] == series.study_instance_uid
        assert (second["event"], second["details"]["job_id"]) == ("job_failed", failing)
        assert "not installed" in second["details"]["reason"]
        assert all(b"PHANTOM" not in body.upper() for _, body in receiver.requests)  # synthetic patient name
    finally:
        gate.database.dispose()


def test_the_node_wires_its_notifier_into_receiver_runner_and_outbox(tmp_path, receiver):
    from dicom_ai_node.node import Node

    config = load_config(write(tmp_path, f"""
[web]
enabled = false
[[notify]]
kind = "webhook"
url = "{receiver.url}"
events = ["association_refused"]
"""))
    node = Node(config)
    try:
        emit = node.notifier.emit
        assert node.scp.notify == emit and node.runner.notify == emit and node.outbox.notify == emit
        assert node.notifier.targets == config.notify
    finally:
        node.database.dispose()
