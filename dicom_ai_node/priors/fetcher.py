"""Fetching a job's prior: query the rule's source, retrieve the chosen series to the node,
wait until it is indexed, record every step, then queue the job.

The source's kind picks the protocol: ``dimse`` C-FINDs (study, then series) and C-MOVEs to the
node's own AE, the instances arriving through the receiver (dimse.py); ``dicomweb`` searches by
QIDO-RS and retrieves by WADO-RS, storing each instance through the node's StorageSCP as the
answer streams (dicomweb.py). A paused source is not queried.

A fetch runs in this module's own small thread pool with a deadline per phase, never in a job
worker; the job is not claimed while its fetch is unfinished (jobs/runner.py), so a restart,
a duplicate submit or a Celery sweep cannot run it early. Claiming a fetch is a conditional
UPDATE: a pending one, or one whose claimer's lease (the longest all its phases may take)
passed, i.e. its process stopped or died; the leader's ``resume`` duty looks for those every
RESUME_INTERVAL_S (at most MAX_ATTEMPTS). Logs carry ids and counts only, never patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from dicom_ai_node.config import DestinationConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import PRIOR_FETCH_FINISHED, Instance, Job, PriorFetch, Series, Study, utcnow
from dicom_ai_node.priors import dicomweb, dimse
from dicom_ai_node.priors.choose import (MAX_STUDIES_TRIED, Current, NoPrior, candidate_studies, check_current,
                                         choose_series, date_range)
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.routing import PriorSpec

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RESUME_INTERVAL_S = 30.0


@dataclass(frozen=True)
class Deadlines:
    query_s: float = 30.0  # each C-FIND or QIDO-RS search
    retrieve_s: float = 600.0  # the C-MOVE or WADO-RS of one series
    index_s: float = 60.0  # until the moved instances are indexed (WADO-RS: indexed as they come)

    @property
    def lease_s(self) -> float:
        """The longest one fetch may take: after this its claimer is taken for dead."""
        return self.query_s * (MAX_STUDIES_TRIED + 1) + self.retrieve_s + self.index_s + 60.0


def add_fetch(session: Session, job: Job, spec: PriorSpec, source: str) -> PriorFetch:
    """The fetch row of a new job (in the router's transaction)."""
    fetch = PriorFetch(job_id=job.id, study_instance_uid=job.study_instance_uid, source=source,
                       criteria=spec.to_data(), state="pending", steps=[], attempts=0)
    session.add(fetch)
    return fetch


def is_fetched_prior(session: Session, study_uid: str) -> bool:
    """Whether the study came in as some job's prior: it gets no results of its own. A study that
    was on the node before the fetch began (sent by a scanner, say) was not fetched: it is routed."""
    return bool(session.scalar(select(exists().where(
        PriorFetch.prior_study_instance_uid == study_uid, Study.study_instance_uid == study_uid,
        PriorFetch.created_at <= Study.first_received_at))))


def fetches_json(session: Session, study_uid: str) -> list[dict]:
    """Fetches for this study's jobs, and those that fetched this study as a prior."""
    rows = session.scalars(select(PriorFetch).where(
        (PriorFetch.study_instance_uid == study_uid) | (PriorFetch.prior_study_instance_uid == study_uid))
        .order_by(PriorFetch.id).limit(100)).all()
    return [{"id": f.id, "job_id": f.job_id, "study_instance_uid": f.study_instance_uid, "source": f.source,
             "state": f.state, "criteria": f.criteria, "prior_study_instance_uid": f.prior_study_instance_uid,
             "prior_series_instance_uid": f.prior_series_instance_uid, "prior_study_date": f.prior_study_date,
             "expected_instances": f.expected_instances, "received_instances": f.received_instances,
             "steps": f.steps, "reason": f.reason, "attempts": f.attempts, "created_at": f.created_at,
             "finished_at": f.finished_at, "is_prior_here": f.prior_study_instance_uid == study_uid,
             "summary": summary(f)}
            for f in rows]


def summary(fetch: PriorFetch) -> str:
    """One line for the job: what it was compared with, or why not (as its SR says)."""
    if fetch.state == "done":
        return f"compared with prior study {fetch.prior_study_instance_uid} ({fetch.prior_study_date or 'date unknown'})"
    if fetch.state in PRIOR_FETCH_FINISHED:
        return f"ran without prior: {fetch.reason or fetch.state}"
    return f"waiting for its prior from {fetch.source} ({fetch.state})"


class _Dimse:
    """A ``dimse`` source: C-FIND, then C-MOVE to the node's own AE (the instances arrive later,
    through the receiver)."""

    steps = ("C-FIND STUDY", "C-FIND SERIES", "C-MOVE")
    arrives_later = True

    def __init__(self, source: DestinationConfig, node_ae: str):
        self.source, self.node_ae = source, node_ae

    def studies(self, patient_id: str, dates: str, modality: str | None, deadline: float):
        return dimse.find(self.source, self.node_ae, dimse.study_query(patient_id, dates, modality), deadline)

    def series(self, study_uid: str, deadline: float):
        return dimse.find(self.source, self.node_ae, dimse.series_query(study_uid), deadline)

    def retrieve(self, study_uid: str, series_uid: str, deadline: float) -> tuple[int, int, str]:
        """(instances sent, failed, the step's outcome)"""
        outcome = dimse.move(self.source, self.node_ae, dimse.series_move(study_uid, series_uid), self.node_ae,
                             deadline)
        return outcome.completed, outcome.failed, (f"{outcome.completed} sent, {outcome.failed} failed, "
                                                   f"{outcome.warning} warnings (status 0x{outcome.status:04X})")


class _Dicomweb:
    """A ``dicomweb`` source: QIDO-RS, then WADO-RS stored by this process as it streams."""

    steps = ("QIDO-RS STUDIES", "QIDO-RS SERIES", "WADO-RS")
    arrives_later = False

    def __init__(self, source: DestinationConfig, receiver: StorageSCP):
        self.source, self.receiver = source, receiver

    def studies(self, patient_id: str, dates: str, modality: str | None, deadline: float):
        return dicomweb.find(self.source, dicomweb.study_query(patient_id, dates, modality), deadline)

    def series(self, study_uid: str, deadline: float):
        return dicomweb.find(self.source, dicomweb.series_query(study_uid), deadline)

    def retrieve(self, study_uid: str, series_uid: str, deadline: float) -> tuple[int, int, str]:
        started = time.monotonic()
        got = dicomweb.retrieve(self.source, study_uid, series_uid, self.receiver, deadline)
        text = (f"{got.stored} stored, {got.failed} refused ({got.size_bytes / 2**20:.1f} MiB in "
                f"{time.monotonic() - started:.1f} s)")
        return got.stored, got.failed, text + (f"; first refused: {got.first_failure}" if got.first_failure else "")


class PriorFetcher:
    def __init__(self, database: Database, lookup: Callable[[str], DestinationConfig], node_ae: str,
                 submit_job: Callable[[int], None], deadlines: Deadlines = Deadlines(), threads: int = 2, *,
                 receiver: StorageSCP | None = None, is_paused: Callable[[str], bool] = lambda _name: False):
        self.database = database
        self.lookup = lookup  # destination name -> DestinationConfig
        self.node_ae = node_ae  # the C-MOVE destination: the node's own SCP
        self.submit_job = submit_job
        self.deadlines = deadlines
        self.receiver = receiver  # stores what a WADO-RS retrieve brings (its index writer open)
        self.is_paused = is_paused  # destination name -> paused by an admin
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prior-fetch")

    def submit(self, job_id: int) -> None:
        self._pool.submit(self._run_logged, job_id)

    def resume(self) -> list[int]:
        """Fetches nobody runs (never started, or their claimer's lease passed) run again."""
        with self.database.session() as session:
            job_ids = list(session.scalars(select(PriorFetch.job_id).where(self._claimable())
                                           .order_by(PriorFetch.id).limit(100)))
        for job_id in job_ids:
            self.submit(job_id)
        return job_ids

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_logged(self, job_id: int) -> None:
        try:
            self.run(job_id)
        except Exception:
            log.exception("prior fetch for job %d failed unexpectedly", job_id)
            self._finish(job_id, "failed", "internal error while fetching the prior (see the node log)")
            self.submit_job(job_id)

    def run(self, job_id: int) -> str | None:
        """Fetch the prior of a job, then queue the job; returns the fetch's final state (None:
        not this thread's to run)."""
        fetch = self._claim(job_id)
        if fetch is None:
            return None
        state, reason = self._fetch(fetch)
        self._finish(job_id, state, reason)
        log.info("job %d: prior fetch %d %s%s", job_id, fetch.id, state, f": {reason}" if reason else "")
        self.submit_job(job_id)
        return state

    def _claimable(self):
        stale = utcnow() - timedelta(seconds=self.deadlines.lease_s)
        return (PriorFetch.state == "pending") | (
            PriorFetch.state.not_in(PRIOR_FETCH_FINISHED) & (PriorFetch.started_at < stale))

    def _claim(self, job_id: int) -> PriorFetch | None:
        with self.database.session() as session:
            claimed = session.execute(
                update(PriorFetch).where(PriorFetch.job_id == job_id, self._claimable(),
                                         PriorFetch.attempts < MAX_ATTEMPTS)
                .values(state="querying", attempts=PriorFetch.attempts + 1, started_at=utcnow())
                .execution_options(synchronize_session=False))
            if claimed.rowcount != 1:
                given_up = session.execute(
                    update(PriorFetch).where(PriorFetch.job_id == job_id, self._claimable(),
                                             PriorFetch.attempts >= MAX_ATTEMPTS)
                    .values(state="failed", finished_at=utcnow(),
                            reason=f"gave up after {MAX_ATTEMPTS} interrupted attempts")
                    .execution_options(synchronize_session=False))
                if given_up.rowcount:
                    self.submit_job(job_id)
                return None
            fetch = session.scalar(select(PriorFetch).where(PriorFetch.job_id == job_id))
            session.expunge(fetch)
            return fetch

    def _fetch(self, fetch: PriorFetch) -> tuple[str, str | None]:
        spec = PriorSpec(**fetch.criteria)
        try:
            current = self._current(fetch.job_id)
            check_current(current)
            destination = self.lookup(fetch.source)
        except NoPrior as error:
            return "not_found", str(error)
        except KeyError:
            return "failed", f"source {fetch.source!r} is not a configured destination"
        if self.is_paused(fetch.source):
            return "failed", f"source {fetch.source!r} is paused (resume it to fetch priors from it)"
        try:
            return self._query_and_retrieve(fetch, spec, current, self._source(destination))
        except dimse.QueryError as error:
            self._step(fetch.id, "error", str(error), ok=False)
            return "failed", f"{fetch.source}: {error}"

    def _source(self, destination: DestinationConfig) -> _Dimse | _Dicomweb:
        if destination.kind == "dimse":
            return _Dimse(destination, self.node_ae)
        if destination.kind == "dicomweb" and self.receiver is not None:
            return _Dicomweb(destination, self.receiver)
        raise dimse.QueryError(f"a destination of kind {destination.kind!r} cannot be queried for priors "
                               "by this process")

    def _query_and_retrieve(self, fetch, spec, current, source: _Dimse | _Dicomweb) -> tuple[str, str | None]:
        study_step, series_step, _ = source.steps
        answers = source.studies(current.patient_id, date_range(current, spec),
                                 current.modality if spec.same_modality else None,
                                 time.monotonic() + self.deadlines.query_s)
        studies = candidate_studies(current, spec, answers)
        self._step(fetch.id, study_step, f"{len(answers)} studies answered, {len(studies)} earlier "
                                         f"within {spec.within_days} days")
        for study in studies[:MAX_STUDIES_TRIED]:
            series_answers = source.series(study.study_instance_uid, time.monotonic() + self.deadlines.query_s)
            chosen = choose_series(current, spec, series_answers)
            self._step(fetch.id, series_step, f"study {study.study_instance_uid} ({study.study_date}): "
                                              f"{len(series_answers)} series, "
                                              f"{'chose ' + chosen.series_instance_uid if chosen else 'none fits'}")
            if chosen is not None:
                return self._retrieve(fetch, source, study, chosen)
        wanted = ", ".join(f"{k} {v}" for k, v in spec.to_data().items() if k != "max")
        return "not_found", f"no prior in {fetch.source} ({wanted})"

    def _retrieve(self, fetch, source, study, series) -> tuple[str, str | None]:
        # recorded before the retrieve: the instances that arrive are known as a prior, never routed
        with self.database.session() as session:
            session.execute(update(PriorFetch).where(PriorFetch.id == fetch.id).values(
                state="retrieving", prior_study_instance_uid=study.study_instance_uid,
                prior_series_instance_uid=series.series_instance_uid, prior_study_date=study.study_date,
                expected_instances=series.instances))
        step = source.steps[2]
        here = self._indexed(series.series_instance_uid)
        if series.instances and here >= series.instances:
            self._step(fetch.id, step, f"not needed: {here} instances already on the node")
            return self._received(fetch, here, series)
        completed, failed, outcome = source.retrieve(study.study_instance_uid, series.series_instance_uid,
                                                     time.monotonic() + self.deadlines.retrieve_s)
        self._step(fetch.id, step, outcome, ok=failed == 0)
        log.info("job %d: prior fetch %d: %s from %s: %s", fetch.job_id, fetch.id, step, fetch.source, outcome)
        expected = series.instances or completed
        wait_s = self.deadlines.index_s if source.arrives_later else 0.0  # WADO-RS: indexed already
        deadline = time.monotonic() + wait_s
        while (here := self._indexed(series.series_instance_uid)) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        if here < expected or here == 0:
            return "failed", (f"{here} of {expected} instances of the prior arrived"
                              + (f" within {wait_s:.0f} s" if wait_s else ""))
        return self._received(fetch, here, series)

    def _received(self, fetch, here: int, series) -> tuple[str, str | None]:
        with self.database.session() as session:
            session.execute(update(PriorFetch).where(PriorFetch.id == fetch.id).values(received_instances=here))
        return "done", None

    def _indexed(self, series_uid: str) -> int:
        with self.database.session() as session:
            return session.scalar(select(func.count()).where(Instance.series_instance_uid == series_uid)) or 0

    def _current(self, job_id: int) -> Current:
        with self.database.session() as session:
            job = session.get(Job, job_id)
            study = session.get(Study, job.study_instance_uid)
            series = session.get(Series, job.series_instance_uid)
            attributes = series.attributes or {}
            return Current(study.study_instance_uid, study.patient_id or "", study.study_date or "",
                           str(attributes.get("StudyTime") or ""), series.modality or "")

    def _step(self, fetch_id: int, step: str, outcome: str, ok: bool = True) -> None:
        with self.database.session() as session:
            fetch = session.get(PriorFetch, fetch_id)
            fetch.steps = [*fetch.steps, {"at": utcnow().isoformat(timespec="seconds"), "step": step,
                                          "outcome": outcome, "ok": ok}]

    def _finish(self, job_id: int, state: str, reason: str | None) -> None:
        with self.database.session() as session:
            session.execute(update(PriorFetch).where(PriorFetch.job_id == job_id,
                                                     PriorFetch.state.not_in(PRIOR_FETCH_FINISHED))
                            .values(state=state, reason=reason, finished_at=utcnow())
                            .execution_options(synchronize_session=False))
