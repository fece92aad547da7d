"""Retraction of delivered results (issue 13 §4): the rejection KOS (IHE IOCM) is valid DICOM
and references what was retracted; it goes to exactly the destinations that received the
results; two admins cannot both retract; a retry writes new UIDs. In-process: the bundled lung
model on a synthetic chest CT, a temp SQLite database."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_ai_node.db.models import AuditEvent, Delivery, Job, JobState, ResultObject, Retraction, utcnow
from dicom_ai_node.deliver.outbox import resend_deliveries
from dicom_ai_node.jobs import retraction
from dicom_ai_node.jobs.encode import encode_results
from dicom_ai_node.results.rejection_kos import build_rejection_kos
from dicom_ai_node.web import actions
from tests.dciodvfy import dciodvfy_errors
from tests.test_quality_gate import CHEST, Gate
from tests.test_results import Job as SyntheticJob
from tests.synthetic import make_ct_series

REASON = "model recalled: left and right lung swapped"


def evidence_uids(kos) -> set[str]:
    return {str(instance.ReferencedSOPInstanceUID)
            for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for instance in series.ReferencedSOPSequence}


def test_rejection_kos_is_valid_and_references_every_retracted_instance(tmp_path):
    job = SyntheticJob(tmp_path, shape=(10, 24, 32))
    objects = [dataset for _, dataset in encode_results(job.headers, job.volume, job.output, job.manifest, "seed")]
    kos = build_rejection_kos(objects, f"  {REASON}  ", uid_seed="retraction 1")
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert back.Modality == "KO" and back.StudyInstanceUID == job.series.study_instance_uid
    assert back.PatientID == objects[0].PatientID
    assert back.SeriesInstanceUID not in {str(o.SeriesInstanceUID) for o in objects}
    assert evidence_uids(back) == {str(o.SOPInstanceUID) for o in objects}
    assert {str(r.referenced_sop_instance_uid) for r in back.content.get_references()} == \
        {str(o.SOPInstanceUID) for o in objects}
    assert back.resolve_reference(str(objects[0].SOPInstanceUID))[0] == job.series.study_instance_uid
    descriptions = [item.TextValue for item in back.ContentSequence  # Key Object Description, TID 2010
                    if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert descriptions == [REASON]
    # deterministic per seed, new per seed
    again = build_rejection_kos(objects, REASON, uid_seed="retraction 1")
    other = build_rejection_kos(objects, REASON, uid_seed="retraction 2")
    assert again.SOPInstanceUID == kos.SOPInstanceUID and other.SOPInstanceUID != kos.SOPInstanceUID

    with pytest.raises(ValueError, match="needs a reason"):
        build_rejection_kos(objects, "   ", uid_seed="x")
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_kos([], REASON, uid_seed="x")


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    return make_ct_series(tmp_path_factory.mktemp("chest") / "ct", **CHEST)


@pytest.fixture
def gate(tmp_path):
    gate = Gate(tmp_path)
    yield gate
    gate.database.dispose()


def delivered_job(gate, series, sent_to=("pacs", "archive")) -> int:
    """A job run by the real runner, its results sent (as the outbox records it) to ``sent_to``;
    deliveries to its other destinations failed for good."""
    job_id = gate.run(series, destinations=("pacs", "archive", "research"))
    with gate.database.session() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.delivering, job.reason
        for result in job.results:
            for delivery in result.deliveries:
                if delivery.destination in sent_to:
                    delivery.state, delivery.sent_at = "sent", utcnow()
                else:
                    delivery.state, delivery.failed_at, delivery.last_error = "failed", utcnow(), "refused"
        job.state, job.finished_at = (JobState.done if len(sent_to) == 3 else JobState.failed), utcnow()
    return job_id


def uids_of(gate, job_id, kinds=("seg", "sr", "key_image")) -> dict[str, set[str]]:
    with gate.database.session() as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.job_id == job_id,
                                                          ResultObject.kind.in_(kinds))).all()
        return {"sop": {r.sop_instance_uid for r in rows}, "series": {r.series_instance_uid for r in rows}}


def test_retraction_sends_a_kos_to_exactly_the_destinations_that_received_the_results(gate, chest):
    job_id = delivered_job(gate, chest, sent_to=("pacs", "archive"))
    retracted = uids_of(gate, job_id)
    with gate.database.session() as session:
        done = retraction.retract(session, gate.storage, job_id, "alice", REASON)
        retraction_id = done.id
    with gate.database.session() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.retracted and job.reason == f"retracted by alice: {REASON}"
        [note] = [r for r in job.results if r.kind == "rejection"]
        assert sorted((d.destination, d.state) for d in note.deliveries) == [("archive", "pending"), ("pacs", "pending")]
        assert all(r.retraction_id == retraction_id and r.retracted_at for r in job.results if r.kind != "rejection")
        assert note.retraction_id is None
        row = session.get(Retraction, retraction_id)
        assert (row.actor, row.reason, row.kos_sop_instance_uid) == ("alice", REASON, note.sop_instance_uid)
        path = gate.storage.absolute(note.path)
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == retraction.RETRACT)).all()
        assert event.actor == "alice" and event.target == f"job {job_id}" and event.detail["reason"] == REASON
        assert set(event.detail["retracted"]) == retracted["sop"] and event.detail["destinations"] == ["archive", "pacs"]
    assert dciodvfy_errors(path) == []
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert evidence_uids(kos) == retracted["sop"] and kos.StudyInstanceUID == chest.study_instance_uid

    # once only, and retracted results are never resent (the KOS may be)
    with gate.database.session() as session, pytest.raises(retraction.NotRetractable, match="is retracted"):
        retraction.retract(session, gate.storage, job_id, "bob", "again")
    with gate.database.session() as session:
        assert resend_deliveries(session, "cli", job_id=job_id) == 2
        assert {d.state for r in session.get(Job, job_id).results if r.kind != "rejection"
                for d in r.deliveries} == {"sent", "failed"}


def test_a_retried_job_writes_new_uids_after_a_retraction_and_the_same_before(gate, chest):
    job_id = delivered_job(gate, chest, sent_to=("pacs", "archive", "research"))
    first = uids_of(gate, job_id)
    with gate.database.session() as session:
        retraction.retract(session, gate.storage, job_id, "alice", REASON)
    with gate.database.session() as session:
        assert actions.retry_job(session, job_id, "alice") == "run"
    gate.runner.run(job_id)
    with gate.database.session() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.delivering, job.reason
        fresh = [r for r in job.results if r.kind != "rejection" and r.retraction_id is None]
        assert sorted(r.kind for r in fresh) == ["key_image", "seg", "sr"]
        assert all(d.state == "pending" for r in fresh for d in r.deliveries)
    second = {"sop": {r.sop_instance_uid for r in fresh}, "series": {r.series_instance_uid for r in fresh}}
    assert not second["sop"] & first["sop"] and not second["series"] & first["series"]


def test_only_delivered_finished_jobs_can_be_retracted(gate, chest):
    job_id = gate.run(chest, destinations=("pacs",))  # delivering: its delivery is pending
    with gate.database.session() as session, pytest.raises(
            retraction.NotRetractable, match=f"job {job_id} is delivering; only done or failed jobs"):
        retraction.retract(session, gate.storage, job_id, "alice", REASON)
    with gate.database.session() as session:  # the delivery failed for good: nothing reached a PACS
        session.execute(Delivery.__table__.update().values(state="failed"))
        session.get(Job, job_id).state = JobState.failed
    with gate.database.session() as session, pytest.raises(retraction.NotRetractable, match="no delivered results"):
        retraction.retract(session, gate.storage, job_id, "alice", REASON)
    with gate.database.session() as session:  # refused: nothing changed
        assert session.get(Job, job_id).state == JobState.failed
        assert session.scalars(select(Retraction)).all() == []
        with pytest.raises(ValueError, match="needs a reason"):
            retraction.retract(session, gate.storage, job_id, "alice", "  ")
        with pytest.raises(LookupError, match="no job 999"):
            retraction.retract(session, gate.storage, 999, "alice", REASON)


def test_the_second_of_two_admins_is_refused(gate, chest):
    job_id = delivered_job(gate, chest, sent_to=("pacs", "archive", "research"))
    outcome = retraction.retract_jobs(gate.database, gate.storage, [job_id, job_id, 999], "alice", REASON)
    assert outcome.retracted == [job_id] and set(outcome.refused) == {999}
    outcome = retraction.retract_jobs(gate.database, gate.storage, [job_id], "bob", REASON)
    assert outcome.retracted == [] and "is retracted" in outcome.refused[job_id]
    with gate.database.session() as session:
        assert len(session.scalars(select(Retraction)).all()) == 1
        assert len([r for r in session.get(Job, job_id).results if r.kind == "rejection"]) == 1
