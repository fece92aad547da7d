"""The notifier: ``emit`` never blocks its caller. It keeps the event only when a target wants
it, in a bounded queue (the oldest dropped, with a log line, when full); one sender thread,
started and stopped with the node, sends each event to the targets that asked for it.

Repeating events (a full disk refuses every instance; a misconfigured scanner retries) are
sent at most once per REPEAT_S for the same event and caller."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from dicom_ai_node.config import NOTIFY_EVENTS, NotifyConfig
from dicom_ai_node.db.models import utcnow
from dicom_ai_node.notify import mail, message, webhook

log = logging.getLogger(__name__)

MAX_PENDING = 100  # events waiting for the sender thread
REPEAT_S = {"disk_high": 600.0, "association_refused": 600.0}
STOP_WAIT_S = 10.0  # the longest stop() waits for a send in progress


def patients_in(database) -> Callable[[str], dict]:
    """The ``patient_of`` lookup for include_phi targets: a study UID's patient name and ID."""
    from dicom_ai_node.db.models import Study

    def patient_of(study_uid: str) -> dict:
        with database.session() as session:
            study = session.get(Study, study_uid)
            return {"patient_name": study.patient_name, "patient_id": study.patient_id} if study else {}

    return patient_of


def ignore(event: str, **fields) -> None:
    """The emit of a part that runs without a notifier (tests, worker processes)."""


class Notifier:
    def __init__(self, targets: Sequence[NotifyConfig], node: str = "AI_NODE",
                 max_pending: int = MAX_PENDING,
                 patient_of: Callable[[str], dict] | None = None):
        self.targets = tuple(targets)
        self.node = node
        self.max_pending = max_pending
        # study UID -> {"patient_name": ..., "patient_id": ...}, only for include_phi targets
        self.patient_of = patient_of
        self.dropped = 0
        self._pending: deque[tuple[str, dict, str]] = deque()
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[tuple, float] = {}  # (event, caller) -> monotonic time of the last one queued

    def wants(self, event: str) -> bool:
        return any(event in target.events for target in self.targets)

    def emit(self, event: str, **fields) -> None:
        """Queue ``event`` for the targets that want it; returns at once, never raises."""
        if event not in NOTIFY_EVENTS:
            log.error("unknown notification event %r ignored", event)
            return
        if not self.wants(event) or self._repeated(event, fields):
            return
        with self._ready:
            if len(self._pending) >= self.max_pending:
                old_event, _, old_at = self._pending.popleft()
                self.dropped += 1
                log.warning("notification queue full (%d): dropped the oldest, %s of %s",
                            self.max_pending, old_event, old_at)
            self._pending.append((event, fields, utcnow().isoformat(timespec="seconds")))
            self._ready.notify()

    def _repeated(self, event: str, fields: dict) -> bool:
        if event not in REPEAT_S:
            return False
        key, now = (event, fields.get("calling_ae")), time.monotonic()
        with self._ready:
            last = self._last.get(key)
            if last is not None and now - last < REPEAT_S[event]:
                return True
            if len(self._last) > 1000:
                self._last.clear()  # bounded
            self._last[key] = now
        return False

    def pending(self) -> int:
        with self._ready:
            return len(self._pending)

    def start(self) -> None:
        if self.targets and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the sender (a retry wait ends at once); events still queued are dropped."""
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            self._thread = None
        left = self.pending()
        if left:
            log.warning("%d notifications not sent: the node stopped", left)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._stop.is_set():
                    self._ready.wait()
                if self._stop.is_set():
                    return
                event, fields, at = self._pending.popleft()
            for target in self.targets:
                if event in target.events and not self._stop.is_set():
                    self.send(target, event, fields, at)

    def send(self, target: NotifyConfig, event: str, fields: dict, at: str) -> bool:
        """Send one event to one target now (the sender thread's work); True when it went."""
        try:
            patient = None
            if target.include_phi and self.patient_of and fields.get("study_instance_uid"):
                patient = self.patient_of(fields["study_instance_uid"])
            text = message.payload(event, self.node, at, fields, target.include_phi, patient)
            if target.kind == "webhook":
                return webhook.post(target, message.body(text), self._stop)
            mail.send(target, message.subject(text), message.text(text))
            return True
        except Exception as error:  # noqa: BLE001 - a notification must never take the node down
            log.error("notification %s to %s failed: %s: %s", event, target.name, type(error).__name__, error)
            return False
