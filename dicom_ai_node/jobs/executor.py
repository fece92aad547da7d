"""Where jobs run: in the node (LocalExecutor, the embedded default: a thread pool) or in
Celery worker processes on other hosts (CeleryExecutor). Both hand a job id to the same
job-running code (jobs/runner.py, JobRunner.run): locally in a thread, remotely in the worker's
task (jobs/celery_worker.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from typing import Protocol

from sqlalchemy import select

from dicom_ai_node.config import CeleryConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState, utcnow

log = logging.getLogger(__name__)

MAX_BACKOFF_DOUBLINGS = 6  # a job left queued is sent again after N, 2N, 4N ... at most 64N seconds


class Executor(Protocol):
    def submit(self, job_id: int) -> None: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs jobs in this process. Torch releases the GIL in its kernels, so threads suffice."""

    def __init__(self, run_job: Callable[[int], None], workers: int):
        self._run_job = run_job
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")

    def submit(self, job_id: int) -> None:
        self._pool.submit(self._run_logged, job_id)

    def _run_logged(self, job_id: int) -> None:
        try:
            self._run_job(job_id)
        except Exception:  # the runner records failures on the job; this is a last resort
            log.exception("job %d crashed outside its own error handling", job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class CeleryExecutor:
    """Sends each job to the broker, on the queue of its model's device class; Celery workers
    (``dicom-ai-node worker``) run it.

    Sending is best effort: the job row is already committed as `queued`, so a message that
    cannot be sent (broker down) or is lost is sent again by ``sweep``, which the node runs
    periodically. A job still `queued` ``requeue_after_s`` after it was last sent is sent again,
    with the wait doubling each time so that a long backlog is not flooded with duplicates
    (which would be harmless: the task claims the job, and only one claim wins)."""

    def __init__(self, config: CeleryConfig, database: Database, device_of: Callable[[str], str]):
        from dicom_ai_node.jobs.celery_app import make_app

        self._app = make_app(config)
        self._database = database
        self._device_of = device_of  # model name -> "gpu" | "cpu" | "any"
        self.requeue_after_s = config.requeue_after_s
        self._sent: dict[int, tuple[float, int]] = {}  # job id -> (when last sent, times re-sent)
        self._lock = threading.Lock()

    @property
    def sweep_interval_s(self) -> float:
        return max(1.0, min(30.0, self.requeue_after_s / 2))

    def submit(self, job_id: int) -> None:
        with self._database.session() as session:
            model_name = session.scalar(select(Job.model_name).where(Job.id == job_id))
        if model_name is not None:
            self._send(job_id, model_name, resends=0)

    def submit_queued(self) -> int:
        """Send every queued job (at start: messages sent before a restart may be lost)."""
        with self._database.session() as session:
            jobs = session.execute(select(Job.id, Job.model_name).where(Job.state == JobState.queued)
                                   .order_by(Job.id)).all()
        for job_id, model_name in jobs:
            self._send(job_id, model_name, resends=0)
        return len(jobs)

    def sweep(self) -> int:
        """Send again the queued jobs whose message seems lost; returns how many were sent."""
        now, cutoff = time.monotonic(), utcnow() - timedelta(seconds=self.requeue_after_s)
        with self._database.session() as session:
            jobs = session.execute(select(Job.id, Job.model_name, Job.created_at)
                                   .where(Job.state == JobState.queued).order_by(Job.id)).all()
        with self._lock:  # forget jobs that left the queue
            self._sent = {job_id: self._sent[job_id] for job_id, _, _ in jobs if job_id in self._sent}
            sent = dict(self._sent)
        count = 0
        for job_id, model_name, created_at in jobs:
            if job_id in sent:
                sent_at, resends = sent[job_id]
                if now - sent_at < self.requeue_after_s * 2 ** min(resends, MAX_BACKOFF_DOUBLINGS):
                    continue
                resends += 1
            else:  # created by another node process: it sent it; only an old one is overdue
                if created_at.tzinfo is None:
                    created_at = created_at.replace(tzinfo=UTC)
                if created_at > cutoff:
                    continue
                resends = 1
            log.info("job %d is still queued; its message may be lost, sending it again", job_id)
            self._send(job_id, model_name, resends)
            count += 1
        return count

    def _send(self, job_id: int, model_name: str, resends: int) -> None:
        from dicom_ai_node.jobs.celery_app import TASK_NAME, queue_for

        with self._lock:  # recorded first: a send that fails is retried by the sweep
            self._sent[job_id] = (time.monotonic(), resends)
        try:
            self._app.send_task(TASK_NAME, args=[job_id], queue=queue_for(self._device_of(model_name)))
        except Exception as error:  # noqa: BLE001 - broker down or refused: the job stays queued
            log.warning("job %d could not be sent to the broker (%s: %s); it is sent again later",
                        job_id, type(error).__name__, error)

    def shutdown(self) -> None:
        self._app.close()
