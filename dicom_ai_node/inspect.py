"""Read-only views of what the node knows about a study (used by the CLI, the web API and pages)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_ai_node.db.models import Instance, Job, QualityCheck, RoutingDecision, Series, Study
from dicom_ai_node.priors.fetcher import fetches_json


def list_studies(session: Session, limit: int = 50, offset: int = 0, *, state: str | None = None,
                 patient_id: str | None = None, text: str | None = None, job_state: str | None = None,
                 model: str | None = None) -> list[dict]:
    """Newest first. Filters: study state, exact patient ID, text in the patient name, study
    description, accession number or Study UID, and studies with a job in a state / of a model."""
    instance_counts = (select(Series.study_instance_uid, func.count(Instance.sop_instance_uid).label("n"))
                       .join(Instance, Instance.series_instance_uid == Series.series_instance_uid)
                       .group_by(Series.study_instance_uid).subquery())
    query = (select(Study, instance_counts.c.n)
             .join(instance_counts, instance_counts.c.study_instance_uid == Study.study_instance_uid))
    if state:
        query = query.where(Study.state == state)
    if patient_id:
        query = query.where(Study.patient_id == patient_id)
    if text:
        pattern = f"%{text}%"
        query = query.where(Study.patient_name.ilike(pattern) | Study.study_description.ilike(pattern)
                            | Study.accession_number.ilike(pattern) | Study.study_instance_uid.ilike(pattern))
    if job_state or model:
        jobs = select(Job.study_instance_uid)
        if job_state:
            jobs = jobs.where(Job.state == job_state)
        if model:
            jobs = jobs.where(Job.model_name == model)
        query = query.where(Study.study_instance_uid.in_(jobs))
    rows = session.execute(query.order_by(Study.last_received_at.desc()).limit(limit).offset(offset)).all()
    studies = []
    for study, count in rows:
        jobs = session.scalars(select(Job.state).where(Job.study_instance_uid == study.study_instance_uid)).all()
        studies.append({
            "study_instance_uid": study.study_instance_uid, "state": study.state,
            "patient_id": study.patient_id, "patient_name": study.patient_name,
            "study_date": study.study_date,
            "description": study.study_description, "instances": count,
            "last_received_at": study.last_received_at,
            "jobs": {state.value: list(jobs).count(state) for state in set(jobs)},
        })
    return studies


def study_detail(session: Session, study_uid: str, with_instances: bool = False) -> dict | None:
    """Everything about one study; `with_instances` adds each series' instances."""
    study = session.get(Study, study_uid)
    if study is None:
        return None
    series = []
    for item in study.series:
        count = session.scalar(select(func.count()).where(Instance.series_instance_uid == item.series_instance_uid))
        entry = {"series_instance_uid": item.series_instance_uid, "number": item.series_number,
                 "modality": item.modality, "description": item.series_description,
                 "instances": count, "is_result": item.is_result, "header_notes": item.header_notes or []}
        if with_instances:
            instances = session.scalars(select(Instance).where(
                Instance.series_instance_uid == item.series_instance_uid)
                .order_by(Instance.instance_number, Instance.sop_instance_uid)).all()
            entry["instance_list"] = [{
                "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
                "instance_number": i.instance_number, "transfer_syntax_uid": i.transfer_syntax_uid,
                "size_bytes": i.size_bytes, "calling_ae_title": i.calling_ae_title,
                "received_at": i.received_at} for i in instances]
        series.append(entry)
    decisions = session.scalars(select(RoutingDecision).where(RoutingDecision.study_instance_uid == study_uid)
                                .order_by(RoutingDecision.evaluation, RoutingDecision.id)).all()
    jobs = session.scalars(select(Job).where(Job.study_instance_uid == study_uid).order_by(Job.id)).all()
    prior_fetches = fetches_json(session, study_uid)
    prior_of_job = {f["job_id"]: f["summary"] for f in prior_fetches if not f["is_prior_here"]}
    return {
        "study_instance_uid": study.study_instance_uid, "state": study.state,
        "patient_id": study.patient_id, "patient_name": study.patient_name,
        "study_date": study.study_date, "accession_number": study.accession_number,
        "description": study.study_description, "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at, "completed_at": study.completed_at,
        "series": series,
        "prior_fetches": prior_fetches,
        "decisions": [{"evaluation": d.evaluation, "rule_set_version": d.rule_set_version,
                       "rule": d.rule_name, "matched": d.matched, "detail": d.detail,
                       "at": d.created_at} for d in decisions],
        "jobs": [{
            "id": job.id, "model": job.model_name, "model_version": job.model_version,
            "rule": job.rule_name, "series_instance_uid": job.series_instance_uid,
            "state": job.state.value, "reason": job.reason, "attempts": job.attempts,
            "failed_step": job.failed_step, "input_notes": job.input_notes or [],
            "timings": job.timings, "created_at": job.created_at, "finished_at": job.finished_at,
            "qc_policy": job.qc_policy, "quality_checks": quality_checks_json(job.quality_checks),
            "prior": prior_of_job.get(job.id),
            "results": [{
                "id": result.id, "kind": result.kind, "sop_instance_uid": result.sop_instance_uid,
                "series_instance_uid": result.series_instance_uid, "path": result.path,
                "retracted_at": result.retracted_at,
                "deliveries": [{"id": d.id, "destination": d.destination, "state": d.state,
                                "attempts": d.attempts, "last_error": d.last_error,
                                "sent_at": d.sent_at} for d in result.deliveries],
            } for result in job.results],
        } for job in jobs],
    }


def quality_checks_json(checks: list[QualityCheck]) -> list[dict]:
    """A job's quality checks: what was checked, the value, the allowed range, the outcome."""
    return [{"name": c.name, "value": c.value, "low": c.low, "high": c.high, "unit": c.unit,
             "passed": c.passed, "message": c.message, "checked_at": c.checked_at} for c in checks]


def format_study_list(studies: list[dict]) -> str:
    if not studies:
        return "no studies received yet"
    lines = [f"{'STUDY INSTANCE UID':64}  {'STATE':9}  {'DATE':8}  {'INST':>5}  JOBS"]
    for study in studies:
        jobs = ", ".join(f"{n} {state}" for state, n in sorted(study["jobs"].items())) or "-"
        lines.append(f"{study['study_instance_uid']:64}  {study['state']:9}  {study['study_date'] or '':8}  "
                     f"{study['instances']:>5}  {jobs}")
    return "\n".join(lines)


def format_study(detail: dict) -> str:
    lines = [f"Study {detail['study_instance_uid']}  [{detail['state']}]",
             f"  patient {detail['patient_id'] or '-'}  date {detail['study_date'] or '-'}  "
             f"accession {detail['accession_number'] or '-'}  {detail['description'] or ''}",
             "Series:"]
    for series in detail["series"]:
        lines.append(f"  #{series['number'] if series['number'] is not None else '-':<5} {series['modality'] or '':4} "
                     f"{series['instances']:>5} inst  {series['description'] or ''}  ({series['series_instance_uid']})")
        for note in series["header_notes"]:
            lines.append(f"      header: {note}")
    lines.append("Routing decisions:")
    if not detail["decisions"]:
        lines.append("  (none yet: the study is not complete)")
    for decision in detail["decisions"]:
        verdict = "MATCHED" if decision["matched"] else "no match"
        lines.append(f"  evaluation {decision['evaluation']} (rules v{decision['rule_set_version']}): "
                     f"{decision['rule']}: {verdict}")
        for reason in decision["detail"].get("reasons", []):
            lines.append(f"      {reason}")
    lines.append("Jobs:")
    if not detail["jobs"]:
        lines.append("  (none)")
    for job in detail["jobs"]:
        timing = ", ".join(f"{k} {v}" for k, v in job["timings"].items() if k.endswith("_s"))
        lines.append(f"  job {job['id']}: {job['model']} {job['model_version'] or ''} [{job['state']}] "
                     f"rule {job['rule']}  {timing}")
        if job["reason"]:
            step = {"input": " (refused before inference)", "inference": " (in inference)",
                    "quality": " (in the quality checks)", "encoding": " (after inference)"}.get(job["failed_step"], "")
            lines.append(f"      reason{step}: {job['reason']}")
        for note in job["input_notes"]:
            lines.append(f"      input repaired: {note}")
        if job["quality_checks"]:
            lines.append(f"      quality checks (on failure: {job['qc_policy']}):")
        for check in job["quality_checks"]:
            lines.append(f"        {'PASS' if check['passed'] else 'FAIL'}  {check['message']}")
        for result in job["results"]:
            for delivery in result["deliveries"]:
                error = f" ({delivery['last_error']})" if delivery["last_error"] else ""
                lines.append(f"      {result['kind']:9} {result['sop_instance_uid']} -> "
                             f"{delivery['destination']}: {delivery['state']}, "
                             f"{delivery['attempts']} attempt(s){error}")
    return "\n".join(lines)
