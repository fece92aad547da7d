"""A routing rule's ``quiet_period_s`` holds even when the sender releases its association
(issue 10): before, an association release completed the study ``release_grace_s`` later
whatever the rules asked for, so a study sent in several associations (an MR protocol, one
association per sequence) was routed after its first part.

In process with the real completion code, router and an SQLite index; then with a real node
and storescu.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, timedelta

import pytest
from pydicom.dataset import Dataset

from dicom_ai_node.completion import CompletionWatcher
from dicom_ai_node.db.models import Study
from dicom_ai_node.index import ReceivedInstance, record_instance
from dicom_ai_node.router import Router, RuleStore
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series

RULE = {"name": "slow-protocol", "priority": 10, "models": ["lung_ct_seg"], "destinations": [],
        "when": {"tag": "Modality", "equals": "CT"}}


def receive_and_release(database, study: str, modality: str = "CT"):
    """One instance, then its association released: returns the release time."""
    header = Dataset()
    header.Modality, header.PatientID = modality, "P"
    with database.session() as session:
        record_instance(session, ReceivedInstance(study, f"{study}.1", f"{study}.1.1", "1.2.840.10008.5.1.4.1.1.2",
                                                  "1.2.840.10008.1.2.1", "x.dcm", 1, "STORESCU", header))
    with database.session() as session:
        row = session.get(Study, study)
        row.released_at = released = row.last_received_at.replace(tzinfo=UTC)
    return released


def watcher_with_rules(database, rules):
    store = RuleStore(database)
    store.seed_from_config(rules)
    router = Router(database, store, lambda job_id: None)
    return CompletionWatcher(database, quiet_period_s=5.0, release_grace_s=1.0,
                             quiet_enough=router.quiet_enough, on_complete=router.route)


def test_release_waits_for_the_rule_quiet_period(database):
    watcher = watcher_with_rules(database, [{**RULE, "quiet_period_s": 30}])
    released = receive_and_release(database, "1.2.3")
    assert watcher.check(released + timedelta(seconds=1)) == []  # before issue 10: complete here
    assert watcher.check(released + timedelta(seconds=29.9)) == []
    assert watcher.check(released + timedelta(seconds=30)) == ["1.2.3"]


def test_release_still_completes_early_when_no_matching_rule_asks_for_a_wait(database):
    watcher = watcher_with_rules(database, [{**RULE, "quiet_period_s": 30}])
    released = receive_and_release(database, "1.2.4", modality="MR")  # the rule does not match
    assert watcher.check(released + timedelta(seconds=1)) == ["1.2.4"]  # not the node's 5 s either


def test_without_release_the_node_period_and_the_rule_period_both_hold(database):
    watcher = watcher_with_rules(database, [{**RULE, "quiet_period_s": 2}])
    released = receive_and_release(database, "1.2.5")
    with database.session() as session:
        session.get(Study, "1.2.5").released_at = None  # the sender keeps its association open
    assert watcher.check(released + timedelta(seconds=4.9)) == []  # the rule's 2 s are not enough
    assert watcher.check(released + timedelta(seconds=5)) == ["1.2.5"]


RULES = """
[[rules]]
name = "slow-protocol"
priority = 10
models = ["lung_ct_seg"]
destinations = []
quiet_period_s = 15
when = { tag = "Modality", equals = "CT" }
"""
SCANNER_PAUSE_S = 3  # between the two associations: longer than the release grace, shorter than the rule's wait


@pytest.mark.integration
@skip_unless_tools("storescu")
def test_study_sent_in_two_associations_is_routed_once_with_all_its_instances(tmp_path):
    """storescu sends half a series, releases, pauses, sends the rest. The rule's 15 s hold: one
    routing, one job on all 6 instances (before issue 10: routed after the first half, then
    again with a second job)."""
    series = make_ct_series(tmp_path / "ct", shape=(6, 16, 16), seed="two-associations")
    with NodeProcess(tmp_path / "node", rules=RULES) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, series.paths[:3], NODE_AE))
        database = tmp_path / "node" / "node.db"

        def released() -> bool:
            with sqlite3.connect(database) as connection:
                row = connection.execute("select released_at from study").fetchone()
            return row is not None and row[0] is not None

        wait_for(released, timeout=30, what="the first association's release recorded")
        time.sleep(SCANNER_PAUSE_S)  # the scanner between two sequences (not a timing assert)
        assert not storescu_failures(storescu("127.0.0.1", node.port, series.paths[3:], NODE_AE))
        detail = wait_for(lambda: (d := node.study(series.study_instance_uid))["state"] == "complete" and d,
                          timeout=90, what="study complete")

    assert {d["evaluation"] for d in detail["decisions"]} == {1}
    with sqlite3.connect(database) as connection:
        assert connection.execute("select input_count from job").fetchall() == [(6,)]
