"""Jobs per minute: the local executor (threads in the node) against 1, 2 and 4 Celery workers
(``dicom-ai-node worker --concurrency 1`` processes), for the body-region model and the lung
model, on the same queued jobs. PostgreSQL and RabbitMQ are started for the run
(tests/private_services.py); no delivery (jobs end `done` after encoding), so this measures
load + inference + quality checks + encoding + the claims, not the network.

Each configuration first runs one warm-up job per worker (each worker process loads torch and
the model once), then JOBS timed jobs, all queued at once; jobs/min = JOBS / (last finished -
first sent). Each worker's torch uses every core unless OMP_NUM_THREADS says otherwise; the
last Celery run of each model gives each of the most workers one thread.

    .venv/bin/python bench/jobs_per_minute.py [--jobs 12] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, select, text

from dicom_ai_node.config import load_config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState, NodeProcess
from dicom_ai_node.jobs.executor import CeleryExecutor, LocalExecutor
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from tests.private_services import PrivatePostgres, PrivateRabbitMQ
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series

REPO = Path(__file__).resolve().parent.parent
# a chest CT of 120 slices 256 x 256 (2.5 mm, 1.4 mm pixels): big enough that inference dominates
SHAPE, SPACING = (120, 256, 256), (2.5, 1.4, 1.4)


def config_text(folder: Path, database_url: str, broker_url: str, threads: int) -> str:
    return f"""
[node]
storage_dir = "{folder / 'storage'}"
allow_any_caller = true
log_level = "WARNING"

[database]
url = "{database_url}"

[workers]
executor = "celery"
broker_url = "{broker_url}"
count = {threads}

[web]
enabled = false
"""


class Run:
    def __init__(self, folder: Path, postgres: PrivatePostgres, rabbitmq: PrivateRabbitMQ, name: str, threads: int):
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
        (self.folder / "config.toml").write_text(config_text(self.folder, url, rabbitmq.url, threads))
        self.config = load_config(self.folder / "config.toml")
        self.database = Database(url)
        self.database.upgrade()
        self.storage = Storage(self.config.node.storage_dir)
        self.workers: list[subprocess.Popen] = []

    def queue(self, series_list, model: str) -> list[int]:
        with self.database.session() as session:
            ids = []
            for series in series_list:
                store_series(session, self.storage, series)
                ids.append(queue_job(session, series, model, "bench", destinations=[], qc_policy="send_flagged"))
        return ids

    def done(self, ids: list[int]) -> bool:
        with self.database.session() as session:
            states = session.scalars(select(Job.state).where(Job.id.in_(ids))).all()
        failed = [s for s in states if s not in (JobState.done, JobState.queued, JobState.running, JobState.encoding)]
        if failed:
            raise RuntimeError(f"jobs ended {failed}")
        return all(state == JobState.done for state in states)

    def wait(self, ids: list[int], limit_s: float = 1800) -> float:
        deadline = time.monotonic() + limit_s
        while not self.done(ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not done within {limit_s} s")
            time.sleep(0.05)
        return time.monotonic()

    def start_workers(self, count: int, torch_threads: int | None = None) -> None:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {})}
        for number in range(count):
            with open(self.folder / f"worker{number}.log", "wb") as log:
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.folder / "config.toml"),
                     "worker", "--queues", "cpu,any", "--concurrency", "1"],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 300
        while True:
            with self.database.session() as session:
                if session.scalar(select(func.count(NodeProcess.name))) >= count:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not register")
            time.sleep(0.2)

    def stop(self) -> None:
        for worker in self.workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
        self.database.dispose()


def measure(run: Run, executor, series_list, model: str, warm: int) -> float:
    """Jobs per minute for the timed series after ``warm`` warm-up jobs."""
    warm_ids = run.queue(series_list[:warm], model)
    for job_id in warm_ids:
        executor.submit(job_id)
    run.wait(warm_ids)
    ids = run.queue(series_list[warm:], model)
    start = time.monotonic()
    for job_id in ids:
        executor.submit(job_id)
    end = run.wait(ids)
    return len(ids) / ((end - start) / 60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--models", default="ct_body_region,lung_ct_seg")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    results: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        series_cache = [make_ct_series(folder / "series" / f"s{n}", shape=SHAPE, spacing=SPACING, seed=f"bench-{n}",
                                       patient_id=f"BENCH-{n}") for n in range(args.jobs + max(counts))]
        postgres, rabbitmq = PrivatePostgres().start(), PrivateRabbitMQ(folder / "rabbitmq").start()
        try:
            number = 0
            for model in args.models.split(","):
                for threads in (1, 2):
                    number += 1
                    run = Run(folder, postgres, rabbitmq, f"bench{number}", threads)
                    models = ModelRegistry(run.config.model_paths)
                    runner = JobRunner(run.database, run.storage, models, default_qc_fail="send_flagged",
                                       process_name="bench/local")
                    executor = LocalExecutor(runner.run, threads)
                    per_minute = measure(run, executor, series_cache[:threads + args.jobs], model, threads)
                    executor.shutdown()
                    run.stop()
                    results.append((model, f"local, {threads} thread{'s' * (threads > 1)}", per_minute))
                    print(results[-1], flush=True)
                # each worker's torch uses every core by default; the last run gives each one thread
                for count, torch_threads in [*((c, None) for c in counts), (max(counts), 1)]:
                    number += 1
                    run = Run(folder, postgres, rabbitmq, f"bench{number}", 1)
                    run.start_workers(count, torch_threads)
                    manifests = ModelRegistry(run.config.model_paths).manifests
                    executor = CeleryExecutor(run.config.celery, run.database, lambda name, manifests=manifests: manifests[name].device)
                    try:
                        per_minute = measure(run, executor, series_cache[:count + args.jobs], model, count)
                    finally:
                        executor.shutdown()
                        run.stop()
                    threads_note = f", OMP_NUM_THREADS={torch_threads}" if torch_threads else ""
                    results.append((model, f"celery, {count} worker{'s' * (count > 1)}{threads_note}", per_minute))
                    print(results[-1], flush=True)
        finally:
            rabbitmq.stop()
            postgres.stop()
    print(f"\n{datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {args.jobs} timed jobs of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} each\n")
    print("| model | executor | jobs/min |\n|---|---|---|")
    for model, executor, per_minute in results:
        print(f"| {model} | {executor} | {per_minute:.1f} |")


if __name__ == "__main__":
    main()
