"""Completion and routing on a real SQLite index, in-process: decisions stored with reasons,
jobs created once per exact input, superseded when more instances arrive."""

from __future__ import annotations

from datetime import timedelta, timezone

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_ai_node.completion import CompletionWatcher
from dicom_ai_node.db.models import Job, JobState, RoutingDecision, Study
from dicom_ai_node.index import ReceivedInstance, record_instance
from dicom_ai_node.router import Router, RuleStore

RULES = [
    {"name": "chest", "priority": 10, "models": ["lung_ct_seg"], "destinations": ["pacs"],
     "when": {"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "BodyPartExamined", "equals": "CHEST"}]}},
    {"name": "head", "priority": 5, "models": ["lung_ct_seg"], "destinations": ["pacs"],
     "when": {"tag": "BodyPartExamined", "equals": "HEAD"}},
]


def receive(database, series: str, sop: str, body_part: str = "CHEST", study: str = "1.2.3"):
    header = Dataset()
    header.Modality, header.BodyPartExamined, header.PatientID = "CT", body_part, "P"
    with database.session() as session:
        return record_instance(session, ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.2",
                                                         "1.2.840.10008.1.2.1", f"x/{sop}.dcm", 1,
                                                         "STORESCU", header))


def make_router(database, submitted):
    rules = RuleStore(database)
    rules.seed_from_config(RULES)
    return Router(database, rules, submitted.append), rules


def test_route_stores_decisions_with_reasons_and_creates_one_job(database):
    for i in range(3):
        receive(database, "1.2.3.1", f"1.2.3.1.{i}")
    receive(database, "1.2.3.2", "1.2.3.2.1", body_part="HEAD")
    submitted = []
    router, _ = make_router(database, submitted)
    jobs = router.route("1.2.3")
    assert jobs == submitted and len(jobs) == 2  # chest series and head series
    with database.session() as session:
        decisions = {d.rule_name: d for d in session.scalars(select(RoutingDecision))}
        assert decisions["chest"].matched and decisions["chest"].detail["selected_series"] == ["1.2.3.1"]
        assert any("HEAD" in reason for reason in decisions["chest"].detail["reasons"])
        assert session.get(Study, "1.2.3").state == "complete"
    assert router.route("1.2.3") == []  # already complete


def test_more_instances_supersede_the_unfinished_job_and_same_input_never_duplicates(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    submitted = []
    router, _ = make_router(database, submitted)
    [first] = router.route("1.2.3")
    assert receive(database, "1.2.3.1", "1.2.3.1.1") is False  # resend: not new, study stays complete
    assert router.route("1.2.3") == []
    assert receive(database, "1.2.3.1", "1.2.3.1.2") is True
    with database.session() as session:
        assert session.get(Study, "1.2.3").state == "receiving"
    [second] = router.route("1.2.3")
    with database.session() as session:
        assert session.get(Job, first).state == JobState.superseded
        assert session.get(Job, second).input_count == 2
        assert session.scalars(select(RoutingDecision.evaluation).distinct()).all() == [1, 2]


def test_a_new_rule_set_version_applies_without_restart(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    submitted = []
    router, rules = make_router(database, submitted)
    with database.session() as session:
        rules.save(session, '[[rules]]\nname = "none"\npriority = 1\nmodels = ["m"]\ndestinations = []\n'
                            'when = { tag = "Modality", equals = "MR" }\n', author="admin")
    assert router.route("1.2.3") == []
    with database.session() as session:
        assert [d.rule_name for d in session.scalars(select(RoutingDecision))] == ["none"]


def test_rule_quiet_period_override_holds_completion(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    rules = RuleStore(database)
    rules.seed_from_config([{**RULES[0], "quiet_period_s": 30}])
    router = Router(database, rules, lambda job_id: None)
    assert router.quiet_enough("1.2.3", 5.0) is False
    assert router.quiet_enough("1.2.3", 31.0) is True


def test_completion_after_quiet_period_and_after_release(database):
    completed: list[str] = []

    def on_complete(study_uid):
        completed.append(study_uid)
        with database.session() as session:
            session.get(Study, study_uid).state = "complete"

    watcher = CompletionWatcher(database, quiet_period_s=5.0, release_grace_s=1.0,
                                quiet_enough=lambda uid, quiet: True, on_complete=on_complete)
    receive(database, "1.2.3.1", "1.2.3.1.1")
    with database.session() as session:
        last = session.get(Study, "1.2.3").last_received_at.replace(tzinfo=timezone.utc)
    assert watcher.check(last + timedelta(seconds=4.9)) == []
    assert watcher.check(last + timedelta(seconds=5.0)) == ["1.2.3"]
    assert watcher.check(last + timedelta(seconds=60)) == []  # complete already

    receive(database, "1.2.4.1", "1.2.4.1.1", study="1.2.4")
    with database.session() as session:
        study = session.get(Study, "1.2.4")
        study.released_at = released = study.last_received_at.replace(tzinfo=timezone.utc)
    assert watcher.check(released + timedelta(seconds=0.9)) == []
    assert watcher.check(released + timedelta(seconds=1.0)) == ["1.2.4"]  # long before the quiet period


def test_release_does_not_complete_when_more_arrived_after_it(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    with database.session() as session:
        study = session.get(Study, "1.2.3")
        released = study.last_received_at.replace(tzinfo=timezone.utc)
        study.released_at = released - timedelta(seconds=3)  # another association still sending
    watcher = CompletionWatcher(database, quiet_period_s=5.0, release_grace_s=1.0,
                                quiet_enough=lambda uid, quiet: True, on_complete=lambda uid: None)
    assert watcher.check(released + timedelta(seconds=2)) == []
    assert watcher.check(released + timedelta(seconds=5)) == ["1.2.3"]


def test_a_delivering_job_is_not_superseded(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    router, _ = make_router(database, [])
    [first] = router.route("1.2.3")
    with database.session() as session:
        session.get(Job, first).state = JobState.delivering  # its results exist and are being sent
    receive(database, "1.2.3.1", "1.2.3.1.2")
    [second] = router.route("1.2.3")
    with database.session() as session:
        assert session.get(Job, first).state == JobState.delivering
        assert session.get(Job, second).state == JobState.queued


def test_a_held_job_is_superseded_and_can_no_longer_be_released(database):
    from dicom_ai_node.jobs import review

    receive(database, "1.2.3.1", "1.2.3.1.1")
    router, _ = make_router(database, [])
    [first] = router.route("1.2.3")
    with database.session() as session:
        session.get(Job, first).state = JobState.held  # its results failed their quality checks
    receive(database, "1.2.3.1", "1.2.3.1.2")
    [second] = router.route("1.2.3")
    with database.session() as session:
        held = session.get(Job, first)
        assert held.state == JobState.superseded and "replaced by a newer job" in held.reason
        assert session.get(Job, second).state == JobState.queued
    with database.session() as session, pytest.raises(review.NotHeld, match="is superseded"):
        review.release(session, first, "alice")


def test_the_rule_qc_fail_is_recorded_on_the_job(database):
    receive(database, "1.2.3.1", "1.2.3.1.1")
    rules = RuleStore(database)
    rules.seed_from_config([{**RULES[0], "qc_fail": "send_flagged"}])
    [job_id] = Router(database, rules, lambda job_id: None).route("1.2.3")
    with database.session() as session:
        assert session.get(Job, job_id).qc_policy == "send_flagged"
        decision = session.scalars(select(RoutingDecision)).one()
        assert decision.detail["qc_fail"] == "send_flagged"  # shown with the decision's reasons
