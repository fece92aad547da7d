"""What the node knows, as SQL rows. Files hold pixels; rows hold facts and progress.

Every pipeline step commits its output here before the next step is told, so on restart
each unfinished step resumes from these rows (see dicom_ai_node/jobs/recovery in node.py).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, DateTime, Enum, Float, ForeignKey, Index, Integer, false,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; the node stores UTC everywhere."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


class Study(Base):
    __tablename__ = "study"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    # receiving -> complete (routed) ; back to receiving when more instances arrive
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[datetime | None]
    # when an association that sent instances of this study was released (completion signal)
    released_at: Mapped[datetime | None]
    quiet_period_s: Mapped[float | None] = mapped_column(Float)  # set by a matching rule's override

    series: Mapped[list["Series"]] = relationship(back_populates="study", order_by="Series.series_number")


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(ForeignKey("study.study_instance_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    # header of the first instance (keyword -> value), what routing rules are evaluated on
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    # set on series the node wrote itself, so results are never routed back into a model
    is_result: Mapped[bool] = mapped_column(default=False)
    # what the index could not read or found missing in the first header, one sentence each
    # (migration 0012); the instances are stored as received all the same
    header_notes: Mapped[list | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(Text)  # relative to the storage dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class RoutingDecision(Base):
    """One rule evaluated against one study at one completion, with its reasons."""

    __tablename__ = "routing_decision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(ForeignKey("study.study_instance_uid"), index=True)
    evaluation: Mapped[int] = mapped_column(Integer)  # 1 for the first completion, 2 after more arrived, ...
    rule_set_version: Mapped[int] = mapped_column(Integer)
    rule_name: Mapped[str] = mapped_column(String(128))
    matched: Mapped[bool]
    detail: Mapped[dict] = mapped_column(JSON)  # Decision.to_json(): selected series, models, reasons
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    encoding = "encoding"
    # results failed their quality checks under policy "hold": stored, not sent, until an admin
    # releases them (-> delivering) or rejects them (-> rejected)
    held = "held"
    delivering = "delivering"
    done = "done"
    failed = "failed"
    superseded = "superseded"  # more instances arrived; a newer job on the same series replaces it
    rejected = "rejected"  # held results an admin rejected: nothing is ever sent
    dropped = "dropped"  # results failed their quality checks under policy "drop": nothing sent
    # delivered results an admin took back (jobs/retraction.py): a rejection KOS is sent; a retry
    # runs the job again with new UIDs
    retracted = "retracted"

    @property
    def finished(self) -> bool:
        return self in (JobState.done, JobState.failed, JobState.superseded, JobState.rejected,
                        JobState.dropped, JobState.retracted)


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        # one job per model per exact set of input instances: re-evaluation never duplicates work
        UniqueConstraint("series_instance_uid", "model_name", "input_fingerprint", name="uq_job_input"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(ForeignKey("study.study_instance_uid"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    rule_name: Mapped[str] = mapped_column(String(128))
    destinations: Mapped[list] = mapped_column(JSON)
    input_fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the sorted SOP Instance UIDs
    input_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16),
                                            default=JobState.queued, index=True)
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed / was superseded / is held
    # what happens when its results fail their quality checks (hold | send_flagged | drop): the
    # routing rule's qc_fail when it has one, else None until the runner applies the node's default
    qc_policy: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)  # step -> seconds
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # the process running it (NodeProcess.name, migration 0010): only a dead process's jobs are taken back
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    # migration 0012: the repairs the fitness check made to its input before inference
    # (jobs/fitness.py), where a failed job stopped ("input": refused before inference,
    # "inference", "encoding": after inference, a bug), and whether a job that ends without a
    # result sends its destinations a notice (its rule's no_result_notice)
    input_notes: Mapped[list | None] = mapped_column(JSON)
    failed_step: Mapped[str | None] = mapped_column(String(16))
    no_result_notice: Mapped[bool] = mapped_column(default=False, server_default=false())

    results: Mapped[list["ResultObject"]] = relationship(back_populates="job", order_by="ResultObject.id")
    quality_checks: Mapped[list["QualityCheck"]] = relationship(order_by="QualityCheck.id")


class QualityCheck(Base):
    """One quality check of a job's result ([qc] in the model's model.toml) and its outcome
    (migration 0004). Written before the results are encoded; a re-run replaces them."""

    __tablename__ = "quality_check"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))  # e.g. "lung volume"
    value: Mapped[float | None] = mapped_column(Float)  # None: the output was absent
    low: Mapped[float | None] = mapped_column(Float)  # allowed range; None is open on that side
    high: Mapped[float | None] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(32))
    passed: Mapped[bool]
    message: Mapped[str] = mapped_column(Text)  # one sentence, no patient data
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)


class ResultObject(Base):
    """A DICOM object the node wrote (SEG, SR, key image, derived image)."""

    __tablename__ = "result_object"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # seg | sr | key_image | derived | rejection (a KOS)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the storage dir
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # taken back by an admin (migration 0007): a rejection KOS referencing it was sent
    retracted_at: Mapped[datetime | None]
    retraction_id: Mapped[int | None] = mapped_column(ForeignKey("retraction.id"), index=True)

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list["Delivery"]] = relationship(back_populates="result")


class Retraction(Base):
    """An admin took a job's delivered results back (migration 0007): a Key Object Selection
    "Rejected for Quality Reasons" referencing them went to the destinations that had them."""

    __tablename__ = "retraction"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kos_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))  # the rejection note sent


class Delivery(Base):
    """Outbox row: one result object to one destination."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_delivery"),
                      Index("ix_delivery_due", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_object.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]  # when it gave up for good (a dead letter; migration 0005)

    result: Mapped[ResultObject] = relationship(back_populates="deliveries")


class RuleSetVersion(Base):
    __tablename__ = "rule_set_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)  # the rules as TOML
    author: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # user, "cli", or "node"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


# ---- administration (web page and REST API; migration 0002)


class WebUser(Base):
    """A local user of the admin page and API; role "admin" may change things, "viewer" may not."""

    __tablename__ = "web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))  # scrypt$n$r$p$salt$hash
    role: Mapped[str] = mapped_column(String(16))  # admin | viewer
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # a disabled user cannot log in; its sessions and tokens are refused (migration 0006)
    disabled: Mapped[bool] = mapped_column(default=False)


class WebSession(Base):
    """A login session; the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "web_session"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class ApiToken(Base):
    """A token for scripts (Authorization: Bearer); only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    # migration 0006: the token's first characters (to tell tokens apart; None for older tokens)
    # and when it stops working (older tokens: 90 days after the upgrade)
    prefix: Mapped[str | None] = mapped_column(String(16))
    expires_at: Mapped[datetime]


class DestinationRow(Base):
    """A delivery destination. Seeded from config.toml [[destinations]] at start, then edited
    on the admin page; the outbox looks destinations up here."""

    __tablename__ = "destination"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # migration 0008: "dimse" (ae_title, host, port) or "dicomweb" (url, auth; deliver/dicomweb.py)
    kind: Mapped[str] = mapped_column(String(16), default="dimse", server_default="dimse")
    ae_title: Mapped[str | None] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(String(2048))  # DICOMweb base URL, nothing secret in it
    # from config only: the auth kind and where the secret is read at each send (a file or an
    # environment variable), never the password or token itself
    auth: Mapped[str] = mapped_column(String(8), default="none", server_default="none")
    username: Mapped[str | None] = mapped_column(String(255))
    secret_file: Mapped[str | None] = mapped_column(String(1024))
    secret_env: Mapped[str | None] = mapped_column(String(255))
    verify_tls: Mapped[bool] = mapped_column(default=True)
    ca_file: Mapped[str | None] = mapped_column(String(1024))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    backoff_s: Mapped[float] = mapped_column(Float, default=2.0)
    timeout_s: Mapped[float] = mapped_column(Float, default=30.0)
    tls: Mapped[dict | None] = mapped_column(JSON)  # {cert_file, key_file, ca_file} from config only
    # what config.toml said when this row was last seeded: a changed config entry wins at start
    config_values: Mapped[dict | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # paused by an admin (migration 0005): its deliveries stay pending, not attempted, until resumed
    paused_at: Mapped[datetime | None]
    paused_by: Mapped[str | None] = mapped_column(String(64))


class NodeProcess(Base):
    """A `serve` or `worker` process, seen alive at `last_seen_at` (migration 0010; cluster.py).
    Shown on the models page and in /metrics; a job claimed by a process not seen for a while
    is taken back."""

    __tablename__ = "node_process"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # host/role:port, host/worker:pid
    role: Mapped[str] = mapped_column(String(16))  # all | receiver | web | worker
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(16))  # workers: cpu | cuda
    queues: Mapped[str | None] = mapped_column(String(64))  # workers: "cpu,any"
    concurrency: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaderLease(Base):
    """Who runs the once-per-node duties (completion and routing, outbox, sweeps, retention):
    the holder renews it; another process takes it once it has expired (migration 0010)."""

    __tablename__ = "leader_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]


class DisabledModel(Base):
    """Models an admin switched off; the job runner refuses them (ModelRegistry.manifest)."""

    __tablename__ = "disabled_model"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    disabled_by: Mapped[str] = mapped_column(String(64))
    disabled_at: Mapped[datetime] = mapped_column(default=utcnow)
    # disabled as recalled (migration 0007): the version whose delivered results the models page
    # lists for retraction
    recalled_version: Mapped[str | None] = mapped_column(String(64))


class PriorFetch(Base):
    """An earlier study of the patient fetched for a job whose rule asks for priors (migration
    0009): the queries and the retrieve at the rule's source, and how they ended. The job is not
    claimed while its fetch is unfinished; a study that arrived as a prior is never routed."""

    __tablename__ = "prior_fetch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)  # the current study
    source: Mapped[str] = mapped_column(String(64))  # destination name
    # pending -> querying -> retrieving -> done | not_found | failed
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    criteria: Mapped[dict] = mapped_column(JSON, default=dict)  # the rule's priors table
    prior_study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    prior_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    prior_study_date: Mapped[str | None] = mapped_column(String(8))
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    received_instances: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[list] = mapped_column(JSON, default=list)  # each query / retrieve and its outcome
    reason: Mapped[str | None] = mapped_column(Text)  # why there is no prior (not found, failed)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def finished(self) -> bool:
        return self.state in PRIOR_FETCH_FINISHED


PRIOR_FETCH_FINISHED = ("done", "not_found", "failed")


class RetiredCount(Base):
    """What retention deleted of the rows /metrics counts (migration 0011): a Prometheus counter
    is the rows still here plus these, so it never goes down (dicom_ai_node/retired.py)."""

    __tablename__ = "retired_count"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # e.g. "instances_received"
    labels: Mapped[str] = mapped_column(String(200), primary_key=True, default="")  # e.g. "lung_ct_seg|pass"
    value: Mapped[int] = mapped_column(BigInteger, default=0)
