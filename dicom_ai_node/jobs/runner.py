"""Running one job: load the series, check it fits the model, predict, check the result's
quality, encode, queue delivery.

Each step commits before the next starts. The expensive middle (volume, prediction) is not
persisted: a job interrupted in `running` or `encoding` runs again from its input instances,
and because result UIDs derive from the job, the second run writes the very same objects.

The quality gate: every result is checked against its model's [qc] (model_zoo/quality.py) and
the checks are stored with the policy that applies (the rule's qc_fail, else the node's
[qc] on_fail) before anything is encoded. When a check fails: "drop" finishes the job without
encoding anything; "send_flagged" encodes the failures into the SR and key images and queues
delivery as usual; "hold" encodes them the same way (a released result says it failed its
checks too) but queues nothing: the job waits in `held` for an admin (jobs/review.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy import delete, select, update

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Instance, Job, JobState, QualityCheck, ResultObject, utcnow
from dicom_ai_node.deliver.outbox import queue_deliveries
from dicom_ai_node.imaging.load import read_header, read_volume
from dicom_ai_node.imaging.volume import VolumeError
from dicom_ai_node.jobs.encode import encode_results
from dicom_ai_node.jobs.fitness import check_fitness
from dicom_ai_node.jobs.retraction import retraction_count
from dicom_ai_node.notify import ignore
from dicom_ai_node.results import common
from dicom_ai_node.results.conform import conform_result
from dicom_ai_node.results.notice import build_notice
from dicom_ai_node.priors.inputs import load_prior, waiting_for_prior
from dicom_ai_node.router import input_fingerprint
from dicom_ai_node.storage import Storage
from dicom_ai_node.models import ModelRegistry
from model_zoo.manifest import Manifest
from model_zoo.quality import CheckResult, check_output, failures

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a series that crashed the node this often is not tried again
MAX_INPUT_NOTES = 20  # repairs stored on a job; the rest are the same kinds again
FINISHED = [state for state in JobState if state.finished]


class JobFailed(Exception):
    """The job cannot succeed; the message is the reason shown to admins. ``step`` says where
    it stopped: "input" (refused before inference), "inference" or "encoding"."""

    def __init__(self, reason: str, step: str = "input"):
        super().__init__(reason)
        self.step = step


@dataclass
class _Progress:
    """How far a run got, for its failure: the step it is in, the model, a header of the series
    (the "no result" notice copies patient and study from it) and the timings so far."""

    step: str = "input"  # input -> inference -> quality -> encoding
    manifest: Manifest | None = None
    source: Dataset | None = None
    timings: dict[str, float] = field(default_factory=dict)


class JobRunner:
    def __init__(self, database: Database, storage: Storage, models: ModelRegistry,
                 on_results: Callable[[], None] = lambda: None, default_qc_fail: str = "hold",
                 notify: Callable[..., None] = ignore, process_name: str | None = None):
        self.database = database
        self.process_name = process_name  # Job.claimed_by: which process runs it (cluster.py)
        self.storage = storage
        self.models = models
        self.on_results = on_results  # tells the outbox there is something to send
        self.default_qc_fail = default_qc_fail  # [qc] on_fail: for jobs whose rule has no qc_fail
        self.notify = notify  # Notifier.emit: "job_failed", "result_held"

    def run(self, job_id: int) -> None:
        claimed = self.claim(job_id)
        if claimed is None:
            return
        job, paths = claimed
        progress = _Progress()
        try:
            self._execute(job, paths, progress)
        except JobFailed as failure:
            log.warning("job %d (%s) failed (%s): %s", job_id, job.model_name, failure.step, failure)
            self._finish(job, JobState.failed, str(failure), progress, failure.step, paths)
        except Exception as error:
            # after the fitness check nothing should fail for a reason visible in the input: an
            # exception here is a bug (logged with its traceback), its step recorded
            log.exception("job %d (%s) failed unexpectedly in step %s", job_id, job.model_name, progress.step)
            self._finish(job, JobState.failed, f"internal error: {type(error).__name__}: {error}",
                         progress, progress.step, paths)

    def claim(self, job_id: int):
        """Take a queued job for this worker: (job, input paths), or None when it is not queued
        (another worker, thread or process took it, or it finished or was superseded).

        The claim is one conditional UPDATE (``where state = 'queued'``), issued first in the
        transaction: on PostgreSQL a second claimer's UPDATE waits for the first one's row lock
        and then finds the job `running`; SQLite runs one writer at a time. So however many
        node processes share the database, exactly one claimer wins each job."""
        with self.database.session() as session:
            claimed = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.queued, Job.attempts < MAX_ATTEMPTS,
                                  ~waiting_for_prior(Job.id))
                .values(state=JobState.running, attempts=Job.attempts + 1, started_at=utcnow(),
                        claimed_by=self.process_name, input_notes=None, failed_step=None)  # this attempt's own
                .execution_options(synchronize_session=False))
            if claimed.rowcount != 1:
                given_up = session.execute(
                    update(Job).where(Job.id == job_id, Job.state == JobState.queued, Job.attempts >= MAX_ATTEMPTS)
                    .values(state=JobState.failed, finished_at=utcnow(),
                            reason=f"gave up after {MAX_ATTEMPTS} interrupted attempts "
                                   "(the node stopped while running it)")
                    .execution_options(synchronize_session=False))
                if given_up.rowcount:
                    log.warning("job %d: gave up after %d interrupted attempts", job_id, MAX_ATTEMPTS)
                return None
            job = session.get(Job, job_id)
            instances = session.scalars(select(Instance).where(
                Instance.series_instance_uid == job.series_instance_uid)).all()
            if input_fingerprint([i.sop_instance_uid for i in instances]) != job.input_fingerprint:
                job.state, job.finished_at = JobState.superseded, utcnow()
                job.reason = "the series changed before the job started; it is evaluated again"
                return None
            paths = [self.storage.absolute(i.path) for i in instances]
            session.flush()
            session.expunge(job)
        return job, paths

    def _execute(self, job: Job, paths, progress: _Progress) -> None:
        timings = progress.timings
        manifest = progress.manifest = self.models.manifest(job.model_name)
        if manifest is None:
            raise JobFailed(f"model {job.model_name!r} is not installed or is disabled")

        # fitness: everything the rest needs, from the headers, before a pixel is read
        started = time.perf_counter()
        try:
            headers = [read_header(path) for path in paths]  # once: for the volume and the results
        except VolumeError as error:
            raise JobFailed(f"series cannot be used as a volume: {error}") from None
        progress.source = headers[0] if headers else None
        fitness = check_fitness(manifest, paths, headers)
        if not fitness.fit:
            raise JobFailed("; ".join(fitness.refusals))
        if fitness.repairs:
            self._record_repairs(job, fitness.repairs)
        try:
            volume = read_volume(fitness.plan)
        except VolumeError as error:
            raise JobFailed(f"series cannot be used as a volume: {error}") from None
        timings["load_s"] = _since(started)

        prior = load_prior(self.database, self.storage, job.id, manifest)  # None: the rule asks for none

        progress.step = "inference"
        started = time.perf_counter()
        model = self.models.load(manifest)
        if prior is not None and prior.volume is not None and getattr(model, "compares_with_prior", False):
            output = model.predict(volume, prior=prior.volume)
        else:
            output = model.predict(volume)
        timings["inference_s"] = _since(started)

        progress.step = "quality"
        checks = check_output(manifest, output, volume.voxel_volume_ml)
        failed = failures(checks)
        policy = job.qc_policy or self.default_qc_fail
        if not self._record_checks(job, checks, policy, progress, paths):
            return  # superseded or cancelled meanwhile, or dropped by the quality gate

        progress.step = "encoding"
        started = time.perf_counter()
        uid_seed = common.job_uid_seed(job.id, job.input_fingerprint, manifest.name, manifest.version,
                                       retractions=retraction_count(self.database, job.id))
        objects = encode_results(fitness.sources, volume, output, manifest, uid_seed, qc_failures=failed,
                                 prior=prior, input_repairs=fitness.repairs)
        written = []
        for kind, dataset in objects:
            _conformed(job.id, kind, dataset)
            path = self.storage.result_path(job.id, dataset.SOPInstanceUID)
            self.storage.write_atomic(path, _encode(dataset))
            written.append((kind, dataset, path))
        timings["encode_s"] = _since(started)

        held = bool(failed) and policy == "hold"
        if held:
            outcome = {"state": JobState.held, "reason": "held for review: " + "; ".join(failed)}
        elif job.destinations:
            outcome = {"state": JobState.delivering}
        else:
            outcome = {"state": JobState.done, "finished_at": utcnow()}
        with self.database.session() as session:
            if not _move(session, job, JobState.encoding, model_version=manifest.version,
                         timings={**timings, "delivery_started_at": utcnow().isoformat()}, **outcome):
                return
            for kind, dataset, path in written:
                result = ResultObject(job_id=job.id, kind=kind, sop_instance_uid=dataset.SOPInstanceUID,
                                      sop_class_uid=dataset.SOPClassUID,
                                      series_instance_uid=dataset.SeriesInstanceUID, path=path)
                session.add(result)
                if not held:
                    queue_deliveries(result, job.destinations)
        log.info("job %d (%s): %d result objects%s, load %.1fs, inference %.1fs, encode %.1fs",
                 job.id, manifest.name, len(written), ", held for review" if held else "", timings["load_s"],
                 timings["inference_s"], timings["encode_s"])
        if held:
            self.notify("result_held", job_id=job.id, model=manifest.name, study_instance_uid=job.study_instance_uid,
                        series_instance_uid=job.series_instance_uid, reason=outcome["reason"])
        else:
            self.on_results()

    def _record_checks(self, job: Job, checks: list[CheckResult], policy: str, progress: _Progress,
                       paths) -> bool:
        """Store the checks and the policy applied, in one commit with the job's next state:
        `encoding`, or `dropped` when a check failed and the policy is "drop" (with the "no
        result" notice when its rule asks for one). False when the job is not to be encoded
        (dropped, or no longer running)."""
        job_id, model_name = job.id, job.model_name
        failed = failures(checks)
        outcome = {"state": JobState.encoding}
        notice = None
        if failed and policy == "drop":
            outcome = {"state": JobState.dropped, "finished_at": utcnow(),
                       "reason": "dropped: quality checks failed: " + "; ".join(failed)}
            notice = self._notice(job, outcome["reason"], progress, paths)
        with self.database.session() as session:
            if not _move(session, job, JobState.running, qc_policy=policy, **outcome):
                return False
            session.execute(delete(QualityCheck).where(QualityCheck.job_id == job_id))  # an earlier attempt's
            session.add_all(QualityCheck(job_id=job_id, name=c.name, value=c.value, low=c.low, high=c.high,
                                         unit=c.unit, passed=c.passed, message=c.message) for c in checks)
            if notice is not None:
                _add_notice(session, job, notice)
        if notice is not None:
            self.on_results()
        if failed:  # names and numbers only: no patient data
            log.warning("job %d (%s): %d of %d quality checks failed, policy %s: %s", job_id, model_name,
                        len(failed), len(checks), policy, "; ".join(failed))
        return outcome["state"] == JobState.encoding

    def _record_repairs(self, job: Job, repairs: list[str]) -> None:
        with self.database.session() as session:
            _move(session, job, JobState.running, input_notes=repairs[:MAX_INPUT_NOTES])
        log.info("job %d (%s): input repaired before inference: %s", job.id, job.model_name,
                 "; ".join(repairs[:MAX_INPUT_NOTES]))

    def _finish(self, claimed: Job, state: JobState, reason: str, progress: _Progress, step: str,
                paths) -> None:
        # conditional: a job the router superseded meanwhile stays superseded, and one taken
        # back from this attempt (its process was thought dead) is the new attempt's to finish
        job_id = claimed.id
        notice = self._notice(claimed, reason, progress, paths)
        with self.database.session() as session:
            job = session.get(Job, job_id)
            finished = session.execute(update(Job).where(Job.id == job_id, Job.state.not_in(FINISHED),
                                                         Job.attempts == claimed.attempts)
                                       .values(state=state, reason=reason, finished_at=utcnow(), failed_step=step,
                                               timings={**job.timings, **progress.timings})
                                       .execution_options(synchronize_session=False))
            model, study_uid = job.model_name, job.study_instance_uid
            if finished.rowcount == 1 and notice is not None:
                _add_notice(session, claimed, notice)
        if finished.rowcount == 1 and state == JobState.failed:
            self.notify("job_failed", job_id=job_id, model=model, study_instance_uid=study_uid, reason=reason,
                        step=step)
        if finished.rowcount == 1 and notice is not None:
            self.on_results()

    def _notice(self, job: Job, reason: str, progress: _Progress, paths) -> tuple[Dataset, str] | None:
        """The "AI result not produced" notice for a job that ends without a result, written to
        its file, when the job's rule asks for one: (dataset, path), else None. Never raises:
        the job's own failure is what must be recorded."""
        if not (job.no_result_notice and job.destinations and progress.manifest is not None):
            return None
        try:
            source = progress.source or _first_readable_header(paths)
            if source is None:
                log.warning("job %d: no readable image of the series for the 'no result' notice", job.id)
                return None
            manifest = progress.manifest
            uid_seed = common.job_uid_seed(job.id, job.input_fingerprint, manifest.name, manifest.version,
                                           retractions=retraction_count(self.database, job.id))
            notice = build_notice(source, manifest, job.rule_name, reason, uid_seed)
            _conformed(job.id, "notice", notice)
            path = self.storage.result_path(job.id, notice.SOPInstanceUID)
            self.storage.write_atomic(path, _encode(notice))
            return notice, path
        except Exception:
            log.exception("job %d: the 'no result' notice could not be made", job.id)
            return None


def _add_notice(session, job: Job, notice: tuple[Dataset, str]) -> None:
    """The notice's row and its deliveries; none when an earlier attempt sent the same one (a
    retried job that failed again: same UIDs, the PACS has it)."""
    dataset, path = notice
    if session.scalar(select(ResultObject.id).where(ResultObject.sop_instance_uid == dataset.SOPInstanceUID)):
        return
    result = ResultObject(job_id=job.id, kind="notice", sop_instance_uid=dataset.SOPInstanceUID,
                          sop_class_uid=dataset.SOPClassUID, series_instance_uid=dataset.SeriesInstanceUID,
                          path=path)
    session.add(result)
    queue_deliveries(result, job.destinations)


def _first_readable_header(paths, tries: int = 5) -> Dataset | None:
    for path in list(paths)[:tries]:
        try:
            return read_header(path)
        except VolumeError:
            continue
    return None


def _conformed(job_id: int, kind: str, dataset: Dataset) -> None:
    """Strict in what we send: the result made valid for its IOD whatever its sources held
    (results/conform.py); what had to change is logged (names only, no values)."""
    changes = conform_result(dataset, copied_whole=kind == "derived")
    if changes:
        log.info("job %d: %s conformed: %s", job_id, kind, "; ".join(changes[:10]))


def _move(session, claimed: Job, expected: JobState, **values) -> bool:
    """Set ``values`` on the job only while it is still ``expected`` in the attempt this runner
    claimed: the router may have superseded it (or an admin cancelled it) meanwhile, or it was
    taken back and claimed again (its process was thought dead); then these results are dropped."""
    job_id = claimed.id
    moved = session.execute(update(Job).where(Job.id == job_id, Job.state == expected,
                                              Job.attempts == claimed.attempts).values(**values)
                            .execution_options(synchronize_session=False))
    if moved.rowcount != 1:
        state, attempts = session.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).one()
        log.info("job %d was %s (attempt %d) while attempt %d ran; its results are dropped", job_id,
                 state.value, attempts, claimed.attempts)
        return False
    return True


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _encode(dataset) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def recover_unfinished(database: Database, own_name: str | None = None) -> list[int]:
    """After a start: jobs whose process is gone go back to the queue (cluster.py); returns
    every queued job, to submit (a claim decides who runs each)."""
    from dicom_ai_node import cluster

    cluster.take_back_orphaned_jobs(database, own_name, at_start=True)
    return cluster.queued_jobs(database)
