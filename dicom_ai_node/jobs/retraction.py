"""Retraction: an admin takes a job's delivered results back (IHE IOCM). Shared by the study
page, the models page (a recalled model version, in bulk), the API and the CLI.

One transaction: the job moves to `retracted` (a conditional UPDATE, issued first, so two
admins retracting at once change it once and the other is refused), its results are marked
retracted, a Key Object Selection "Rejected for Quality Reasons" referencing every instance that
reached a destination is written (results/rejection_kos.py) and recorded as a result of the job
with a Delivery row to each destination that received one of them; the outbox sends it like any
result. Audited. A retry runs the job again with new UIDs (results/common.job_uid_seed counts
the job's retractions): the PACS has rejected the old ones for good.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom import dcmread, dcmwrite
from pydicom.filebase import DicomBytesIO
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, DisabledModel, Job, JobState, ResultObject, Retraction, utcnow
from dicom_ai_node.deliver.outbox import queue_deliveries
from dicom_ai_node.results.rejection_kos import build_rejection_kos
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

MAX_REASON = 1000
RETRACT, RECALL = "results.retract", "models.recall"  # the audit log's actions
KIND = "rejection"  # ResultObject.kind of the rejection KOS
RETRACTABLE = (JobState.done, JobState.failed)  # finished with something sent, nothing pending
MAX_BULK = 200  # jobs one bulk retraction takes (the models page lists a page of them)


class NotRetractable(ValueError):
    """The job has nothing (more) to retract in its state; the message says why."""


@dataclass
class BulkOutcome:
    retracted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # job id -> why


def retract(session: Session, storage: Storage, job_id: int, actor: str, reason: str) -> Retraction:
    """Retract the job's results; returns the retraction (its KOS is queued for delivery).

    Everything that can refuse is read before the first write, so a refusal changes nothing
    even for a caller that catches it inside its transaction."""
    reason = check_reason(reason)
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.state not in RETRACTABLE:
        raise NotRetractable(f"job {job_id} is {job.state.value}; only done or failed jobs can be retracted")
    results = list(session.scalars(select(ResultObject).where(
        ResultObject.job_id == job_id, ResultObject.retraction_id.is_(None), ResultObject.kind != KIND)
        .order_by(ResultObject.id)))
    received = {result.id: sorted(d.destination for d in result.deliveries if d.state == "sent")
                for result in results}
    delivered = [result for result in results if received[result.id]]
    if not delivered:
        raise NotRetractable(f"job {job_id} has no delivered results to retract")
    headers = [_header(storage, result) for result in delivered]
    destinations = sorted({name for names in received.values() for name in names})

    # the one gate: another admin (or a resend) that got there first leaves no row to change
    now = utcnow()
    pending = exists().where(Delivery.result_id == ResultObject.id, ResultObject.job_id == job_id,
                             Delivery.state == "pending")
    changed = session.execute(update(Job).where(Job.id == job_id, Job.state.in_(RETRACTABLE), ~pending)
                              .values(state=JobState.retracted, reason=f"retracted by {actor}: {reason}",
                                      finished_at=now)
                              .execution_options(synchronize_session=False))
    session.refresh(job)
    if changed.rowcount != 1:
        raise NotRetractable(f"job {job_id} is {job.state.value} with deliveries pending; only done or failed "
                             "jobs with nothing pending can be retracted")

    retraction = Retraction(job_id=job_id, reason=reason, actor=actor, at=now)
    session.add(retraction)
    session.flush()
    kos = build_rejection_kos(headers, reason, uid_seed=f"dicom-ai-node retraction {retraction.id} of job {job_id}")
    path = storage.result_path(job_id, kos.SOPInstanceUID)
    storage.write_atomic(path, _encode(kos))
    note = ResultObject(job_id=job_id, kind=KIND, sop_instance_uid=kos.SOPInstanceUID,
                        sop_class_uid=kos.SOPClassUID, series_instance_uid=kos.SeriesInstanceUID, path=path)
    queue_deliveries(note, destinations)
    session.add(note)
    retraction.kos_sop_instance_uid = kos.SOPInstanceUID
    for result in results:
        result.retracted_at, result.retraction_id = now, retraction.id
    audit.record(session, actor, RETRACT, f"job {job_id}", reason=reason, model=job.model_name,
                 model_version=job.model_version, retraction=retraction.id,
                 retracted=[result.sop_instance_uid for result in delivered],
                 kos=kos.SOPInstanceUID, destinations=destinations)
    session.flush()
    log.info("job %d: %d result objects retracted by %s, rejection note queued to %s",
             job_id, len(results), actor, ", ".join(destinations))
    return retraction


def retract_jobs(database: Database, storage: Storage, job_ids: list[int], actor: str,
                 reason: str) -> BulkOutcome:
    """Retract each job in its own transaction (one refusal does not undo the others)."""
    reason = check_reason(reason)
    if len(job_ids) > MAX_BULK:
        raise ValueError(f"at most {MAX_BULK} jobs at once; got {len(job_ids)}")
    outcome = BulkOutcome()
    for job_id in dict.fromkeys(job_ids):
        try:
            with database.session() as session:
                retract(session, storage, job_id, actor, reason)
            outcome.retracted.append(job_id)
        except (LookupError, NotRetractable, OSError) as error:
            outcome.refused[job_id] = str(error)
    return outcome


def retraction_count(database: Database, job_id: int) -> int:
    """How often the job's results were retracted: moves its UID seed on (results/common.py)."""
    with database.session() as session:
        return session.scalar(select(func.count(Retraction.id)).where(Retraction.job_id == job_id)) or 0


def delivered_results_of(session: Session, model_name: str, model_version: str | None,
                         limit: int = 50, offset: int = 0) -> list[dict]:
    """Jobs of a model version with results delivered and not retracted, oldest first, a page of
    them: what a recall takes back. Ids, UIDs and counts only (no patient data)."""
    sent = exists().where(Delivery.result_id == ResultObject.id, Delivery.state == "sent")
    query = (select(Job.id, Job.study_instance_uid, Job.state, Job.finished_at, func.count(ResultObject.id))
             .join(ResultObject, ResultObject.job_id == Job.id)
             .where(Job.model_name == model_name, ResultObject.retraction_id.is_(None),
                    ResultObject.kind != KIND, sent)
             .group_by(Job.id, Job.study_instance_uid, Job.state, Job.finished_at)
             .order_by(Job.id).limit(limit).offset(offset))
    if model_version is not None:
        query = query.where(Job.model_version == model_version)
    return [{"job_id": job_id, "study_instance_uid": study, "state": state.value, "finished_at": finished,
             "results": count} for job_id, study, state, finished, count in session.execute(query)]


def check_reason(reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a retraction needs a reason")
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason is longer than {MAX_REASON} characters")
    return reason


def _header(storage: Storage, result: ResultObject):
    """The result as written, without pixel data: what the KOS needs to reference it."""
    expected = storage.result_path(result.job_id, result.sop_instance_uid)  # checked UIDs, not the row's path
    try:
        return dcmread(storage.absolute(expected), stop_before_pixels=True)
    except FileNotFoundError:
        raise NotRetractable(f"result {result.sop_instance_uid} of job {result.job_id} is no longer stored "
                             "(removed by retention?); a rejection note cannot reference it") from None


def _encode(dataset) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def recall(session: Session, model_name: str, version: str, actor: str) -> None:
    """Disable a model as recalled: no new jobs run it, and the models page lists the results
    ``version`` produced for retraction. Audited."""
    version = (version or "").strip()
    if not version or len(version) > 64:
        raise ValueError("name the recalled version (at most 64 characters)")
    row = session.get(DisabledModel, model_name)
    if row is None:
        row = DisabledModel(name=model_name, disabled_by=actor)
        session.add(row)
    row.recalled_version = version
    audit.record(session, actor, RECALL, model_name, version=version)


def recalls(session: Session) -> dict[str, str]:
    """Recalled models: name -> the recalled version."""
    return dict(session.execute(select(DisabledModel.name, DisabledModel.recalled_version)
                                .where(DisabledModel.recalled_version.is_not(None))).all())
