"""Two admins retract the same job at once on PostgreSQL: the second one's UPDATE waits for the
first's row lock, then finds the job `retracted` and is refused; one retraction, one KOS."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, ResultObject, Retraction
from dicom_ai_node.jobs import retraction
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from tests.peers import wait_for
from tests.test_postgres import _reachable, postgres_url  # noqa: F401  (fixture)
from tests.test_quality_gate import CHEST
from tests.test_retraction_web import delivered_as_recorded, run_job
from tests.synthetic import make_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not _reachable(), reason="PostgreSQL not reachable")]


class Node:
    """What run_job and delivered_as_recorded need: a database, storage and runner."""

    def __init__(self, url: str, folder):
        self.database = Database(url)
        self.database.upgrade()
        self.storage = Storage(folder / "storage")
        self.runner = JobRunner(self.database, self.storage, ModelRegistry())


def lock_waiters(database: Database) -> int:
    with database.engine.connect() as connection:  # a new snapshot of pg_stat_activity each time
        return connection.execute(text("select count(*) from pg_stat_activity "
                                       "where wait_event_type = 'Lock' and datname = current_database()")).scalar()


def test_of_two_concurrent_retractions_one_wins(postgres_url, tmp_path):  # noqa: F811
    node = Node(postgres_url, tmp_path)
    job_id = run_job(node, make_ct_series(tmp_path / "ct", **CHEST))
    delivered_as_recorded(node, job_id)

    first = node.database._sessions()
    retraction.retract(first, node.storage, job_id, "alice", "first")  # row locked, not committed
    outcome: dict = {}

    def second_admin():
        try:
            with node.database.session() as session:
                retraction.retract(session, node.storage, job_id, "bob", "second")
            outcome["result"] = "retracted"
        except Exception as error:  # noqa: BLE001 - the refusal is what the test looks at
            outcome["result"] = error

    thread = threading.Thread(target=second_admin)
    thread.start()
    wait_for(lambda: lock_waiters(node.database) == 1, timeout=30, what="bob's UPDATE waiting for alice's row lock")
    first.commit()
    first.close()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(outcome["result"], retraction.NotRetractable), outcome
    assert f"job {job_id} is retracted" in str(outcome["result"])
    with node.database.session() as session:
        assert [r.actor for r in session.scalars(select(Retraction))] == ["alice"]
        assert len(session.scalars(select(ResultObject).where(ResultObject.kind == "rejection")).all()) == 1
        assert session.get(Job, job_id).reason == "retracted by alice: first"
    node.database.dispose()
