"""Retention (issue 13 §1): real SQLite database, real files, an injected clock and disk usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from dicom_ai_node import retention as retention_module
from dicom_ai_node.config import ConfigError, RetentionConfig, load_config
from dicom_ai_node.db.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobState,
    QualityCheck,
    ResultObject,
    Series,
    Study,
)
from dicom_ai_node.retention import Retention
from dicom_ai_node.storage import Storage
from dicom_ai_node.web import metrics

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ROOT = "1.2.826.0.1.3680043.10.999"
SIZE = 1000


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def add_study(database, storage, n: int, received_days: float, job: JobState | None = None,
              finished_days: float | None = None, delivery: str | None = None, instances: int = 2) -> str:
    """A study with ``instances`` real files, and optionally one job with one result (a real
    file) and one delivery of it."""
    study_uid, series_uid = f"{ROOT}.{n}", f"{ROOT}.{n}.1"
    with database.session() as session:
        session.add(Study(study_instance_uid=study_uid, state="complete", first_received_at=ago(received_days),
                          last_received_at=ago(received_days), completed_at=ago(received_days)))
        session.add(Series(series_instance_uid=series_uid, study_instance_uid=study_uid, modality="CT"))
        session.flush()
        for i in range(1, instances + 1):
            sop = f"{series_uid}.{i}"
            path = storage.instance_path(study_uid, series_uid, sop)
            storage.write_atomic(path, b"i" * SIZE)
            session.add(Instance(sop_instance_uid=sop, series_instance_uid=series_uid, sop_class_uid="1.2",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size_bytes=SIZE,
                                 received_at=ago(received_days)))
        if job is not None:
            finished = ago(finished_days) if finished_days is not None else None
            row = Job(study_instance_uid=study_uid, series_instance_uid=series_uid, model_name="m",
                      rule_name="r", destinations=["pacs"], input_fingerprint=f"fp{n}", input_count=instances,
                      state=job, created_at=ago(received_days), finished_at=finished)
            session.add(row)
            session.flush()
            sop = f"{ROOT}.{n}.9.1"
            path = storage.result_path(row.id, sop)
            storage.write_atomic(path, b"r" * 300)
            result = ResultObject(job_id=row.id, kind="seg", sop_instance_uid=sop, sop_class_uid="1.2",
                                  series_instance_uid=f"{ROOT}.{n}.9", path=path)
            session.add(result)
            session.flush()
            if delivery is not None:
                session.add(Delivery(result_id=result.id, destination="pacs", state=delivery,
                                     sent_at=finished if delivery == "sent" else None,
                                     failed_at=finished if delivery == "failed" else None))
        session.commit()
    return study_uid


def counts(database, study_uid: str) -> tuple[int, int, bool]:
    """(instance rows, result rows, study row present)."""
    with database.session() as session:
        instances = session.scalar(select(func.count()).select_from(Instance).join(Series).where(
            Series.study_instance_uid == study_uid))
        results = session.scalar(select(func.count()).select_from(ResultObject).join(Job).where(
            Job.study_instance_uid == study_uid))
        return instances, results, session.get(Study, study_uid) is not None


def files(storage, study_uid: str) -> int:
    folder = storage.absolute(f"instances/{study_uid}")
    return sum(1 for p in folder.rglob("*.dcm")) if folder.exists() else 0


def all_rows_have_files_and_files_rows(database, storage) -> None:
    with database.session() as session:
        paths = set(session.scalars(select(Instance.path))) | set(session.scalars(select(ResultObject.path)))
    on_disk = {str(p.relative_to(storage.root)) for top in ("instances", "results")
               for p in storage.absolute(top).rglob("*.dcm")}
    assert paths == on_disk


@pytest.fixture
def storage(tmp_path):
    return Storage(tmp_path / "storage")


def retention(database, storage, disk=lambda: (100, 10, 90), **config) -> Retention:
    return Retention(RetentionConfig(**config), database, storage, clock=lambda: NOW, disk_usage=disk)


def scenario(database, storage) -> dict[str, str]:
    return {
        "old_done": add_study(database, storage, 1, 100, JobState.done, 95, "sent"),
        "old_instances": add_study(database, storage, 2, 40, JobState.done, 40, "sent"),
        "pending_delivery": add_study(database, storage, 3, 100, JobState.delivering, None, "pending"),
        "held": add_study(database, storage, 4, 100, JobState.held),
        "running": add_study(database, storage, 5, 100, JobState.running),
        "no_job": add_study(database, storage, 6, 31),
        "failed": add_study(database, storage, 7, 100, JobState.failed, 100, "failed"),
        "recent": add_study(database, storage, 8, 1, JobState.done, 1, "sent"),
        "resent_delivery": add_study(database, storage, 9, 100, JobState.done, 95, "pending"),
    }


def test_old_studies_and_results_go_while_what_is_needed_stays(database, storage):
    studies = scenario(database, storage)
    report = retention(database, storage).run()

    # past results_days: files, rows and at last the study itself are gone, folders too
    assert counts(database, studies["old_done"]) == (0, 0, False)
    assert files(storage, studies["old_done"]) == 0
    assert not storage.absolute(f"instances/{studies['old_done']}").exists()
    # past instances_days only: instances gone, its results (and the study) kept
    assert counts(database, studies["old_instances"]) == (0, 1, True)
    assert counts(database, studies["no_job"]) == (0, 0, True)
    # needed: a pending delivery (also one put back by a resend), a held result, a running job
    for name in ("pending_delivery", "resent_delivery", "held", "running"):
        assert counts(database, studies[name]) == (2, 1, True), name
        assert files(storage, studies[name]) == 2, name
    # failed studies are kept for failed_days, recent ones for instances_days
    assert counts(database, studies["failed"]) == (2, 1, True)
    assert counts(database, studies["recent"]) == (2, 1, True)
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Delivery).join(ResultObject).join(Job).where(
            Job.study_instance_uid == studies["pending_delivery"])) == 1

    assert (report.instances, report.instance_bytes) == (6, 6 * SIZE)
    assert (report.results, report.result_bytes, report.studies_forgotten) == (1, 300, 1)
    all_rows_have_files_and_files_rows(database, storage)
    with database.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "retention.run")).one()
        assert event.detail["instances"] == 6 and event.detail["instance_bytes"] == 6 * SIZE
        assert ROOT not in str(event.detail)  # counts only, no identifiers

    # a second run finds nothing more to do
    again = retention(database, storage).run()
    assert (again.instances, again.results, again.studies_forgotten) == (0, 0, 0)


def test_a_dry_run_deletes_nothing_and_reports_what_a_run_would_free(database, storage):
    studies = scenario(database, storage)
    before = {name: counts(database, uid) for name, uid in studies.items()}
    dry = retention(database, storage).run(dry_run=True)
    assert {name: counts(database, uid) for name, uid in studies.items()} == before
    assert sum(files(storage, uid) for uid in studies.values()) == 18
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
    real = retention(database, storage).run()
    assert (dry.instances, dry.instance_bytes, dry.results, dry.result_bytes, dry.studies_forgotten) == (
        real.instances, real.instance_bytes, real.results, real.result_bytes, real.studies_forgotten)


def test_a_crash_in_the_middle_is_finished_by_the_next_run(database, storage, monkeypatch):
    old = [add_study(database, storage, n, 100, JobState.done, 95, "sent", instances=5) for n in (1, 2)]
    kept = add_study(database, storage, 3, 100, JobState.delivering, None, "pending", instances=5)
    monkeypatch.setattr(retention_module, "BATCH", 2)
    real_remove, removed = storage.remove, []

    def crash_after_seven(relative):
        if len(removed) == 7:
            raise OSError("simulated crash")
        real_remove(relative)
        removed.append(relative)

    monkeypatch.setattr(storage, "remove", crash_after_seven)
    with pytest.raises(OSError):
        retention(database, storage).run()
    # whatever was committed, no file is left without its row
    with database.session() as session:
        paths = set(session.scalars(select(Instance.path))) | set(session.scalars(select(ResultObject.path)))
    on_disk = {str(p.relative_to(storage.root)) for p in storage.root.rglob("*.dcm")}
    assert on_disk <= paths
    assert len(paths - on_disk) == 1  # the batch cut short: rows whose files went first

    monkeypatch.setattr(storage, "remove", real_remove)
    retention(database, storage).run()
    for uid in old:
        assert counts(database, uid) == (0, 0, False)
        assert not storage.absolute(f"instances/{uid}").exists()
    assert counts(database, kept) == (5, 1, True) and files(storage, kept) == 5
    all_rows_have_files_and_files_rows(database, storage)


def test_above_the_high_watermark_the_oldest_go_first_until_below_low(database, storage):
    # recent studies (within instances_days), oldest first: 5, 4, 3, 2 days; and an older one
    # with a pending delivery, which stays whatever the disk
    young = {days: add_study(database, storage, 10 + days, days) for days in (5, 4, 3, 2)}
    pending = add_study(database, storage, 20, 10, JobState.delivering, None, "pending")
    total = 20_000

    def disk():  # a disk of 20 000 bytes: 8 000 taken by other things, the rest our files
        used = 8_000 + sum(p.stat().st_size for p in storage.root.rglob("*.dcm"))
        return total, used, total - used

    assert disk()[1] / total > 0.9
    report = retention(database, storage, disk=disk).run()
    assert report.watermark
    assert counts(database, young[5])[0] == 0 and counts(database, young[4])[0] == 0
    assert counts(database, young[3])[0] == 2 and counts(database, young[2])[0] == 2  # below low: stopped
    assert counts(database, pending) == (2, 1, True)
    assert disk()[1] / total < 0.8 and report.disk_used_percent < 80
    all_rows_have_files_and_files_rows(database, storage)


def test_scheduled_runs_daily_or_when_the_disk_is_high(database, storage):
    add_study(database, storage, 1, 100)
    clock = [NOW]
    usage = [(100, 10, 90)]
    job = Retention(RetentionConfig(), database, storage, clock=lambda: clock[0], disk_usage=lambda: usage[0])
    assert job.scheduled() is not None  # first check: a full run
    assert job.scheduled() is None  # the same day, disk low: nothing
    usage[0] = (100, 95, 5)
    assert job.scheduled() is not None  # disk high: at once
    usage[0] = (100, 10, 90)
    clock[0] = NOW + timedelta(days=1, minutes=1)
    assert job.scheduled() is not None
    off = Retention(RetentionConfig(enabled=False), database, storage, clock=lambda: NOW)
    assert off.scheduled() is None


def test_metrics_show_disk_use_and_stored_bytes(database, storage):
    add_study(database, storage, 1, 1)
    text = metrics.render(database, storage.root).decode()
    for name in ("storage_disk_total_bytes", "storage_disk_used_bytes", "storage_disk_free_bytes"):
        assert f"dicom_ai_node_{name} " in text
    assert f"dicom_ai_node_stored_instance_bytes {float(2 * SIZE)}" in text


def metric_values(database, storage) -> dict[str, float]:
    """Every sample of /metrics: 'name{labels}' -> value."""
    text = metrics.render(database, storage.root).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_counters_in_metrics_never_go_down_when_retention_deletes_their_rows(database, storage):
    studies = scenario(database, storage)
    with database.session() as session:  # QC checks of two jobs whose rows retention will delete
        for name, passed in (("old_done", True), ("failed", False)):
            job = session.scalars(select(Job).where(Job.study_instance_uid == studies[name])).one()
            session.add(QualityCheck(job_id=job.id, name="lung volume", value=1.0, unit="mL", passed=passed,
                                        message="ok" if passed else "too small"))
        session.commit()
    counters = ("dicom_ai_node_instances_received_total", "dicom_ai_node_received_bytes_total",
                "dicom_ai_node_studies_completed_total", "dicom_ai_node_delivery_failures_total",
                'dicom_ai_node_qc_checks_total{model="m",outcome="pass"}',
                'dicom_ai_node_qc_checks_total{model="m",outcome="fail"}')
    before = metric_values(database, storage)
    assert [before[name] for name in counters] == [18, 18 * SIZE, 9, 1, 1, 1]

    report = retention(database, storage, failed_days=60).run()
    assert report.studies_forgotten == 2 and report.instances == 8  # old_done and failed: rows and all
    after = metric_values(database, storage)
    assert [after[name] for name in counters] == [before[name] for name in counters]
    assert after["dicom_ai_node_stored_instance_bytes"] == 10 * SIZE  # the gauge does go down
    # and they go on counting from there
    add_study(database, storage, 20, 1)
    assert metric_values(database, storage)["dicom_ai_node_instances_received_total"] == 20
    again = retention(database, storage, failed_days=60).run()
    assert again.instances == 0
    assert metric_values(database, storage)["dicom_ai_node_instances_received_total"] == 20


def test_retention_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[node]\nallow_any_caller = true\n")
    assert load_config(path).retention == RetentionConfig(enabled=True, instances_days=30, results_days=90,
                                                          failed_days=180, high_watermark_percent=90,
                                                          low_watermark_percent=80)
    path.write_text("[node]\nallow_any_caller = true\n[retention]\ninstances_days = 7\nenabled = false\n")
    config = load_config(path).retention
    assert config.instances_days == 7 and not config.enabled
    path.write_text("[node]\nallow_any_caller = true\n[retention]\nlow_watermark_percent = 95\n")
    with pytest.raises(ConfigError, match="retention.low_watermark_percent"):
        load_config(path)
    path.write_text("[node]\nallow_any_caller = true\n[retention]\nresults_days = 0\n")
    with pytest.raises(ConfigError, match="retention.results_days"):
        load_config(path)


def test_cli_dry_run_and_run(tmp_path, capsys):
    from dicom_ai_node.cli import main

    path = tmp_path / "config.toml"
    path.write_text(f'[node]\nallow_any_caller = true\nstorage_dir = "{tmp_path / "s"}"\n'
                    f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')
    assert main(["--config", str(path), "retention", "run", "--dry-run"]) == 0
    assert "would free 0 instances" in capsys.readouterr().out
    assert main(["--config", str(path), "retention", "run"]) == 0
    assert "freed 0 instances" in capsys.readouterr().out
