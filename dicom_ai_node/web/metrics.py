"""Prometheus metrics, read from the database at scrape time.

Counting from the rows (not in-memory counters) keeps the numbers right across restarts and
lets several processes share one database; a scrape costs a few aggregate queries.
"""

from __future__ import annotations

import shutil
from datetime import timezone
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from dicom_ai_node import retired
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Delivery, DestinationRow, Instance, Job, JobState, QualityCheck, Series, Study
from dicom_ai_node.deliver.destinations import delivery_counts

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PREFIX = "dicom_ai_node"


class NodeCollector:
    def __init__(self, database: Database, storage_dir: Path | None = None):
        self.database = database
        self.storage_dir = storage_dir

    def collect(self):
        with self.database.session() as session:
            gone = retired.totals(session)  # counted rows that retention deleted: counters never go down
            count, size = session.execute(
                select(func.count(Instance.sop_instance_uid), func.coalesce(func.sum(Instance.size_bytes), 0))
                .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                .where(Series.is_result.is_(False))).one()
            yield CounterMetricFamily(f"{PREFIX}_instances_received", "DICOM instances received and stored",
                                      value=count + gone.get((retired.INSTANCES_RECEIVED, ""), 0))
            yield CounterMetricFamily(f"{PREFIX}_received_bytes", "bytes of DICOM instances received",
                                      value=int(size) + gone.get((retired.RECEIVED_BYTES, ""), 0))
            completed = session.scalar(select(func.count()).where(Study.completed_at.is_not(None)))
            yield CounterMetricFamily(f"{PREFIX}_studies_completed", "studies that completed and were routed",
                                      value=completed + gone.get((retired.STUDIES_COMPLETED, ""), 0))

            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "jobs by state", labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], by_state.get(state, 0))
            yield jobs

            durations = session.execute(select(Job.started_at, Job.finished_at).where(
                Job.state == JobState.done, Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
            yield _histogram([(_utc(end) - _utc(start)).total_seconds() for start, end in durations])

            checks = session.execute(select(Job.model_name, QualityCheck.passed, func.count())
                                     .join(Job, Job.id == QualityCheck.job_id)
                                     .group_by(Job.model_name, QualityCheck.passed)).all()
            quality = CounterMetricFamily(f"{PREFIX}_qc_checks", "quality checks of results, by model and outcome",
                                          labels=["model", "outcome"])
            outcomes = {labels: value for (name, labels), value in gone.items() if name == retired.QC_CHECKS}
            for model, passed, count in checks:
                labels = f"{model}|{'pass' if passed else 'fail'}"
                outcomes[labels] = outcomes.get(labels, 0) + count
            for labels, count in sorted(outcomes.items()):
                quality.add_metric(labels.split("|", 1), count)
            yield quality
            yield GaugeMetricFamily(f"{PREFIX}_held_results", "jobs whose results wait for an admin to release "
                                    "or reject them (failed their quality checks under policy hold)",
                                    value=by_state.get(JobState.held, 0))

            failed = session.scalar(select(func.count()).where(Delivery.state == "failed"))
            yield CounterMetricFamily(f"{PREFIX}_delivery_failures", "deliveries given up after all retries",
                                      value=failed + gone.get((retired.DELIVERY_FAILURES, ""), 0))
            pending = session.scalar(select(func.count()).where(Delivery.state == "pending"))
            queue = GaugeMetricFamily(f"{PREFIX}_queue_depth", "work waiting", labels=["queue"])
            queue.add_metric(["jobs"], by_state.get(JobState.queued, 0))
            queue.add_metric(["deliveries"], pending)
            yield queue
            yield from _destinations(session)
            yield from _storage(session, self.storage_dir)
            yield from _processes(session)


def _processes(session):
    """The node's processes seen alive (cluster.py): by role, workers by device, and the leader."""
    from dicom_ai_node.cluster import live_processes
    from dicom_ai_node.db.models import LeaderLease

    alive = live_processes(session)
    processes = GaugeMetricFamily(f"{PREFIX}_processes", "serve and worker processes seen alive in the last "
                                  "minute, by role and (workers) device", labels=["role", "device"])
    slots = GaugeMetricFamily(f"{PREFIX}_worker_slots", "jobs the live workers can run at once, by device "
                              "(their --concurrency)", labels=["device"])
    counts: dict[tuple[str, str], int] = {}
    capacity: dict[str, int] = {}
    for process in alive:
        key = (process.role, process.device or "")
        counts[key] = counts.get(key, 0) + 1
        if process.role == "worker":
            capacity[process.device or ""] = capacity.get(process.device or "", 0) + (process.concurrency or 1)
    for (role, device), count in sorted(counts.items()):
        processes.add_metric([role, device], count)
    for device, count in sorted(capacity.items()):
        slots.add_metric([device], count)
    leader = session.scalar(select(LeaderLease.holder))
    yield from (processes, slots)
    yield GaugeMetricFamily(f"{PREFIX}_leader_alive", "1 while the process holding the leader lease (completion, "
                            "routing, outbox) is seen alive", value=int(leader in {p.name for p in alive}))


def _storage(session, storage_dir: Path | None):
    """Disk use of the storage file system, and the bytes of instances still stored (retention)."""
    stored = session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))
    yield GaugeMetricFamily(f"{PREFIX}_stored_instance_bytes", "bytes of instances stored now (received "
                            "minus what retention deleted)", value=int(stored))
    if storage_dir is None:
        return
    try:
        total, used, free = shutil.disk_usage(storage_dir)
    except OSError:
        return
    for name, value in (("total", total), ("used", used), ("free", free)):
        yield GaugeMetricFamily(f"{PREFIX}_storage_disk_{name}_bytes", f"{name} bytes of the storage file system",
                                value=value)


def _destinations(session):
    """Per destination: paused or not, deliveries pending and failed for good (dead letters)."""
    counts = delivery_counts(session)
    paused = dict(session.execute(select(DestinationRow.name, DestinationRow.paused_at.is_not(None))).all())
    yield GaugeMetricFamily(f"{PREFIX}_destinations_paused", "destinations an admin paused (their deliveries wait)",
                            value=sum(paused.values()))
    flags = GaugeMetricFamily(f"{PREFIX}_destination_paused", "1 while the destination is paused",
                              labels=["destination"])
    waiting = GaugeMetricFamily(f"{PREFIX}_deliveries_pending", "deliveries waiting to be sent, per destination",
                                labels=["destination"])
    dead = GaugeMetricFamily(f"{PREFIX}_dead_letters", "deliveries that failed for good, per destination "
                             "(until retried)", labels=["destination"])
    for name in sorted(set(paused) | set(counts)):
        flags.add_metric([name], int(bool(paused.get(name))))
        waiting.add_metric([name], counts.get(name, {}).get("pending", 0))
        dead.add_metric([name], counts.get(name, {}).get("failed", 0))
    yield from (flags, waiting, dead)


def _utc(moment):
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _histogram(values: list[float]) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), sum(1 for v in values if v <= bound)) for bound in DURATION_BUCKETS]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(f"{PREFIX}_job_duration_seconds", "time from start to done of done jobs",
                                 buckets=buckets, sum_value=sum(values))


def render(database: Database, storage_dir: Path | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(database, storage_dir))
    return generate_latest(registry)
