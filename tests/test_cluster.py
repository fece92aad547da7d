"""Several processes on one database (dicom_ai_node/cluster.py): one leader at a time, who is
alive, and which running jobs are taken back — on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from dicom_ai_node import cluster
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState, NodeProcess, utcnow
from dicom_ai_node.jobs.runner import _move
from tests.test_postgres import ADMIN_URL, _reachable, postgres_url  # noqa: F401  (fixture)

needs_postgres = pytest.mark.skipif(not _reachable(), reason=f"PostgreSQL not reachable at {ADMIN_URL}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.integration, needs_postgres])])
def database(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    database = Database(url)
    database.upgrade()
    yield database
    database.dispose()


def test_one_leader_at_a_time_and_the_next_takes_over_when_it_stops(database):
    first, second = cluster.Leader(database, "host-a/web:8080"), cluster.Leader(database, "host-b/web:8080")
    assert first.renew() and first.held()
    assert not second.renew() and not second.held()
    assert first.renew()  # renewing its own lease
    first.release()  # a clean stop hands it over at once
    assert not first.held()
    assert second.renew() and second.held()
    assert not first.renew()


def test_a_leader_that_stops_renewing_is_replaced_after_its_lease(database):
    gone = cluster.Leader(database, "host-a/all:11112", lease_s=1.0)
    waiting = cluster.Leader(database, "host-b/all:11112", lease_s=1.0)
    assert gone.renew()
    assert not waiting.renew()
    time.sleep(1.2)  # gone never renews again (crashed)
    assert waiting.renew()
    assert not gone.renew()


def test_a_leader_stops_leading_before_its_lease_runs_out(database):
    leader = cluster.Leader(database, "host-a/web:8080", lease_s=cluster.LEASE_MARGIN_S + 0.3)
    assert leader.renew() and leader.held()
    time.sleep(0.5)
    assert not leader.held()  # another process may take it once it expires; this one stops first


def _job(session, claimed_by: str | None, state: JobState = JobState.running) -> int:
    from dicom_ai_node.db.models import Series, Study

    number = session.query(Job).count()
    study, series = f"1.2.3.{number}", f"1.2.3.{number}.1"
    session.add(Study(study_instance_uid=study, state="complete"))
    session.add(Series(series_instance_uid=series, study_instance_uid=study, modality="CT"))
    session.flush()
    job = Job(study_instance_uid=study, series_instance_uid=series, model_name="m", rule_name="r",
              destinations=[], input_fingerprint="f", input_count=1, state=state, attempts=1,
              claimed_by=claimed_by)
    session.add(job)
    session.flush()
    return job.id


def test_only_the_running_jobs_of_gone_processes_are_taken_back(database):
    alive = cluster.ProcessRecord(database, "host-b/worker:42", "worker", device="cpu", queues="cpu,any")
    dead = cluster.ProcessRecord(database, "host-c/worker:43", "worker")
    assert alive.beat() and dead.beat()
    with database.session() as session:
        session.execute(update(NodeProcess).where(NodeProcess.name == dead.name)
                        .values(last_seen_at=utcnow() - timedelta(seconds=cluster.STALE_AFTER_S + 5)))
        on_alive = _job(session, alive.name)
        on_dead = _job(session, dead.name)
        unknown = _job(session, None, JobState.encoding)  # claimed before migration 0010
        own = _job(session, "host-a/all:11112")
        queued = _job(session, None, JobState.queued)

    taken = cluster.take_back_orphaned_jobs(database, "host-a/all:11112", at_start=False)
    assert sorted(taken) == sorted([on_dead, unknown])  # its own are running in its own pool
    with database.session() as session:
        states = {job.id: (job.state, job.claimed_by) for job in session.query(Job)}
    assert states[on_dead] == (JobState.queued, None) and states[unknown] == (JobState.queued, None)
    assert states[on_alive] == (JobState.running, alive.name)
    assert states[own] == (JobState.running, "host-a/all:11112")
    assert states[queued][0] == JobState.queued
    with database.session() as session:
        assert [process.name for process in cluster.live_processes(session)] == [alive.name]

    # a restarted process takes back what it was running in its earlier life, at once
    assert cluster.take_back_orphaned_jobs(database, "host-a/all:11112", at_start=True) == [own]
    assert cluster.queued_jobs(database) == sorted([on_dead, unknown, own, queued])


def test_a_claimer_taken_for_dead_cannot_record_over_the_next_attempt(database):
    with database.session() as session:
        job_id = _job(session, "host-c/worker:43")
        first_attempt = session.get(Job, job_id)
        session.expunge(first_attempt)
    # taken back and claimed again by another process (attempt 2) while the first still runs
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempts=2, claimed_by="host-b/worker:42"))
    with database.session() as session:
        assert not _move(session, first_attempt, JobState.running, state=JobState.encoding)
    with database.session() as session:
        assert session.get(Job, job_id).state == JobState.running
        second_attempt = session.get(Job, job_id)
        session.expunge(second_attempt)
    with database.session() as session:
        assert _move(session, second_attempt, JobState.running, state=JobState.encoding)


def test_metrics_show_live_processes_worker_devices_and_the_leader(database):
    from dicom_ai_node.web.metrics import render

    web = cluster.ProcessRecord(database, "host-a/web:8080", "web")
    gpu = cluster.ProcessRecord(database, "host-g/worker:7", "worker", device="cuda", queues="gpu,any", concurrency=2)
    cpu = cluster.ProcessRecord(database, "host-c/worker:8", "worker", device="cpu", queues="cpu,any", concurrency=1)
    gone = cluster.ProcessRecord(database, "host-d/worker:9", "worker", device="cpu", queues="cpu,any", concurrency=4)
    for record in (web, gpu, cpu, gone):
        assert record.beat()
    with database.session() as session:
        session.execute(update(NodeProcess).where(NodeProcess.name == gone.name)
                        .values(last_seen_at=utcnow() - timedelta(seconds=cluster.STALE_AFTER_S + 5)))
    text = render(database).decode()
    assert 'dicom_ai_node_leader_alive 0.0' in text
    assert cluster.Leader(database, web.name).renew()
    text = render(database).decode()
    assert 'dicom_ai_node_processes{device="",role="web"} 1.0' in text
    assert 'dicom_ai_node_processes{device="cuda",role="worker"} 1.0' in text
    assert 'dicom_ai_node_processes{device="cpu",role="worker"} 1.0' in text  # the gone one is not counted
    assert 'dicom_ai_node_worker_slots{device="cuda"} 2.0' in text
    assert 'dicom_ai_node_worker_slots{device="cpu"} 1.0' in text
    assert 'dicom_ai_node_leader_alive 1.0' in text
