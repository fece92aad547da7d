"""A Celery worker process: ``dicom-ai-node worker --queues cpu,any --concurrency N``.

It takes jobs only from the queues named (by device class, jobs/celery_app.py) and runs each
with the same code as the node's local executor (jobs/runner.py, JobRunner.run). Every worker
process (Celery's prefork pool: N processes) opens its own database connections and loads each
model once, on first use, and keeps it (model_zoo/registry.py caches instances per process).

A message that comes back from the broker marked *redelivered* was held by a worker that died
(or lost its broker connection, which cancels its jobs: celery_app.py) before acknowledging it.
Its job, if left `running` or `encoding`, goes back to `queued` and is claimed again, as the
local executor does with interrupted jobs when the node restarts; after MAX_ATTEMPTS
interrupted attempts the claim gives up and fails the job, so a series that kills workers
cannot loop forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from sqlalchemy import update

from dicom_ai_node.cluster import HEARTBEAT_S, ProcessRecord, process_name
from dicom_ai_node.config import Config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState

log = logging.getLogger(__name__)


def detect_device() -> str:
    """"cuda" when this host has a usable GPU, else "cpu" (without initialising CUDA here: the
    pool's processes are forked from this one)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from model_zoo.registry import default_device

    return default_device()


def default_queues(device: str) -> list[str]:
    """What a worker takes when ``--queues`` is not given: what its host can run."""
    return ["gpu", "any"] if device == "cuda" else ["cpu", "any"]


def requeue_interrupted(database: Database, job_id: int) -> bool:
    """A redelivered job left `running`/`encoding` by a dead worker goes back to `queued`."""
    with database.session() as session:
        moved = session.execute(update(Job).where(Job.id == job_id, Job.state.in_([JobState.running,
                                                                                  JobState.encoding]))
                                .values(state=JobState.queued).execution_options(synchronize_session=False))
    if moved.rowcount:
        log.warning("job %d: its worker stopped while running it; running it again", job_id)
    return bool(moved.rowcount)


class _ProcessRunner:
    """One JobRunner per worker process, created in that process on its first job."""

    def __init__(self, config: Config, process_name: str):
        self._config = config
        self._process_name = process_name  # Job.claimed_by: this worker (its main process beats)
        self._runner = None
        self._pid = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._runner is None or self._pid != os.getpid():
                self._runner, self._pid = self._make(), os.getpid()
            return self._runner

    def _make(self):
        from dicom_ai_node.db.models import DisabledModel
        from dicom_ai_node.jobs.runner import JobRunner
        from dicom_ai_node.models import ModelRegistry
        from dicom_ai_node.notify import Notifier, patients_in
        from dicom_ai_node.storage import Storage

        config = self._config
        database = Database(config.database_url)
        models = ModelRegistry(config.model_paths)

        def disabled(name: str) -> bool:  # the admin page's "disabled models", as in the node
            with database.session() as session:
                return session.get(DisabledModel, name) is not None

        models.is_disabled = disabled
        storage = Storage(config.node.storage_dir, config.node.min_free_disk_mb * 2**20)
        # [[notify]] from here too (job failed, result held), with this pool process's own sender thread
        notifier = Notifier(config.notify, config.node.ae_title, patient_of=patients_in(database))
        notifier.start()
        # no outbox here: the node's outbox finds the new Delivery rows within a second
        return JobRunner(database, storage, models, default_qc_fail=config.qc_on_fail,
                         process_name=self._process_name, notify=notifier.emit)


def torch_threads_per_process(asked: int | None, concurrency: int) -> int:
    """Threads for torch in each pool process: asked, else OMP_NUM_THREADS, else the cores shared
    out. Left to itself every process's torch takes every core: N processes then oversubscribe
    the CPU and run slower than one (docs/benchmarks.md, jobs per minute)."""
    if asked:
        return asked
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, (os.cpu_count() or 1) // concurrency)


def run_worker(config: Config, queues: list[str] | None, concurrency: int, torch_threads: int | None = None) -> int:
    from dicom_ai_node.jobs.celery_app import QUEUES, TASK_NAME, make_app

    if config.celery is None:
        raise SystemExit(f"{config.path}: [workers] executor must be \"celery\" (with broker_url) to run a worker")
    device = detect_device()
    queues = queues or default_queues(device)
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise SystemExit(f"unknown queue {unknown[0]!r} (queues are {', '.join(QUEUES)})")
    if "gpu" in queues and device != "cuda":
        log.warning("this worker takes the gpu queue but has no GPU: gpu models will run on the CPU")

    app = make_app(config.celery)
    name = process_name("worker")
    record = ProcessRecord(Database(config.database_url), name, "worker", device=device, queues=",".join(queues),
                           concurrency=concurrency)
    record.database.wait_until_reachable()
    heartbeat = _start_heartbeat(record)
    threads = torch_threads_per_process(torch_threads, concurrency)
    _limit_torch_threads(threads)
    runners = _ProcessRunner(config, name)

    @app.task(name=TASK_NAME, bind=True)
    def run_job(task, job_id: int) -> None:
        runner = runners.get()
        if (task.request.delivery_info or {}).get("redelivered"):
            requeue_interrupted(runner.database, job_id)
        runner.run(job_id)  # claims the job: a duplicate message finds it taken and returns

    log.info("worker starting: device %s, queues %s, %d processes of %d torch threads, broker %s", device,
             ",".join(queues), concurrency, threads, _without_password(config.celery.broker_url))
    app.worker_main(["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
                     "--hostname", f"dicom-ai-node-{device}-{os.getpid()}@{socket.gethostname()}",
                     "--loglevel", config.node.log_level, "--without-gossip", "--without-mingle",
                     "--without-heartbeat"])
    heartbeat.set()
    record.remove()
    return 0


def _limit_torch_threads(threads: int) -> None:
    """In every pool process, before its first job (torch's pool is per process)."""
    from celery.signals import worker_process_init

    @worker_process_init.connect(weak=False)
    def set_threads(**_):
        import torch

        torch.set_num_threads(threads)


def _start_heartbeat(record: ProcessRecord) -> threading.Event:
    """This worker's NodeProcess row (models page, /metrics; a job claimed by a worker not seen
    for STALE_AFTER_S is taken back), renewed by a thread of the main process while the pool's
    processes run the jobs."""
    from celery.signals import worker_process_init

    stop = threading.Event()
    record.beat()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            record.beat()

    @worker_process_init.connect(weak=False)
    def forget_parent_connections(**_):  # a pool process must not use (or close) its parent's connections
        record.database.engine.dispose(close=False)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
