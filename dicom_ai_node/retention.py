"""Retention: delete stored files and their index rows once nothing needs them ([retention]).

A study *settles* when its last instance was received, its last job finished and its last
delivery was sent or given up. Counting from then, its received instances are deleted after
``instances_days``, its result objects (files, result and delivery rows) after ``results_days``,
both after ``failed_days`` when one of its jobs or deliveries failed; once both are gone its
remaining rows (series, routing decisions, jobs, quality checks, the study) are forgotten.
Above ``high_watermark_percent`` disk use, the oldest settled studies are cleaned up early by
the same steps until use is below ``low_watermark_percent`` (A700 stays the last resort).

Never touched: a study still receiving, one with a job that is not finished (queued, running,
encoding, held, delivering) or with a delivery still pending. This is checked again right
before each batch is deleted.

Crash safety: files are deleted before their rows, in batches, each batch's rows in one
commit. A crash in between leaves rows whose files are gone, of a study nothing needs; the
next run finds the same study due and finishes it (a missing file is not an error). A file is
never left without its row, so no file is orphaned.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, delete, func, select

from dicom_ai_node import audit, retired
from dicom_ai_node.config import RetentionConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (
    Delivery,
    Instance,
    Job,
    JobState,
    QualityCheck,
    ResultObject,
    Retraction,
    RoutingDecision,
    Series,
    Study,
    as_utc,
    utcnow,
)
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

BATCH = 500  # files (and their rows) deleted per commit
MAX_FILES_PER_RUN = 200_000  # a run stops here; the next one goes on
CHECK_INTERVAL_S = 900  # the scheduler asks this often; a full run is made daily or when the disk is high
UNFINISHED = [state for state in JobState if not state.finished]


@dataclass
class Report:
    """What a run freed (or, dry, would free). Counts only: no patient data."""

    dry_run: bool = False
    watermark: bool = False  # the disk was above the high watermark
    instances: int = 0
    instance_bytes: int = 0
    results: int = 0
    result_bytes: int = 0
    studies_forgotten: int = 0
    files_left: bool = False  # the run hit its file limit; the next run goes on
    disk_used_percent: float | None = None

    def line(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        return (f"retention {verb} {self.instances} instances ({self.instance_bytes} bytes), "
                f"{self.results} results ({self.result_bytes} bytes), forgot {self.studies_forgotten} "
                f"studies" + (" (disk above the high watermark)" if self.watermark else ""))


@dataclass
class StudyFacts:
    uid: str
    last_received_at: datetime
    settled_at: datetime
    protected: bool
    failed: bool
    instances: int = 0
    results: int = 0


@dataclass
class _Run:
    report: Report
    budget: int = MAX_FILES_PER_RUN
    freed: int = 0  # bytes, for the watermark
    done: set = field(default_factory=set)


def storage_use(session) -> dict[str, list[dict]]:
    """What storage holds, for the admin page: received instances (count, bytes) per study
    state and result objects per job state. Aggregates only: one row per state, whatever the
    number of studies."""
    instances = session.execute(
        select(Study.state, func.count(Instance.sop_instance_uid), func.coalesce(func.sum(Instance.size_bytes), 0))
        .join(Series, Series.study_instance_uid == Study.study_instance_uid)
        .join(Instance, Instance.series_instance_uid == Series.series_instance_uid)
        .group_by(Study.state).order_by(Study.state))
    results = session.execute(
        select(Job.state, func.count(ResultObject.id), func.count(ResultObject.retracted_at))
        .join(ResultObject, ResultObject.job_id == Job.id).group_by(Job.state).order_by(Job.state))
    return {"instances": [{"state": state, "instances": count, "bytes": int(size)} for state, count, size in instances],
            "results": [{"state": state.value, "results": count, "retracted": retracted}
                        for state, count, retracted in results]}


class Retention:
    def __init__(self, config: RetentionConfig, database: Database, storage: Storage, clock=utcnow,
                 disk_usage=None, max_files_per_run: int = MAX_FILES_PER_RUN):
        self.config = config
        self.database = database
        self.storage = storage
        self.clock = clock
        self.disk_usage = disk_usage or storage.disk_usage  # (total, used, free); injectable
        self.max_files_per_run = max_files_per_run
        self.last_full_run: datetime | None = None

    # ---- entry points

    def scheduled(self) -> Report | None:
        """The scheduler's job: a full run once a day, and at once when the disk is above high."""
        if not self.config.enabled:
            return None
        day_passed = self.last_full_run is None or self.clock() - self.last_full_run >= timedelta(days=1)
        if day_passed or self._used_percent() > self.config.high_watermark_percent:
            return self.run()
        return None

    def run(self, dry_run: bool = False, actor: str = "node") -> Report:
        run = _Run(Report(dry_run=dry_run), budget=self.max_files_per_run)
        now = self.clock()
        facts = sorted((f for f in self._facts() if not f.protected), key=lambda f: f.settled_at)
        for study in facts:
            if run.budget <= 0:
                break
            age = now - study.settled_at
            keep_instances, keep_results = self._keep(study)
            if study.instances and age > keep_instances:
                self._free_instances(study, run)
            if study.results and age > keep_results:
                self._free_results(study, run)
            if age > max(keep_instances, keep_results):
                self._forget(study, run)
        used = self._used_percent(run)
        run.report.disk_used_percent = round(used, 1)
        if used > self.config.high_watermark_percent:
            run.report.watermark = True
            for study in facts:  # oldest first, whatever their age
                if run.budget <= 0 or self._used_percent(run) < self.config.low_watermark_percent:
                    break
                if study.instances:
                    self._free_instances(study, run)
                if study.results:
                    self._free_results(study, run)
            run.report.disk_used_percent = round(self._used_percent(run), 1)
        run.report.files_left = run.budget <= 0
        self._record(run.report, actor)
        if not dry_run:
            self.last_full_run = now
        return run.report

    # ---- what is due

    def _keep(self, study: StudyFacts) -> tuple[timedelta, timedelta]:
        days = (self.config.instances_days, self.config.results_days)
        if study.failed:
            days = tuple(max(d, self.config.failed_days) for d in days)
        return timedelta(days=days[0]), timedelta(days=days[1])

    def _facts(self) -> list[StudyFacts]:
        """One aggregate query per table, combined here: every study with what protects it."""
        with self.database.session() as session:
            studies = {uid: StudyFacts(uid, as_utc(last), as_utc(last), state == "receiving", False)
                       for uid, state, last in session.execute(
                           select(Study.study_instance_uid, Study.state, Study.last_received_at))}
            jobs = session.execute(
                select(Job.study_instance_uid, func.max(Job.finished_at),
                       func.sum(case((Job.state.in_(UNFINISHED), 1), else_=0)),
                       func.sum(case((Job.state == JobState.failed, 1), else_=0)))
                .group_by(Job.study_instance_uid))
            for uid, finished, unfinished, failed in jobs:
                self._merge(studies.get(uid), finished, unfinished, failed)
            deliveries = session.execute(
                select(Job.study_instance_uid, func.max(Delivery.sent_at), func.max(Delivery.failed_at),
                       func.sum(case((Delivery.state == "pending", 1), else_=0)),
                       func.sum(case((Delivery.state == "failed", 1), else_=0)))
                .join(ResultObject, ResultObject.id == Delivery.result_id).join(Job, Job.id == ResultObject.job_id)
                .group_by(Job.study_instance_uid))
            for uid, sent, gave_up, pending, failed in deliveries:
                self._merge(studies.get(uid), sent, pending, failed)
                self._merge(studies.get(uid), gave_up, 0, 0)
            for uid, count in session.execute(
                    select(Series.study_instance_uid, func.count(Instance.sop_instance_uid))
                    .join(Instance, Instance.series_instance_uid == Series.series_instance_uid)
                    .group_by(Series.study_instance_uid)):
                if uid in studies:
                    studies[uid].instances = count
            for uid, count in session.execute(
                    select(Job.study_instance_uid, func.count(ResultObject.id))
                    .join(ResultObject, ResultObject.job_id == Job.id).group_by(Job.study_instance_uid)):
                if uid in studies:
                    studies[uid].results = count
        return list(studies.values())

    @staticmethod
    def _merge(study: StudyFacts | None, moment, unfinished, failed) -> None:
        if study is None:
            return
        if moment is not None:
            study.settled_at = max(study.settled_at, as_utc(moment))
        study.protected = study.protected or bool(unfinished)
        study.failed = study.failed or bool(failed)

    def _still_free(self, session, study: StudyFacts) -> bool:
        """Checked right before each batch: nothing came to need the study since the facts."""
        row = session.get(Study, study.uid)
        if row is None:
            return False
        if row.state == "receiving" or as_utc(row.last_received_at) != study.last_received_at:
            return False
        busy = session.scalar(select(func.count()).select_from(Job).where(
            Job.study_instance_uid == study.uid, Job.state.in_(UNFINISHED)))
        pending = session.scalar(
            select(func.count()).select_from(Delivery).join(ResultObject, ResultObject.id == Delivery.result_id)
            .join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_instance_uid == study.uid, Delivery.state == "pending"))
        return not busy and not pending

    # ---- deleting: files first, then their rows (one commit per batch)

    def _free_instances(self, study: StudyFacts, run: _Run) -> None:
        if (study.uid, "instances") in run.done:
            return
        run.done.add((study.uid, "instances"))
        query = (select(Instance.sop_instance_uid, Instance.path, Instance.size_bytes, Series.is_result)
                 .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                 .where(Series.study_instance_uid == study.uid).order_by(Instance.sop_instance_uid))
        offset = 0
        while run.budget > 0:
            with self.database.session() as session:
                if not self._still_free(session, study):
                    return
                # a dry run deletes nothing, so it pages with an offset
                batch = session.execute(query.offset(offset).limit(min(BATCH, run.budget))).all()
                if not batch:
                    break
                if run.report.dry_run:
                    offset += len(batch)
                else:
                    for _uid, path, _size, _is_result in batch:
                        self.storage.remove(path)
                    session.execute(delete(Instance).where(Instance.sop_instance_uid.in_([b[0] for b in batch])))
                    received = [b for b in batch if not b[3]]  # what /metrics counts as received
                    retired.add(session, retired.INSTANCES_RECEIVED, len(received))
                    retired.add(session, retired.RECEIVED_BYTES, sum(b[2] or 0 for b in received))
                    session.commit()
            run.budget -= len(batch)
            size = sum(b[2] or 0 for b in batch)
            run.report.instances += len(batch)
            run.report.instance_bytes += size
            run.freed += size
        study.instances = 0 if run.budget > 0 else study.instances
        if not run.report.dry_run:
            self.storage.remove_empty_folders(self.storage.study_folder(study.uid))

    def _free_results(self, study: StudyFacts, run: _Run) -> None:
        if (study.uid, "results") in run.done:
            return
        run.done.add((study.uid, "results"))
        query = (select(ResultObject.id, ResultObject.path, ResultObject.job_id)
                 .join(Job, Job.id == ResultObject.job_id)
                 .where(Job.study_instance_uid == study.uid).order_by(ResultObject.id))
        offset = 0
        job_ids = set()
        while run.budget > 0:
            with self.database.session() as session:
                if not self._still_free(session, study):
                    return
                batch = session.execute(query.offset(offset).limit(min(BATCH, run.budget))).all()
                if not batch:
                    break
                size = sum(self._size(path) for _id, path, _job in batch)
                job_ids.update(b[2] for b in batch)
                if run.report.dry_run:
                    offset += len(batch)
                else:
                    for _id, path, _job in batch:
                        self.storage.remove(path)
                    ids = [b[0] for b in batch]
                    retired.add(session, retired.DELIVERY_FAILURES, session.scalar(
                        select(func.count()).where(Delivery.result_id.in_(ids), Delivery.state == "failed")))
                    session.execute(delete(Delivery).where(Delivery.result_id.in_(ids)))
                    session.execute(delete(ResultObject).where(ResultObject.id.in_(ids)))
                    session.commit()
            run.budget -= len(batch)
            run.report.results += len(batch)
            run.report.result_bytes += size
            run.freed += size
        study.results = 0 if run.budget > 0 else study.results
        if not run.report.dry_run:
            for job_id in job_ids:
                self.storage.remove_empty_folders(f"results/job-{int(job_id)}")

    def _forget(self, study: StudyFacts, run: _Run) -> None:
        """Rows only (no files left): series, decisions, jobs, their checks, the study."""
        if study.instances or study.results:
            return
        if run.report.dry_run:
            run.report.studies_forgotten += 1
            return
        with self.database.session() as session:
            if not self._still_free(session, study):
                return
            has_files = session.scalar(select(func.count()).select_from(Instance).join(Series).where(
                Series.study_instance_uid == study.uid)) or session.scalar(
                select(func.count()).select_from(ResultObject).join(Job).where(Job.study_instance_uid == study.uid))
            if has_files:
                return
            jobs = select(Job.id).where(Job.study_instance_uid == study.uid)
            self._retire_counts(session, study.uid, jobs)
            session.execute(delete(QualityCheck).where(QualityCheck.job_id.in_(jobs)))
            session.execute(delete(Retraction).where(Retraction.job_id.in_(jobs)))  # its KOS went with the results
            session.execute(delete(Job).where(Job.study_instance_uid == study.uid))
            session.execute(delete(RoutingDecision).where(RoutingDecision.study_instance_uid == study.uid))
            session.execute(delete(Series).where(Series.study_instance_uid == study.uid))
            session.execute(delete(Study).where(Study.study_instance_uid == study.uid))
            session.commit()
        run.report.studies_forgotten += 1

    @staticmethod
    def _retire_counts(session, study_uid: str, jobs) -> None:
        """What /metrics counts of the rows about to go (retired.py): its counters stay put."""
        completed = session.scalar(select(func.count()).where(Study.study_instance_uid == study_uid,
                                                              Study.completed_at.is_not(None)))
        retired.add(session, retired.STUDIES_COMPLETED, completed)
        checks = session.execute(select(Job.model_name, QualityCheck.passed, func.count())
                                 .join(Job, Job.id == QualityCheck.job_id).where(QualityCheck.job_id.in_(jobs))
                                 .group_by(Job.model_name, QualityCheck.passed)).all()
        for model, passed, count in checks:
            retired.add(session, retired.QC_CHECKS, count, f"{model}|{'pass' if passed else 'fail'}")

    # ---- disk and record

    def _size(self, relative: str) -> int:
        try:
            return self.storage.absolute(relative).stat().st_size
        except OSError:
            return 0

    def _used_percent(self, run: _Run | None = None) -> float:
        """Disk use in percent; a dry run takes off what it would have freed."""
        total, used, _free = self.disk_usage()
        if not total:
            return 0.0
        if run is not None and run.report.dry_run:
            used -= run.freed
        return 100.0 * max(used, 0) / total

    def _record(self, report: Report, actor: str) -> None:
        log.info("%s; disk %s%% used", report.line(), report.disk_used_percent)
        freed = report.instances or report.results or report.studies_forgotten
        if report.dry_run or (not freed and actor == "node"):  # no audit row per idle check
            return
        with self.database.session() as session:
            audit.record(session, actor, "retention.run", None, **asdict(report))
            session.commit()
