"""When is a study complete? After a quiet period with no new instance, or soon after the
association that sent it is released.

DICOM has no "end of study" message, so every node guesses. Two signals are used:
- quiet period: no instance of the study arrived for ``quiet_period_s`` (a routing rule may
  ask for a longer one, see ``Router.quiet_enough``);
- association release: a sender that pushes a whole study in one association releases it
  when done; the receiver records ``Study.released_at`` and the study completes
  ``release_grace_s`` later unless another instance arrived after the release.

A routing rule's ``quiet_period_s`` holds with either signal: a rule that waits 10 minutes
for a slow MR protocol (one association per sequence) is not cut short by the first release.

Both facts live in the database, and one APScheduler interval job checks them. So it does
not matter which process received the instances (several receiver processes share the
port), and after a restart nothing needs re-arming: studies still "receiving" are simply
checked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Study, as_utc

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.25


class CompletionWatcher:
    def __init__(self, database: Database, quiet_period_s: float, release_grace_s: float | None,
                 quiet_enough: Callable[[str, float], bool], on_complete: Callable[[str], object]):
        """``quiet_enough(study_uid, quiet_seconds)`` says whether the rules matching the
        study accept that much quiet (a rule may want more); ``on_complete(study_uid)`` routes
        the study.
        ``release_grace_s`` None: association releases are not used as a signal."""
        self.database = database
        self.quiet_period_s = quiet_period_s
        self.release_grace_s = release_grace_s
        self.quiet_enough = quiet_enough
        self.on_complete = on_complete

    def check(self, now: datetime | None = None) -> list[str]:
        """Complete every study whose signal says so; returns their UIDs. Run periodically."""
        now = now or datetime.now(timezone.utc)
        with self.database.session() as session:
            receiving = session.execute(select(Study.study_instance_uid, Study.last_received_at,
                                               Study.released_at)
                                        .where(Study.state == "receiving")).all()
        completed = []
        for study_uid, last_received, released in receiving:
            try:
                if self._is_complete(study_uid, now, as_utc(last_received), as_utc(released)):
                    self.on_complete(study_uid)
                    completed.append(study_uid)
            except Exception:  # one study's failure must not block the others
                log.exception("completion check failed for a study; it is checked again shortly")
        return completed

    def _is_complete(self, study_uid: str, now: datetime, last_received: datetime,
                     released: datetime | None) -> bool:
        quiet_s = (now - last_received).total_seconds()
        if (self.release_grace_s is not None and released is not None and released >= last_received
                and now - released >= timedelta(seconds=self.release_grace_s)):
            # the sending association ended and nothing arrived since: the node's own quiet
            # period is not needed, a rule's still is
            return self.quiet_enough(study_uid, quiet_s)
        return quiet_s >= self.quiet_period_s and self.quiet_enough(study_uid, quiet_s)
