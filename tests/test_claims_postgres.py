"""Claims across processes: job claims and outbox claims raced by several node processes (each
with several threads) on one database, PostgreSQL (the scaled-out form) and SQLite (the embedded
default). Every queued job is claimed by exactly one claimer, and every outbox row reaches a
real DICOM listener exactly once, with its job done afterwards."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicom_ai_node.config import DestinationConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, Instance, Job, JobState, ResultObject, Series, Study
from dicom_ai_node.deliver.outbox import Outbox, queue_deliveries
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.router import input_fingerprint
from dicom_ai_node.storage import Storage
from tests.peers import free_port, write_tiny_ct
from tests.test_postgres import ADMIN_URL, _reachable, postgres_url  # noqa: F401  (fixture)

PROCESSES, THREADS = 4, 4
JOBS = 40
RESULTS = 24  # each sent to both destinations: 48 outbox rows
DESTINATIONS = {"pacs_a": "NODE_A", "pacs_b": "NODE_B"}  # name -> calling AE title the listener sees
WAIT_S = 60  # bound on every wait for the racing processes

needs_postgres = pytest.mark.skipif(not _reachable(), reason=f"PostgreSQL not reachable at {ADMIN_URL}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.integration, needs_postgres])])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return request.getfixturevalue("postgres_url")


def _node_rows(database: Database, storage: Storage) -> None:
    """A study with one series of one instance, as the receiver would have stored it."""
    with database.session() as session:
        session.add(Study(study_instance_uid="1.2.3", state="complete"))
        session.add(Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", modality="CT"))
        session.flush()
        session.add(Instance(sop_instance_uid="1.2.3.4.1", series_instance_uid="1.2.3.4",
                             sop_class_uid=CTImageStorage, transfer_syntax_uid="1.2.840.10008.1.2.1",
                             path="instances/1.2.3.4.1.dcm", size_bytes=1))


def _queued_jobs(database: Database) -> list[int]:
    with database.session() as session:
        jobs = [Job(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", model_name=f"model_{i}",
                    rule_name="r", destinations=[], input_fingerprint=input_fingerprint(["1.2.3.4.1"]),
                    input_count=1, state=JobState.queued) for i in range(JOBS)]
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def _race(target, *args) -> list:
    """Run ``target(*args)`` in PROCESSES new processes at once; returns what each put in the
    queue (one list per process). Fails when a process fails or does not finish in time.

    Spawned, not forked: a fork copies the test process with its other threads' locks held
    (the full suite leaves some), and in 2 full runs of 2 a forked racer hung for good."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=target, args=(start, results, *args)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=WAIT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=WAIT_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=WAIT_S)
    failures = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert not failures, failures[0]
    return outcomes


def _in_threads(work) -> list:
    """``work()`` in THREADS threads at once; their results, concatenated."""
    start, found, errors = threading.Barrier(THREADS), [], []

    def thread():
        try:
            start.wait(timeout=WAIT_S)
            found.extend(work())
        except Exception as error:  # noqa: BLE001 - reported by the caller
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for each in threads:
        each.start()
    for each in threads:
        each.join(timeout=WAIT_S)
    if errors:
        raise RuntimeError(errors[0])
    return found


def _claim_jobs(start, results, url: str, storage_dir: str, job_ids: list[int]) -> None:
    """One node process: THREADS job workers, each trying to claim every job."""
    try:
        database = Database(url)
        storage = Storage(Path(storage_dir))

        def work():
            runner = JobRunner(database, storage, models=None)
            return [job_id for job_id in job_ids if runner.claim(job_id) is not None]

        start.wait(timeout=WAIT_S)
        results.put(_in_threads(work))
        database.dispose()
    except Exception as error:  # noqa: BLE001 - reported to the test instead of an exit code
        results.put(f"{type(error).__name__}: {error}")


def test_each_queued_job_is_claimed_by_exactly_one_of_many_processes(database_url, tmp_path):
    database = Database(database_url)
    database.upgrade()
    storage = Storage(tmp_path / "storage")
    _node_rows(database, storage)
    job_ids = _queued_jobs(database)

    claims = [job_id for outcome in _race(_claim_jobs, database_url, str(storage.root), job_ids)
              for job_id in outcome]

    duplicates = len(claims) - len(set(claims))
    assert duplicates == 0, f"{duplicates} claims of a job already claimed"
    assert sorted(claims) == job_ids
    with database.session() as session:
        rows = session.execute(select(Job.state, Job.attempts)).all()
    assert rows == [(JobState.running, 1)] * JOBS
    database.dispose()


class Listener:
    """A real C-STORE SCP that keeps every (calling AE title, SOP Instance UID) it receives,
    duplicates included."""

    def __init__(self):
        self.received: list[tuple[str, str]] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.maximum_associations = 64
        ae.add_supported_context(CTImageStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        self.received.append((event.assoc.requestor.ae_title, event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _results_to_send(database: Database, storage: Storage) -> list[str]:
    """RESULTS result files of 4 delivering jobs, each queued to every destination."""
    uids = []
    with database.session() as session:
        jobs = [Job(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", model_name=f"model_{i}",
                    rule_name="r", destinations=list(DESTINATIONS), input_fingerprint="f", input_count=1,
                    state=JobState.delivering) for i in range(4)]
        session.add_all(jobs)
        session.flush()
        for i in range(RESULTS):
            job = jobs[i % len(jobs)]
            dataset = write_tiny_ct(storage.root / f"result_{i}.dcm", study_uid="1.2.3", series_uid="1.2.3.9",
                                    instance_number=i + 1)
            result = ResultObject(job_id=job.id, kind="derived", sop_instance_uid=dataset.SOPInstanceUID,
                                  sop_class_uid=CTImageStorage, series_instance_uid="1.2.3.9",
                                  path=f"result_{i}.dcm")
            session.add(result)
            queue_deliveries(result, list(DESTINATIONS))
            uids.append(dataset.SOPInstanceUID)
    return uids


CONFIG = SimpleNamespace(node=SimpleNamespace(ae_title="NODE"))  # all the Outbox reads of a Config


def _destinations(port: int):
    """The outbox's destination lookup: both destinations are the listener on ``port``."""
    def lookup(name: str) -> DestinationConfig:
        return DestinationConfig(name=name, ae_title="PACS", host="127.0.0.1", port=port,
                                 calling_ae_title=DESTINATIONS[name], max_attempts=1, timeout_s=10)
    return lookup


def _send_due(start, results, url: str, storage_dir: str, port: int) -> None:
    """One node process: THREADS outbox runs (one Outbox each, so their in-process lock does
    not serialise them), each sending whatever is due, twice."""
    try:
        database = Database(url)
        storage = Storage(Path(storage_dir))

        def work():
            outbox = Outbox(CONFIG, database, storage, lookup=_destinations(port))
            return [outbox.process_due() for _ in range(2)]

        start.wait(timeout=WAIT_S)
        results.put(_in_threads(work))
        database.dispose()
    except Exception as error:  # noqa: BLE001 - reported to the test instead of an exit code
        results.put(f"{type(error).__name__}: {error}")


def test_each_outbox_row_is_sent_exactly_once_by_many_processes(database_url, tmp_path):
    database = Database(database_url)
    database.upgrade()
    storage = Storage(tmp_path / "storage")
    _node_rows(database, storage)
    uids = _results_to_send(database, storage)
    listener = Listener()
    try:
        attempted = sum(n for outcome in _race(_send_due, database_url, str(storage.root), listener.port)
                        for n in outcome)
    finally:
        listener.stop()

    expected = sorted((ae, uid) for ae in DESTINATIONS.values() for uid in uids)
    duplicates = len(listener.received) - len(set(listener.received))
    assert duplicates == 0, f"{duplicates} sends of an object already sent"
    assert sorted(listener.received) == expected
    assert attempted == len(expected)
    with database.session() as session:
        assert session.execute(select(Delivery.state, Delivery.attempts)).all() == [("sent", 1)] * len(expected)
        assert set(session.scalars(select(Job.state))) == {JobState.done}  # the last delivery of each job saw the others
    database.dispose()


def test_a_claim_is_a_lease_that_a_dead_sender_gives_back(database, tmp_path):
    """Claimed rows are due for no other sender until the lease ends; then (a sender that died)
    they are claimed again. SQLite, in one process."""
    storage = Storage(tmp_path / "storage")
    _node_rows(database, storage)
    _results_to_send(database, storage)
    outbox = Outbox(CONFIG, database, storage, lookup=_destinations(free_port()))

    assert len(outbox.claim("pacs_a", timeout_s=30)) == RESULTS
    assert outbox.claim("pacs_a", timeout_s=30) == []  # leased
    dead = outbox.claim("pacs_b", timeout_s=0)  # a lease that has ended at once
    assert len(dead) == RESULTS
    assert outbox.claim("pacs_b", timeout_s=30) == dead
    assert outbox.claim("pacs_b", timeout_s=30) == []


def _start(start, results, url: str) -> None:
    """One node process starting: the schema is brought to the newest migration."""
    try:
        database = Database(url)
        start.wait(timeout=WAIT_S)
        database.upgrade()
        database.dispose()
        results.put([])
    except Exception as error:  # noqa: BLE001 - reported to the test instead of an exit code
        results.put(f"{type(error).__name__}: {error}")


@pytest.mark.integration
@needs_postgres
def test_node_processes_starting_at_once_on_an_empty_database_all_start(postgres_url):
    _race(_start, postgres_url)
    database = Database(postgres_url)
    database.upgrade()  # current: a no-op
    with database.session() as session:
        assert session.scalar(select(Job.id).limit(1)) is None  # the schema is there
    database.dispose()
