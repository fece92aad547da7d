"""The quality gate in the job runner, in-process on a temp SQLite database, with the bundled
lung model on synthetic chest CT: a thin slab of a chest whose lungs are smaller than the model's
declared [qc] range, and a fuller one that passes. What each policy does, what is stored, and
how hold interacts with release, reject, resend, retry, crash recovery and superseding."""

from __future__ import annotations


import pytest
from sqlalchemy import func, select

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (AuditEvent, Delivery, Job, JobState, QualityCheck, ResultObject)
from dicom_ai_node.deliver.outbox import resend_deliveries
from dicom_ai_node.jobs import review
from dicom_ai_node.jobs.runner import JobRunner, recover_unfinished
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from dicom_ai_node.web import actions
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series

CROPPED = dict(shape=(16, 64, 64), spacing=(0.6, 3.5, 3.5), seed="cropped")  # 9.6 mm of chest, lungs ~57 mL: below 100
CHEST = dict(shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5), seed="chest")  # an adult-sized chest, lungs ~1.3 L: plausible


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    return {name: make_ct_series(folder / name, **kwargs)
            for name, kwargs in (("cropped", CROPPED), ("chest", CHEST), ("cropped_too", {**CROPPED, "seed": "too"}))}


class Gate:
    """A database, a storage folder and a runner with the bundled models."""

    def __init__(self, folder, default_qc_fail="hold"):
        self.database = Database(f"sqlite:///{folder / 'node.db'}")
        self.database.upgrade()
        self.storage = Storage(folder / "storage")
        self.kicks = 0
        self.runner = JobRunner(self.database, self.storage, ModelRegistry(), on_results=self._kick,
                                default_qc_fail=default_qc_fail)

    def _kick(self):
        self.kicks += 1

    def job_for(self, series, qc_policy=None, destinations=("pacs",)) -> int:
        """Store the series' files and rows and a queued lung job for it, as the router would."""
        with self.database.session() as session:
            store_series(session, self.storage, series)
            return queue_job(session, series, "lung_ct_seg", "chest", destinations=list(destinations),
                             qc_policy=qc_policy)

    def run(self, series, **kwargs) -> int:
        job_id = self.job_for(series, **kwargs)
        self.runner.run(job_id)
        return job_id

    def job(self, job_id) -> dict:
        with self.database.session() as session:
            job = session.get(Job, job_id)
            return {"state": job.state, "reason": job.reason, "policy": job.qc_policy, "finished_at": job.finished_at,
                    "checks": {c.name: c for c in job.quality_checks},
                    "results": sorted(r.kind for r in job.results),
                    "deliveries": [d.state for r in job.results for d in r.deliveries]}

    def audit(self, action) -> list[AuditEvent]:
        with self.database.session() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


@pytest.fixture
def gate(tmp_path):
    gate = Gate(tmp_path)
    yield gate
    gate.database.dispose()


def test_a_plausible_result_is_delivered_with_its_checks_stored(gate, phantoms):
    job = gate.job(gate.run(phantoms["chest"]))
    assert job["state"] == JobState.delivering, job["reason"]
    assert job["policy"] == "hold"  # the node default, recorded on the job
    assert set(job["checks"]) == {"lung volume", "mean_attenuation on lung"}
    volume = job["checks"]["lung volume"]
    assert volume.passed and 1000 < volume.value < 1500 and (volume.low, volume.high, volume.unit) == (100, 12000, "mL")
    assert job["deliveries"] and set(job["deliveries"]) == {"pending"} and gate.kicks == 1


def test_hold_stores_the_results_but_queues_nothing(gate, phantoms, caplog):
    with caplog.at_level("WARNING", logger="dicom_ai_node.jobs.runner"):
        job_id = gate.run(phantoms["cropped"])
    [logged] = [r.getMessage() for r in caplog.records if "quality checks failed" in r.getMessage()]
    assert logged.startswith(f"job {job_id} (lung_ct_seg): 1 of 2 quality checks failed, policy hold: lung volume")
    assert "Phantom" not in logged and "PHANTOM" not in logged  # names and numbers, no patient data
    job = gate.job(job_id)
    assert job["state"] == JobState.held and not job["state"].finished
    assert job["policy"] == "hold" and job["finished_at"] is None
    assert job["reason"].startswith("held for review: lung volume ") and "below the plausible range 100 to 12000 mL" \
        in job["reason"]
    volume = job["checks"]["lung volume"]
    assert not volume.passed and volume.value < 100
    assert job["results"] == ["key_image", "seg", "sr"]  # encoded and stored
    assert job["deliveries"] == [] and gate.kicks == 0
    with gate.database.session() as session:
        for result in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)):
            assert gate.storage.absolute(result.path).is_file()

    # nothing bypasses the hold: resend, retry, crash recovery
    with gate.database.session() as session:
        assert resend_deliveries(session, "cli", job_id=job_id) == 0
        assert resend_deliveries(session, "cli", study_uid=phantoms["cropped"].study_instance_uid) == 0
        with pytest.raises(actions.Refused, match="only failed jobs"):
            actions.retry_job(session, job_id, "alice")
        with pytest.raises(actions.Refused, match="only queued or delivering"):
            actions.cancel_job(session, job_id, "alice")
    assert recover_unfinished(gate.database) == []
    gate.runner.run(job_id)  # a stray submit does not run it again
    assert gate.job(job_id)["state"] == JobState.held


def test_release_queues_the_deliveries_once_and_is_audited(gate, phantoms):
    job_id = gate.run(phantoms["cropped"], destinations=("pacs", "archive"))
    with gate.database.session() as session:
        assert review.release(session, job_id, "alice", "  checked: small FOV, lungs fine  ") == 6
    job = gate.job(job_id)
    assert job["state"] == JobState.delivering and job["deliveries"] == ["pending"] * 6
    [event] = gate.audit("jobs.release")
    assert event.actor == "alice" and event.target == f"job {job_id}" and event.at is not None
    assert event.detail["comment"] == "checked: small FOV, lungs fine"
    assert event.detail["failed_checks"] == [job["checks"]["lung volume"].message]
    with gate.database.session() as session:  # twice, or a reject after it: refused
        with pytest.raises(review.NotHeld, match=f"job {job_id} is delivering; only held results can be released"):
            review.release(session, job_id, "bob")
    with gate.database.session() as session:
        with pytest.raises(review.NotHeld, match="can be rejected"):
            review.reject(session, job_id, "bob")
    with gate.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 6
        with pytest.raises(LookupError, match="no job 999"):
            review.release(session, 999, "bob")


def test_reject_never_sends_and_is_audited(gate, phantoms):
    job_id = gate.run(phantoms["cropped"])
    with gate.database.session() as session:
        review.reject(session, job_id, "alice", "stomach gas, not lung")
    job = gate.job(job_id)
    assert job["state"] == JobState.rejected and job["state"].finished and job["finished_at"] is not None
    assert job["reason"] == "rejected by alice: stomach gas, not lung"
    assert job["deliveries"] == []
    with gate.database.session() as session:
        assert resend_deliveries(session, "cli", job_id=job_id) == 0
        with pytest.raises(review.NotHeld, match="is rejected"):
            review.release(session, job_id, "bob")
    [event] = gate.audit("jobs.reject")
    assert event.actor == "alice" and event.detail["comment"] == "stomach gas, not lung"
    with gate.database.session() as session, pytest.raises(ValueError, match="longer than 1000"):
        review.reject(session, job_id, "alice", "x" * 1001)


def test_send_flagged_delivers_the_result_with_its_failures(gate, phantoms):
    job_id = gate.run(phantoms["cropped"], qc_policy="send_flagged")
    job = gate.job(job_id)
    assert job["state"] == JobState.delivering and job["policy"] == "send_flagged"
    assert job["deliveries"] and set(job["deliveries"]) == {"pending"}
    assert not job["checks"]["lung volume"].passed


def test_drop_sends_and_encodes_nothing(tmp_path, phantoms):
    gate = Gate(tmp_path, default_qc_fail="drop")  # the node default applies: the rule has none
    job_id = gate.run(phantoms["cropped"])
    job = gate.job(job_id)
    assert job["state"] == JobState.dropped and job["state"].finished and job["policy"] == "drop"
    assert job["reason"].startswith("dropped: quality checks failed: lung volume ")
    assert job["results"] == [] and job["deliveries"] == [] and gate.kicks == 0
    # a rule's own policy wins over the node default
    assert gate.job(gate.run(phantoms["cropped_too"], qc_policy="hold"))["state"] == JobState.held


def test_a_rerun_after_a_crash_replaces_the_earlier_checks(gate, phantoms):
    job_id = gate.job_for(phantoms["cropped"], qc_policy="drop")
    with gate.database.session() as session:  # what an interrupted first attempt left
        session.add(QualityCheck(job_id=job_id, name="lung volume", value=1.0, unit="mL", passed=False,
                                 message="stale"))
    gate.runner.run(job_id)
    checks = gate.job(job_id)["checks"]
    assert len(checks) == 2 and checks["lung volume"].message != "stale"


def check_concurrent_reviews(database, storage) -> None:
    """Admins releasing and rejecting the same held job at the same moment (8 threads): exactly
    one wins, the others are told it is no longer held, and the job changed once."""
    import threading

    from tests.web_support import store_held_job, store_study

    database.upgrade()
    store_study(database, storage)
    job_id = store_held_job(database, storage)["held"]
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt(index: int):
        decide = review.release if index % 2 else review.reject
        start.wait()
        try:
            with database.session() as session:
                decide(session, job_id, f"admin{index}")
            outcomes.append(decide.__name__)
        except review.NotHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    with database.session() as session:
        job = session.get(Job, job_id)
        sent = session.scalar(select(func.count()).select_from(Delivery).join(ResultObject)
                              .where(ResultObject.job_id == job_id))
        events = session.scalar(select(func.count()).select_from(AuditEvent)
                                .where(AuditEvent.action.in_([review.RELEASE, review.REJECT])))
    assert events == 1
    if winners == ["release"]:
        assert job.state == JobState.delivering and sent == 2
    else:
        assert job.state == JobState.rejected and sent == 0


def test_concurrent_release_and_reject_change_a_held_job_once(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    check_concurrent_reviews(database, tmp_path / "storage")
    database.dispose()
