"""The same code on PostgreSQL (the scaled-out form): migrations, concurrent indexing,
idempotent routing, and a real storescu push into a node whose index is PostgreSQL."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, func, select, text

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Instance, Job, RoutingDecision, Study
from dicom_ai_node.index import ReceivedInstance, record_instance
from dicom_ai_node.router import Router, RuleStore
from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import skip_unless_tools, storescu, storescu_failures
from tests.synthetic import make_ct_series

ADMIN_URL = os.environ.get("DICOM_AI_NODE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable() -> bool:
    try:
        with create_engine(ADMIN_URL).connect() as connection:
            connection.execute(text("select 1"))
        return True
    except Exception:
        return False


pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not _reachable(), reason=f"PostgreSQL not reachable at {ADMIN_URL}")]


@pytest.fixture
def postgres_url():
    """A fresh database per test, dropped afterwards."""
    name = f"dain_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _instance(study: str, series: str, sop: str) -> ReceivedInstance:
    header = Dataset()
    header.PatientID, header.Modality, header.SeriesNumber = "P1", "CT", 3
    header.BodyPartExamined, header.ImageOrientationPatient = "CHEST", [1, 0, 0, 0, 1, 0]
    header.SliceThickness = 1.0
    return ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            f"instances/{sop}.dcm", 100, "STORESCU", header)


def test_concurrent_indexing_and_idempotent_routing(postgres_url):
    database = Database(postgres_url)
    database.upgrade()
    database.upgrade()  # a second start is a no-op

    errors: list[Exception] = []
    new_rows: list[bool] = []

    def receive(worker: int):
        try:
            for i in range(25):  # every worker sends the same instances: they race on the same rows
                with database.session() as session:
                    new_rows.append(record_instance(session, _instance("1.2.3", "1.2.3.4", f"1.2.3.4.{i}")))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=receive, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert new_rows.count(True) == 25  # each instance is new exactly once
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 25
        assert session.get(Study, "1.2.3").patient_id == "P1"

    rules = RuleStore(database)
    rules.seed_from_config([{"name": "ct", "priority": 1, "models": ["lung_ct_seg"], "destinations": ["pacs"],
                             "when": {"tag": "Modality", "equals": "CT"}}])
    submitted: list[int] = []
    router = Router(database, rules, submitted.append)
    assert len(router.route("1.2.3")) == 1
    assert router.route("1.2.3") == []  # completed already: no second job
    with database.session() as session:
        session.get(Study, "1.2.3").state = "receiving"  # completion fires again, same instances
    assert router.route("1.2.3") == []
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
        assert session.scalar(select(func.count()).select_from(RoutingDecision)) == 2
    database.dispose()


@skip_unless_tools("storescu")
def test_node_receives_into_postgresql(node_factory, postgres_url, tmp_path):
    node = node_factory(database_url=postgres_url)
    series = make_ct_series(tmp_path / "ct", shape=(8, 32, 32))
    assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        stored = {uid for (uid,) in connection.execute(text("select sop_instance_uid from instance"))}
    engine.dispose()
    assert stored == set(series.sop_instance_uids)
    node.stop()


def test_concurrent_release_and_reject_change_a_held_job_once(postgres_url, tmp_path):
    from tests.test_quality_gate import check_concurrent_reviews

    database = Database(postgres_url)
    check_concurrent_reviews(database, tmp_path / "storage")
    database.dispose()


def test_retired_counts_add_up_on_postgresql(postgres_url):
    """retired.add is an upsert (INSERT ... ON CONFLICT DO UPDATE) in PostgreSQL's dialect too."""
    from dicom_ai_node import retired

    database = Database(postgres_url)
    database.upgrade()
    with database.session() as session:
        retired.add(session, retired.INSTANCES_RECEIVED, 3)
        retired.add(session, retired.QC_CHECKS, 2, "m|pass")
        session.commit()
    with database.session() as session:
        retired.add(session, retired.INSTANCES_RECEIVED, 4)
        retired.add(session, retired.QC_CHECKS, 0, "m|fail")  # nothing to add: no row
        session.commit()
    with database.session() as session:
        assert retired.totals(session) == {(retired.INSTANCES_RECEIVED, ""): 7, (retired.QC_CHECKS, "m|pass"): 2}
    database.engine.dispose()
