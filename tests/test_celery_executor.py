"""The Celery executor with the real parts: a RabbitMQ broker (a virtual host of its own per
test run, deleted afterwards), real worker processes started with the deployment's command line
(``python -m dicom_ai_node.cli --config … worker --queues cpu,any --concurrency 1``) and a node
database with queued jobs for the bundled body-region model on synthetic CT.

What is shown: each job runs exactly once however many messages name it (duplicates, the
sweep's re-sends), a job whose message never reached the broker is swept up, a job of a "gpu"
model is never taken by a CPU worker, and a worker SIGKILLed in the middle of a job hands its
message back (acks_late): a second worker finishes the job, once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_ai_node.config import ConfigError, load_config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import DisabledModel, Job, JobState, ResultObject
from dicom_ai_node.jobs.celery_app import queue_for
from dicom_ai_node.jobs.celery_worker import default_queues, torch_threads_per_process
from dicom_ai_node.jobs.executor import CeleryExecutor
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from model_zoo.manifest import ManifestError, load_manifest
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "model_zoo" / "ct_body_region"
WAIT_S = 90  # the most any wait below may take (worker start with torch, a job) on a loaded machine

GATED_MODEL = '''
import os
import time
from pathlib import Path

from model_zoo.ct_body_region.model import BodyRegionClassifier


class GatedBodyRegion(BodyRegionClassifier):
    """The body-region model, but predict says it started and waits for the test's gate file."""

    def predict(self, volume):
        import torch

        # one per attempt; it holds the threads the worker gave torch (--torch-threads)
        Path(self.manifest.extra["started"], f"started-{os.getpid()}").write_text(str(torch.get_num_threads()))
        deadline = time.monotonic() + 120
        while not Path(self.manifest.extra["gate"]).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the test never opened the gate")
            time.sleep(0.05)
        return super().predict(volume)
'''


# --- unit: queue choice and configuration --------------------------------------------------

def test_queue_follows_the_manifest_device():
    assert [queue_for(d) for d in ("gpu", "cpu", "any")] == ["gpu", "cpu", "any"]
    with pytest.raises(ValueError):
        queue_for("tpu")
    assert default_queues("cuda") == ["gpu", "any"]
    assert default_queues("cpu") == ["cpu", "any"]


def test_manifest_device_defaults_to_any_and_is_checked(tmp_path):
    assert load_manifest(BUNDLED).device == "any"
    text = (BUNDLED / "model.toml").read_text()
    (tmp_path / "model.toml").write_text(text.replace("[model]\n", '[model]\ndevice = "gpu"\n', 1))
    assert load_manifest(tmp_path).device == "gpu"
    (tmp_path / "model.toml").write_text(text.replace("[model]\n", '[model]\ndevice = "tpu"\n', 1))
    with pytest.raises(ManifestError, match="model.device: must be one of gpu, cpu, any"):
        load_manifest(tmp_path)


def test_torch_threads_per_worker_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert torch_threads_per_process(None, 4) == 4  # the cores shared out between the pool's processes
    assert torch_threads_per_process(None, 32) == 1
    assert torch_threads_per_process(3, 4) == 3  # asked
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads_per_process(None, 1) == 2  # the site's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert torch_threads_per_process(None, 2) == 8


def test_workers_config(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOM_AI_NODE_BROKER_URL", raising=False)
    path = tmp_path / "config.toml"
    node = "[node]\nallow_any_caller = true\n"
    path.write_text(node + "[workers]\ncount = 2\n")
    config = load_config(path)
    assert (config.executor, config.celery) == ("local", None)
    path.write_text(node + '[workers]\nexecutor = "celery"\nbroker_url = "amqp://u:p@mq:5672//"\njob_timeout_s = 600\n')
    config = load_config(path)
    assert config.executor == "celery"
    assert (config.celery.broker_url, config.celery.job_timeout_s, config.celery.requeue_after_s) == \
        ("amqp://u:p@mq:5672//", 600.0, 300.0)
    monkeypatch.setenv("DICOM_AI_NODE_BROKER_URL", "amqp://other//")
    assert load_config(path).celery.broker_url == "amqp://other//"
    monkeypatch.delenv("DICOM_AI_NODE_BROKER_URL")
    path.write_text(node + '[workers]\nexecutor = "celery"\n')
    with pytest.raises(ConfigError, match="workers.broker_url: is required"):
        load_config(path)
    path.write_text(node + '[workers]\nexecutor = "dask"\n')
    with pytest.raises(ConfigError, match="workers.executor: must be 'local' or 'celery'"):
        load_config(path)


# --- the real parts ------------------------------------------------------------------------

def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", *args], check=False, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def vhost():
    """A RabbitMQ virtual host for this test run only: no queue or message of another run
    (or of a deployment on this machine) can reach these workers, and none is left behind."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        pytest.skip("RabbitMQ is not reachable on 127.0.0.1:5672")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (needed for a virtual host of the test's own)")
    name = f"dicom-ai-node-test-{uuid.uuid4().hex[:12]}"
    created = _rabbitmqctl("add_vhost", name)
    if created.returncode != 0:
        pytest.skip(f"cannot create a RabbitMQ virtual host: {created.stderr.strip()[:200]}")
    try:
        granted = _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        assert granted.returncode == 0, granted.stderr
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


class Site:
    """A node's config, database and storage (SQLite file), site models, and its workers."""

    def __init__(self, folder: Path, vhost: str, extra: str = ""):
        self.folder = folder
        models = folder / "models"
        self._model(models / "ct_body_region_gpu", "ct_body_region_gpu", device="gpu")
        self._model(models / "ct_body_region_gated", "ct_body_region_gated", device="cpu",
                    entry="gated:GatedBodyRegion",
                    options={"started": folder, "gate": folder / "gate"})
        (models / "ct_body_region_gated" / "gated.py").write_text(GATED_MODEL)
        self.config_path = folder / "config.toml"
        self.config_path.write_text(f"""
[node]
storage_dir = "storage"
allow_any_caller = true

[database]
url = "sqlite:///node.db"

[workers]
executor = "celery"
broker_url = "amqp://guest:guest@127.0.0.1:5672/{vhost}"
requeue_after_s = 1

[models]
paths = ["models"]

[web]
enabled = false
{extra}
""")
        self.config = load_config(self.config_path)
        self.database = Database(self.config.database_url)
        self.database.upgrade()
        self.storage = Storage(self.config.node.storage_dir)
        manifests = ModelRegistry(self.config.model_paths).manifests
        self.executor = CeleryExecutor(self.config.celery, self.database, lambda name: manifests[name].device)
        self.workers: list[subprocess.Popen] = []

    @staticmethod
    def _model(folder: Path, name: str, device: str, entry: str | None = None, options: dict | None = None):
        folder.mkdir(parents=True)
        for file in ("model.py", "weights.pt"):
            shutil.copy(BUNDLED / file, folder / file)
        text = (BUNDLED / "model.toml").read_text().replace('name = "ct_body_region"', f'name = "{name}"', 1)
        text = text.replace("[model]\n", f'[model]\ndevice = "{device}"\n', 1)
        if entry:
            text = text.replace('entry = "model:BodyRegionClassifier"', f'entry = "{entry}"', 1)
        if options:
            text += "\n[model.options]\n" + "".join(f'{key} = "{value}"\n' for key, value in options.items())
        (folder / "model.toml").write_text(text)

    def job_for(self, series, model_name: str) -> int:
        """The series' files and rows and a queued job for it, as the router leaves them (no
        destination, and results of a failed quality check sent flagged: the job ends `done`)."""
        with self.database.session() as session:
            store_series(session, self.storage, series)
            return queue_job(session, series, model_name, "any CT", destinations=[], qc_policy="send_flagged")

    def start_worker(self, queues: str = "cpu,any") -> subprocess.Popen:
        log = open(self.folder / f"worker{len(self.workers)}.log", "wb")  # noqa: SIM115 - the process writes it
        worker = subprocess.Popen([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.config_path),
                                   "worker", "--queues", queues, "--concurrency", "1", "--torch-threads", "1"],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers.append(worker)
        return worker

    def kill(self, worker: subprocess.Popen) -> None:
        """SIGKILL the worker and its pool processes at once, as a host crash would."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)  # warm shutdown: the main process stops its pool
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(worker.pid, signal.SIGKILL)  # whatever is left of its process group
            except ProcessLookupError:
                pass
            worker.wait(timeout=30)
        self.executor.shutdown()
        self.database.dispose()

    def jobs(self) -> dict[int, Job]:
        with self.database.session() as session:
            jobs = session.scalars(select(Job)).all()
            session.expunge_all()
        return {job.id: job for job in jobs}

    def results(self, job_id: int) -> list[str]:
        with self.database.session() as session:
            return list(session.scalars(select(ResultObject.sop_instance_uid).where(ResultObject.job_id == job_id)))

    def wait_until(self, done, what: str, sweep: bool = False) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in self.folder.glob("worker*.log"))
                pytest.fail(f"not within {WAIT_S} s: {what}\n{logs}")
            for worker in self.workers:
                assert worker.poll() is None or worker.returncode == -signal.SIGKILL, \
                    (self.folder / "worker0.log").read_text(errors="replace")[-3000:]
            if sweep:
                self.executor.sweep()
            time.sleep(0.2)


@pytest.fixture
def site(tmp_path, vhost):
    site = Site(tmp_path, vhost)
    yield site
    site.stop_workers()


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    return [make_ct_series(folder / f"s{i}", shape=(8, 48, 64), seed=f"celery{i}") for i in range(5)]


def test_each_job_runs_once_on_a_worker_of_its_queue(site, series):
    sent_twice = [site.job_for(s, "ct_body_region") for s in series[:3]]
    never_sent = site.job_for(series[3], "ct_body_region")  # its message was lost: the sweep sends it
    gpu_job = site.job_for(series[4], "ct_body_region_gpu")
    site.start_worker("cpu,any")
    for job_id in sent_twice + sent_twice + [gpu_job]:
        site.executor.submit(job_id)
    every_job = [*sent_twice, never_sent]
    site.wait_until(lambda: all(site.jobs()[j].state.finished for j in every_job),
                    "the any-device jobs finish on the cpu,any worker", sweep=True)

    jobs = site.jobs()
    for job_id in every_job:
        assert jobs[job_id].state == JobState.done, jobs[job_id].reason
        assert jobs[job_id].attempts == 1  # claimed once, whatever the number of messages
        uids = site.results(job_id)
        assert uids and len(uids) == len(set(uids))
    # no worker takes the gpu queue: the job waits for one (the sweep keeps it sent)
    assert (jobs[gpu_job].state, jobs[gpu_job].attempts) == (JobState.queued, 0)


def test_a_worker_killed_mid_job_hands_the_job_to_another(site, series):
    job_id = site.job_for(series[0], "ct_body_region_gated")
    first = site.start_worker("cpu,any")
    site.executor.submit(job_id)
    site.wait_until(lambda: list(site.folder.glob("started-*")), "the first worker starts the job")
    assert site.jobs()[job_id].state == JobState.running
    site.start_worker("cpu")
    site.kill(first)  # in the middle of predict, its message not acknowledged
    (site.folder / "gate").touch()
    site.wait_until(lambda: site.jobs()[job_id].state.finished, "the second worker finishes the job")

    job = site.jobs()[job_id]
    assert job.state == JobState.done, job.reason
    assert job.attempts == 2  # the killed attempt and the one that finished
    assert len(list(site.folder.glob("started-*"))) == 2  # the second worker ran the model again
    assert {path.read_text() for path in site.folder.glob("started-*")} == {"1"}  # --torch-threads 1
    uids = site.results(job_id)
    assert uids and len(uids) == len(set(uids))


def test_a_job_that_fails_on_a_worker_is_notified_from_the_worker(tmp_path, vhost, series):
    from tests.test_notifications import Receiver

    receiver = Receiver()
    site = Site(tmp_path, vhost, extra=f"""
[[notify]]
kind = "webhook"
name = "ops"
url = "{receiver.url}"
secret = "s3cret"
events = ["job_failed"]
""")
    try:
        job_id = site.job_for(series[0], "ct_body_region")
        with site.database.session() as session:  # an admin switched the model off meanwhile
            session.add(DisabledModel(name="ct_body_region", disabled_by="test"))
        site.start_worker("cpu,any")
        site.executor.submit(job_id)
        site.wait_until(lambda: site.jobs()[job_id].state.finished, "the worker fails the job")
        assert site.jobs()[job_id].state == JobState.failed
        site.wait_until(lambda: receiver.requests, "the worker's job_failed notification")
        (headers, body), = receiver.requests
        event = json.loads(body)
        assert event["event"] == "job_failed" and event["details"]["job_id"] == job_id
        assert "disabled" in event["details"]["reason"]
    finally:
        site.stop_workers()
        receiver.close()
