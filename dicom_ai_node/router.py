"""From a complete study to jobs: evaluate the active rule set, store every decision with
its reasons, and create one job per (series, model) for the exact set of input instances.

Idempotent by construction: a job is unique on (series, model, fingerprint of its SOP
Instance UIDs), so a study evaluated twice with the same instances gets no second job.
When more instances arrived, an older job on that series and model that has no results yet
is marked superseded (a running one drops its results) and a new one is created; so is a
held one (its results failed their quality checks and were never sent: nobody needs to review
results of an outdated series). An older job already delivering finishes, and the new job's
results follow as a newer version.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import tomllib
from collections.abc import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (Instance, Job, JobState, RoutingDecision, RuleSetVersion,
                                     Series, Study, utcnow)
from dicom_ai_node.priors.fetcher import add_fetch, is_fetched_prior
from dicom_ai_node.routing import RuleSet, Run, SeriesFacts, evaluate, parse_rules, plan, rules_to_toml

log = logging.getLogger(__name__)

# jobs a newer job on the same series replaces: nothing of theirs was sent (or ever will be)
SUPERSEDABLE = (JobState.queued, JobState.running, JobState.encoding, JobState.held)


def input_fingerprint(sop_uids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


class RuleStore:
    """The versioned rule set in the database; the newest version is the active one."""

    def __init__(self, database: Database):
        self.database = database
        self._cached: tuple[int, RuleSet] | None = None
        self._lock = threading.Lock()

    def seed_from_config(self, raw_rules: list) -> int:
        """Store the config file's rules as a new version when they differ from the last
        version that came from the config (admins' edits in between are kept as history)."""
        text = rules_to_toml(parse_rules({"rules": raw_rules}, source="config.toml [[rules]]"))
        with self.database.session() as session:
            last_from_config = session.scalars(
                select(RuleSetVersion).where(RuleSetVersion.author == "config")
                .order_by(RuleSetVersion.version.desc()).limit(1)).first()
            if last_from_config is not None and last_from_config.text == text:
                return self.active_version(session)
            return self.save(session, text, author="config", comment="rules from config.toml")

    def save(self, session: Session, text: str, author: str, comment: str | None = None) -> int:
        parse_rules(tomllib.loads(text), source="rule set")  # never store an invalid version
        version = (session.scalar(select(func.max(RuleSetVersion.version))) or 0) + 1
        session.add(RuleSetVersion(version=version, text=text, author=author, comment=comment))
        audit.record(session, author, "rules.save", f"rule set version {version}", comment=comment)
        session.flush()
        return version

    def active_version(self, session: Session) -> int:
        return session.scalar(select(func.max(RuleSetVersion.version))) or 0

    def active(self, session: Session) -> tuple[int, RuleSet]:
        """The newest rule set, parsed once per version (edits apply without a restart)."""
        version = self.active_version(session)
        with self._lock:
            if self._cached is None or self._cached[0] != version:
                text = session.get(RuleSetVersion, version).text if version else ""
                self._cached = (version, parse_rules(tomllib.loads(text) if text else {"rules": []},
                                                     source=f"rule set version {version}"))
            return self._cached


def series_facts(session: Session, study_uid: str) -> list[SeriesFacts]:
    rows = session.execute(
        select(Series, func.count(Instance.sop_instance_uid), func.sum(Instance.number_of_frames))
        .join(Instance, Instance.series_instance_uid == Series.series_instance_uid)
        .where(Series.study_instance_uid == study_uid, Series.is_result.is_(False))
        .group_by(Series.series_instance_uid)).all()
    facts = []
    for series, count, frames in rows:
        # one multi-frame instance counts as its frames, so slice-count selectors work on it
        facts.append(SeriesFacts(series.series_instance_uid, dict(series.attributes),
                                 int(frames) if count == 1 else int(count)))
    return facts


class Router:
    def __init__(self, database: Database, rules: RuleStore, submit: Callable[[int], None],
                 fetch_priors: Callable[[int], None] | None = None):
        self.database = database
        self.rules = rules
        self.submit = submit
        # a job whose rule asks for priors goes to the prior fetcher, which queues it when done
        self.fetch_priors = fetch_priors or submit
        self._lock = threading.Lock()  # one routing at a time: completions may race

    def quiet_enough(self, study_uid: str, quiet_s: float) -> bool:
        """Whether the rules that match the study accept ``quiet_s`` seconds without a new
        instance: a rule may ask for a longer wait (``quiet_period_s``, e.g. slow MR
        sequences); the longest one asked for holds. True when no matching rule asks (the
        node's own quiet period or the association release decides, see completion.py)."""
        with self.database.session() as session:
            _version, rule_set = self.rules.active(session)
            decisions = evaluate(rule_set, series_facts(session, study_uid))
        wanted = [d.quiet_period_s for d in decisions if d.matched and d.quiet_period_s is not None]
        return not wanted or quiet_s >= max(wanted)

    def route(self, study_uid: str) -> list[int]:
        """Evaluate the rules for a complete study; returns the ids of new jobs."""
        with self._lock, self.database.session() as session:
            claimed = session.execute(update(Study).where(Study.study_instance_uid == study_uid,
                                                          Study.state == "receiving")
                                      .values(state="complete", completed_at=utcnow()))
            if claimed.rowcount == 0:
                return []  # another timer completed it already
            if is_fetched_prior(session, study_uid):
                log.info("study complete: fetched as a prior for another study; not routed")
                return []
            version, rule_set = self.rules.active(session)
            facts = series_facts(session, study_uid)
            decisions = evaluate(rule_set, facts)
            evaluation = (session.scalar(select(func.max(RoutingDecision.evaluation))
                                         .where(RoutingDecision.study_instance_uid == study_uid)) or 0) + 1
            for decision in decisions:
                session.add(RoutingDecision(study_instance_uid=study_uid, evaluation=evaluation,
                                            rule_set_version=version, rule_name=decision.rule_name,
                                            matched=decision.matched, detail=decision.to_json()))
            new_jobs = [(job, run) for run in plan(decisions)
                        if (job := self._job_for(session, study_uid, run)) is not None]
            session.flush()
            job_ids = [job.id for job, _run in new_jobs]
            with_priors = set()
            for job, run in new_jobs:
                if run.priors is not None:  # the job waits for its fetch (jobs/runner.py claim)
                    add_fetch(session, job, run.priors, run.source)
                    with_priors.add(job.id)
        matched = [d.rule_name for d in decisions if d.matched]
        log.info("study complete: %d series, rules matched %s, %d new jobs",
                 len(facts), matched or "none", len(job_ids))
        for job_id in job_ids:
            (self.fetch_priors if job_id in with_priors else self.submit)(job_id)
        return job_ids

    def _job_for(self, session: Session, study_uid: str, run: Run) -> Job | None:
        sop_uids = list(session.scalars(select(Instance.sop_instance_uid)
                                        .where(Instance.series_instance_uid == run.series_uid)))
        fingerprint = input_fingerprint(sop_uids)
        existing = session.scalars(select(Job).where(Job.series_instance_uid == run.series_uid,
                                                     Job.model_name == run.model)).all()
        if any(job.input_fingerprint == fingerprint for job in existing):
            return None  # same instances, same model: already done or in progress
        # only jobs with nothing sent; a delivering job finishes sending what it made. The state
        # is checked in the UPDATE itself, so an admin releasing a held job meanwhile wins.
        session.execute(update(Job).where(Job.id.in_([job.id for job in existing]),
                                          Job.state.in_(SUPERSEDABLE))
                        .values(state=JobState.superseded, finished_at=utcnow(),
                                reason=f"more instances arrived ({len(sop_uids)} now); replaced by a newer job"))
        job = Job(study_instance_uid=study_uid, series_instance_uid=run.series_uid, model_name=run.model,
                  rule_name=run.rule_name, destinations=list(run.destinations), qc_policy=run.qc_fail,
                  no_result_notice=run.no_result_notice,
                  input_fingerprint=fingerprint, input_count=len(sop_uids), state=JobState.queued)
        session.add(job)
        return job
