"""When is a study complete? After a quiet period with no new instance, or soon after the
association that sent it is released.

DICOM has no "end of study" message, so every node guesses. Two signals are used:
- quiet period: no instance of the study arrived for ``quiet_period_s`` (a routing rule may
  ask for a longer one, see ``Router.quiet_period_for``);
- association release: a sender that pushes a whole study in one association releases it
  when done; the study completes ``release_grace_s`` later unless more instances arrive.

Timers are APScheduler jobs in memory; the facts they check (last_received_at, state) are in
the database, so after a restart ``resume`` re-arms a timer for every study still receiving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Study

log = logging.getLogger(__name__)


class CompletionTimers:
    def __init__(self, scheduler: BackgroundScheduler, database: Database, quiet_period_s: float,
                 release_grace_s: float, on_quiet: Callable[[str, float], bool],
                 on_complete: Callable[[str], None]):
        """``on_quiet(study_uid, quiet_seconds)`` says whether that much quiet is enough
        (rules may want more); ``on_complete(study_uid)`` routes the study."""
        self.scheduler = scheduler
        self.database = database
        self.quiet_period_s = quiet_period_s
        self.release_grace_s = release_grace_s
        self.on_quiet = on_quiet
        self.on_complete = on_complete
        self._armed: set[str] = set()
        self._lock = threading.Lock()

    def instance_stored(self, study_uid: str, is_new: bool) -> None:
        if is_new:
            self._arm(study_uid, self.quiet_period_s)

    def association_released(self, study_uids: set[str]) -> None:
        released_at = datetime.now(timezone.utc)
        for study_uid in study_uids:
            self.scheduler.add_job(self._check_after_release, "date",
                                   run_date=released_at + timedelta(seconds=self.release_grace_s),
                                   args=[study_uid, released_at], misfire_grace_time=None)

    def resume(self) -> None:
        """Re-arm timers for studies that were still receiving when the node stopped."""
        with self.database.session() as session:
            receiving = list(session.scalars(select(Study.study_instance_uid)
                                             .where(Study.state == "receiving")))
        for study_uid in receiving:
            self._arm(study_uid, 0.0)
        if receiving:
            log.info("re-armed completion timers for %d studies", len(receiving))

    def _arm(self, study_uid: str, delay_s: float) -> None:
        with self._lock:
            if study_uid in self._armed:
                return  # the timer re-checks the last arrival when it fires
            self._armed.add(study_uid)
        self.scheduler.add_job(self._check_quiet, "date", args=[study_uid],
                               run_date=datetime.now(timezone.utc) + timedelta(seconds=delay_s),
                               misfire_grace_time=None)

    def _check_quiet(self, study_uid: str) -> None:
        with self._lock:
            self._armed.discard(study_uid)
        try:
            with self.database.session() as session:
                study = session.get(Study, study_uid)
                if study is None or study.state != "receiving":
                    return
                quiet_s = (datetime.now(timezone.utc) - _aware(study.last_received_at)).total_seconds()
            if quiet_s < self.quiet_period_s or not self.on_quiet(study_uid, quiet_s):
                self._arm(study_uid, max(0.2, self.quiet_period_s - quiet_s) if quiet_s < self.quiet_period_s else 1.0)
                return
            self.on_complete(study_uid)
        except Exception:
            log.exception("completion check failed for a study; retrying in 5 s")
            self._arm(study_uid, 5.0)

    def _check_after_release(self, study_uid: str, released_at: datetime) -> None:
        try:
            with self.database.session() as session:
                study = session.get(Study, study_uid)
                if study is None or study.state != "receiving":
                    return
                if _aware(study.last_received_at) > released_at:
                    return  # more arrived after the release (another association); wait for quiet
            self.on_complete(study_uid)
        except Exception:
            log.exception("completion after release failed for a study; falling back to quiet period")
            self._arm(study_uid, self.quiet_period_s)


def _aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; the node stores UTC everywhere."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
