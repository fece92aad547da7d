"""Priors (issue 12 §3/§4) without a network: the rule syntax, choosing the prior from C-FIND
answers, the router and runner around a fetch, and the SR and key images with a prior (dciodvfy,
highdicom). tests/test_priors_end_to_end.py runs the same against Orthanc."""

from __future__ import annotations

import tomllib
from datetime import timedelta

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai_node.db.models import Job, JobState, PriorFetch, RoutingDecision, Series, Study
from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.jobs.encode import encode_results
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.priors.choose import Current, NoPrior, candidate_studies, check_current, choose_series, date_range
from dicom_ai_node.priors.inputs import PriorInput
from dicom_ai_node.router import Router, RuleStore
from dicom_ai_node.routing import PriorSpec, RuleError, check_rules, parse_rules, rules_to_toml
from dicom_ai_node.storage import Storage
from model_zoo.base import Measurement, ModelOutput, PriorResult, SegmentMask
from model_zoo.lung_ct_seg.model import same_level
from model_zoo.manifest import load_manifest
from tests.dciodvfy import dciodvfy_errors
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series

RULE = """
[[rules]]
name = "lungs"
priority = 1
models = ["lung_ct_seg"]
destinations = ["pacs"]
priors = { same_modality = true, body_part = "CHEST", within_days = 1095, max = 1 }
source = "pacs"
when = { tag = "Modality", equals = "CT" }
"""
SPEC = PriorSpec(within_days=1095, same_modality=True, body_part="CHEST")
NOW = Current("1.2.3.100", "P1", "20240115", "101500", "CT")


def test_priors_rule_round_trips_and_names_bad_keys():
    rules = parse_rules(tomllib.loads(RULE))
    assert rules.rules[0].priors == SPEC and rules.rules[0].source == "pacs"
    assert parse_rules(tomllib.loads(rules_to_toml(rules))) == rules
    assert check_rules(rules, {"lung_ct_seg"}, {"pacs"}) == []
    assert check_rules(rules, {"lung_ct_seg"}, {"other"})[-1] == (
        "<rules>: rules[0] (lungs).source: unknown destination 'pacs' (known: other)")
    bad = RULE.replace("max = 1", "max = 2, colour = 1").replace("within_days = 1095", "within_days = 0")
    with pytest.raises(RuleError) as error:
        parse_rules(tomllib.loads(bad.replace('source = "pacs"\n', "")))
    assert error.value.problems == [
        "<rules>: rules[0] (lungs).priors.colour: unknown key 'colour' (expected one of same_modality, body_part, within_days, max)",
        "<rules>: rules[0] (lungs).priors.within_days: expected days 1..36500, got an integer 0",
        "<rules>: rules[0] (lungs).priors.max: only 1 is supported (a job compares with one prior), got an integer 2",
        "<rules>: rules[0] (lungs).source: missing: priors need a source (the destination to query)"]
    with pytest.raises(RuleError, match=r"source: given without priors"):
        parse_rules(tomllib.loads(RULE.replace("priors = {", "#")))


def _study(uid, day, time="120000", patient="P1", modalities=("CT",)):
    answer = Dataset()
    answer.StudyInstanceUID, answer.StudyDate, answer.StudyTime, answer.PatientID = uid, day, time, patient
    answer.ModalitiesInStudy = list(modalities)
    return answer


def _series(uid, modality="CT", body_part="CHEST", count=40):
    answer = Dataset()
    answer.SeriesInstanceUID, answer.Modality, answer.BodyPartExamined = uid, modality, body_part
    answer.NumberOfSeriesRelatedInstances = count
    return answer


def test_the_prior_is_the_newest_earlier_study_of_this_patient_in_range():
    answers = [
        _study("1.2.3.1", "20220101"),
        _study("1.2.3.2", "20230601"),  # the newest earlier one
        _study("1.2.3.100", "20240115"),  # this study
        _study("1.2.3.3", "20240115", "113000"),  # same day, later
        _study("1.2.3.4", "20231201", patient="P10"),  # a PACS that matched loosely: not this patient
        _study("1.2.3.5", "20231101", modalities=("MR",)),
        _study("1.2.3.6", "20200101"),  # more than 1095 days before
        _study("1.2.3.x", "20231001"),  # not a UID
    ]
    assert date_range(NOW, SPEC) == "20210115-20240115"
    assert [s.study_instance_uid for s in candidate_studies(NOW, SPEC, answers)] == ["1.2.3.2", "1.2.3.1"]
    chosen = choose_series(NOW, SPEC, [_series("1.2.9.1", count=5), _series("1.2.9.2", count=300),
                                       _series("1.2.9.3", body_part="ABDOMEN", count=900),
                                       _series("1.2.9.4", modality="SR", count=1000)])
    assert chosen.series_instance_uid == "1.2.9.2" and chosen.instances == 300
    assert choose_series(NOW, SPEC, [_series("1.2.9.3", body_part="ABDOMEN")]) is None
    # a count that is not one (left out, negative, absurd) is unknown, never "already here"
    for count in (None, -5, 0, 10**9):
        answer = _series("1.2.9.5")
        if count is None:
            del answer.NumberOfSeriesRelatedInstances
        else:
            answer.NumberOfSeriesRelatedInstances = count
        assert choose_series(NOW, SPEC, [answer]).instances is None, count
    for patient_id, why in (("", "no PatientID"), ("P*", "wildcard")):
        with pytest.raises(NoPrior, match=why):
            check_current(Current("1.2.3.100", patient_id, "20240115", "", "CT"))


def test_a_study_fetched_as_a_prior_is_not_routed_and_a_job_waits_for_its_fetch(tmp_path, database):
    storage = Storage(tmp_path / "storage")
    follow_up = make_ct_series(tmp_path / "now", shape=(16, 24, 24), seed="now")
    prior = make_ct_series(tmp_path / "then", shape=(16, 24, 24), seed="then")
    with database.session() as session:
        store_series(session, storage, follow_up)
        store_series(session, storage, prior)
        for uid in (follow_up.study_instance_uid, prior.study_instance_uid):
            session.get(Study, uid).state = "receiving"
        session.get(Study, follow_up.study_instance_uid).patient_id = "P1"
    with database.session() as session:
        for series_uid in (follow_up.series_instance_uid, prior.series_instance_uid):
            session.get(Series, series_uid).attributes = {"Modality": "CT"}
    store = RuleStore(database)
    with database.session() as session:
        store.save(session, RULE, author="test")
    submitted, fetched = [], []
    router = Router(database, store, submitted.append, fetch_priors=fetched.append)

    (job_id,) = router.route(follow_up.study_instance_uid)
    assert fetched == [job_id] and submitted == []  # to the fetcher, not to a worker
    with database.session() as session:
        fetch = session.query(PriorFetch).one()
        assert (fetch.job_id, fetch.state, fetch.source) == (job_id, "pending", "pacs")
        fetch.prior_study_instance_uid = prior.study_instance_uid  # what the fetcher records before its C-MOVE
        arrived = session.get(Study, prior.study_instance_uid).first_received_at
        fetch.created_at = arrived + timedelta(seconds=1)  # the prior was here before the fetch: routed

    runner = JobRunner(database, storage, models=None)
    assert runner.claim(job_id) is None  # not while its fetch runs
    with database.session() as session:
        assert session.get(Job, job_id).state == JobState.queued

    (own_job,) = router.route(prior.study_instance_uid)  # it was not fetched: it gets its own results
    with database.session() as session:  # as if it had not arrived yet
        session.get(Study, prior.study_instance_uid).state = "receiving"
        session.query(PriorFetch).filter_by(job_id=own_job).delete()
        session.query(Job).filter_by(id=own_job).delete()
        session.query(RoutingDecision).filter_by(study_instance_uid=prior.study_instance_uid).delete()
        session.query(PriorFetch).one().created_at = arrived - timedelta(seconds=1)  # it came by the C-MOVE
    assert router.route(prior.study_instance_uid) == []
    with database.session() as session:
        assert session.get(Study, prior.study_instance_uid).state == "complete"
        assert session.query(RoutingDecision).filter_by(study_instance_uid=prior.study_instance_uid).count() == 0
        assert session.query(Job).filter_by(study_instance_uid=prior.study_instance_uid).count() == 0
        session.query(PriorFetch).one().state = "not_found"
    claimed = runner.claim(job_id)
    assert claimed is not None and claimed[0].state == JobState.running


def test_same_level_is_the_same_height_within_the_lungs():
    here, there = np.zeros((20, 4, 4), bool), np.zeros((40, 4, 4), bool)
    here[5:15, 1:3, 1:3] = True  # lungs on slices 5..14
    there[10:30, 1:3, 1:3] = True  # on 10..29
    assert same_level(here, 5, there) == 10 and same_level(here, 14, there) == 29
    assert same_level(here, 9, there) == round(10 + 4 / 9 * 19)
    assert same_level(here, 9, np.zeros_like(there)) is None


class Scan:
    def __init__(self, folder, seed, spacing):
        self.series = make_ct_series(folder, shape=(20, 32, 32), spacing=spacing, seed=seed, patient_id="P1")
        self.volume = load_series(self.series.paths)
        self.headers = [read_header(path) for path in self.series.paths]
        self.mask = self.series.lung_mask
        ml = float(self.mask.sum()) * self.volume.voxel_volume_ml
        self.measurements = [Measurement("volume", ml, "lung"), Measurement("mean_attenuation", -850.0, "lung"),
                             Measurement("emphysema_index", 1.5 if seed == "now" else 1.0, "lung")]


def _lung_manifest():
    from tests.conftest import PROJECT_ROOT
    return load_manifest(PROJECT_ROOT / "model_zoo" / "lung_ct_seg" / "model.toml")


def _numbers(group) -> dict[str, float]:
    return {m.name.value: m.value for m in group.get_measurements()}


def test_sr_and_key_image_with_a_prior_report_both_studies_and_the_change(tmp_path):
    manifest = _lung_manifest()
    now, then = Scan(tmp_path / "now", "now", (2.5, 3.5, 3.5)), Scan(tmp_path / "then", "then", (2.5, 4.0, 4.0))
    prior = PriorInput(volume=then.volume, sources=then.headers, study_instance_uid=then.series.study_instance_uid,
                       series_instance_uid=then.series.series_instance_uid, study_date="20230110")
    output = ModelOutput(segments=[SegmentMask("lung", now.mask)], measurements=now.measurements, key_slices=[15],
                         prior=PriorResult(then.measurements, [SegmentMask("lung", then.mask)], key_slice=14))
    objects = encode_results(now.headers, now.volume, output, manifest, "seed", prior=prior)
    kinds = [kind for kind, _ in objects]
    assert kinds[:2] == ["seg", "sr"] and "key_image" in kinds
    for index, (kind, dataset) in enumerate(objects):
        path = tmp_path / f"{index}-{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], kind
    sr = hd.sr.srread(tmp_path / "1-sr.dcm")
    (current,) = sr.content.get_volumetric_roi_measurement_groups()
    values = _numbers(current)
    (earlier,) = [g for g in sr.content.get_image_measurement_groups(tracking_uid=current.tracking_uid)
                  if "118565006" in _numbers(g)]
    before = _numbers(earlier)
    assert before["118565006"] == pytest.approx(then.measurements[0].value)
    assert values["CHG-118565006"] == pytest.approx(now.measurements[0].value - then.measurements[0].value, abs=1e-5)
    assert values["CHG-LAA950"] == pytest.approx(0.5)
    assert earlier.tracking_identifier == current.tracking_identifier
    # each change right after its measurement (OHIF lists a group's first lines only), each study
    # named by its Time Point, no Time Point Order (OHIF would list it as a measurement) and no
    # label on the prior's group (OHIF merges one tracking UID's groups: it would head this
    # study's values with "Lungs (prior ...)")
    order = [str(item.ConceptNameCodeSequence[0].CodeValue) for item in current[0].ContentSequence
             if item.ValueType == "NUM"]
    assert order[:2] == ["118565006", "CHG-118565006"] and order.index("CHG-LAA950") == order.index("LAA950") + 1
    time_points = {str(item.TextValue) for group in (current, earlier) for item in group[0].ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Time Point"}
    assert time_points == {"current 20240115", "prior 20230110"}
    assert not [item for group in (current, earlier) for item in group[0].ContentSequence
                if item.ConceptNameCodeSequence[0].CodeMeaning in ("Time Point Order", "Comment")]
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == then.series.study_instance_uid
    seg = dcmread(tmp_path / "0-seg.dcm")
    assert seg.SegmentSequence[0].TrackingUID == current.tracking_uid
    # the same patient's lungs get the same tracking UID in another job's results
    again = encode_results(now.headers, now.volume, output, manifest, "another job", prior=PriorInput(note="x"))
    assert dict(again)["seg"].SegmentSequence[0].TrackingUID == current.tracking_uid
    assert "P1" not in current.tracking_uid
    key_images = [dataset for kind, dataset in objects if kind == "key_image"]
    side = [k for k in key_images if len(k.SourceImageSequence) == 2]
    assert len(side) == 1 and len(key_images) >= 2  # the usual key images, then the comparison
    references = [str(item.ReferencedSOPInstanceUID) for item in side[0].SourceImageSequence]
    assert references == [now.series.sop_instance_uids[15], then.series.sop_instance_uids[14]]
    assert side[0].Columns > side[0].Rows  # two panels
    assert len({k.SOPInstanceUID for k in key_images}) == len(key_images)
    # without a prior: the usual key images only
    plain = encode_results(now.headers, now.volume, ModelOutput(segments=output.segments, key_slices=[15],
                                                                measurements=now.measurements), manifest, "seed")
    assert [k.SOPInstanceUID for kind, k in plain if kind == "key_image"] == [k.SOPInstanceUID for k in key_images[:-1]]


def test_study_page_shows_the_fetch_its_steps_and_the_prior_study_says_what_it_is(tmp_path):
    from tests.web_support import EVIL, STUDY, Web, store_study

    web = Web(tmp_path)
    ids = store_study(web.database, tmp_path / "storage")
    prior_study = "1.2.826.0.1.3680043.8.498.77"
    with web.database.session() as session:
        session.add(Study(study_instance_uid=prior_study, patient_id="P1", study_date="20230110", state="complete"))
        session.add(PriorFetch(job_id=ids["queued"], study_instance_uid=STUDY, source="pacs", state="done",
                               criteria=SPEC.to_data(), prior_study_instance_uid=prior_study,
                               prior_series_instance_uid=prior_study + ".1", prior_study_date="20230110",
                               expected_instances=40, received_instances=40, attempts=1,
                               steps=[{"at": "2024-01-15T10:00:00+00:00", "step": "C-FIND STUDY",
                                       "outcome": f"2 studies answered {EVIL}", "ok": True},
                                      {"at": "2024-01-15T10:00:01+00:00", "step": "C-MOVE",
                                       "outcome": "40 sent, 0 failed", "ok": True}]))
        session.add(PriorFetch(job_id=ids["crashed"], study_instance_uid=STUDY, source="pacs", state="failed",
                               criteria=SPEC.to_data(), reason="pacs: cannot connect", attempts=1, steps=[]))
    client = web.login("victor")
    page = client.get(f"/studies/{STUDY}").text
    assert "<h2>Priors</h2>" in page and "C-FIND STUDY" in page and "40 sent, 0 failed" in page
    assert "40 of 40 instances here" in page and "&lt;script&gt;" in page and "<script>alert" not in page
    assert f"compared with prior study {prior_study} (20230110)" in page
    assert "ran without prior: pacs: cannot connect" in page
    other = client.get(f"/studies/{prior_study}").text
    assert f"as the prior of job {ids['queued']}" in other and "it gets no results of its own" in other


def test_a_fetch_is_run_once_and_a_dead_claimers_fetch_is_taken_over(tmp_path, database):
    from datetime import timedelta

    from dicom_ai_node.db.models import utcnow
    from dicom_ai_node.priors.fetcher import Deadlines, PriorFetcher

    storage = Storage(tmp_path / "storage")
    series = make_ct_series(tmp_path / "ct", shape=(4, 8, 8))
    with database.session() as session:
        store_series(session, storage, series)
        job_id = queue_job(session, series, "lung_ct_seg", "lungs", destinations=[])
        study = session.get(Study, series.study_instance_uid)
        study.patient_id, study.study_date = "P1", "20240115"
        session.add(PriorFetch(job_id=job_id, study_instance_uid=series.study_instance_uid, source="gone",
                               criteria=SPEC.to_data(), state="querying", started_at=utcnow(), attempts=1, steps=[]))
    submitted = []

    def no_such_destination(name):
        raise KeyError(name)

    fetcher = PriorFetcher(database, no_such_destination, "NODE", submitted.append, Deadlines(1, 1, 1))
    assert fetcher.resume() == [] and fetcher.run(job_id) is None and submitted == []  # its claimer is alive
    with database.session() as session:
        fetch = session.query(PriorFetch).one()
        assert fetch.state == "querying"
        fetch.started_at = utcnow() - timedelta(seconds=Deadlines(1, 1, 1).lease_s + 1)  # the claimer died
    assert fetcher.run(job_id) == "failed" and submitted == [job_id]
    with database.session() as session:
        fetch = session.query(PriorFetch).one()
        assert (fetch.state, fetch.attempts) == ("failed", 2)
        assert fetch.reason == "source 'gone' is not a configured destination"
    assert fetcher.run(job_id) is None and submitted == [job_id]  # finished: never again
    fetcher.shutdown()
