"""Priors from a DICOMweb source (issue 12 §3): QIDO-RS for the studies and series, WADO-RS for
the chosen series, streamed into the node's store part by part (priors/dicomweb.py).

First against a small local HTTP server, for what a server may answer: the QIDO-RS answers
become data sets choose.py takes; too many matches, not JSON, an error status or a slow answer
is a QueryError; WADO-RS parts are stored as they stream, a foreign part is refused and counted,
a cut-off, non-DICOM or oversized answer ends the retrieve. Then a real Orthanc with its DICOMweb
plugin behind basic auth: the fetcher in-process, storing through a StorageSCP with no listener
(as in role ``web``), and the node end to end, whose SR reports the change since the prior, or,
with the source down, that it ran without one and why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai_node.config import DestinationConfig, NodeConfig
from dicom_ai_node.db.models import Instance, PriorFetch, Series, Study
from dicom_ai_node.deliver.destinations import DestinationStore, pause, resume
from dicom_ai_node.priors import dicomweb
from dicom_ai_node.priors.choose import Current, candidate_studies, choose_series, date_range
from dicom_ai_node.priors.dimse import QueryError
from dicom_ai_node.priors.fetcher import Deadlines, PriorFetcher
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.routing import PriorSpec
from dicom_ai_node.storage import Storage
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import free_port, skip_unless_tools, storescu, storescu_failures, wait_for
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series
from tests.test_priors_end_to_end import (
    CALLERS,
    PATIENT,
    RULES,
    assert_compared_with_prior,
    comparison_text,
    follow_up,
    priors_in,
    sr_of,
)

SPEC = PriorSpec(within_days=1095, same_modality=True, body_part="CHEST")
NOW = Current("1.2.3.100", "P1", "20240115", "101500", "CT")
BOUNDARY = "wado-test-boundary-5e1f"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PASSWORD = "qido-Pa55word"


# -- a small local DICOMweb server: answers what the test sets ------------------------------


class Server:
    """``answer(path) -> (status, headers, chunks)``; chunks are written one by one, the
    connection closed after the last (no Content-Length), so a test can trickle or cut off."""

    def __init__(self):
        self.requests: list[tuple[str, list[tuple[str, str]], dict[str, str]]] = []
        self.answer = lambda path: (404, {}, [])
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlsplit(self.path)
                owner.requests.append((url.path, parse_qsl(url.query), dict(self.headers)))
                status, headers, chunks = owner.answer(url.path)
                self.send_response(status)
                for key, value in {**headers, "Connection": "close"}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.source = DestinationConfig(name="web", kind="dicomweb", timeout_s=5.0,
                                        url=f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web")

    def json(self, items, status: int = 200, headers: dict | None = None):
        body = items if isinstance(items, bytes) else json.dumps(items).encode()
        self.answer = lambda path: (status, {"Content-Type": "application/dicom+json", **(headers or {})}, [body])


@pytest.fixture
def server():
    running = Server()
    yield running
    running.server.shutdown()
    running.server.server_close()


def study_answer(uid: str, patient_id: str, day: str, modalities: list[str]) -> dict:
    ds = Dataset()
    ds.StudyInstanceUID, ds.PatientID, ds.StudyDate, ds.StudyTime = uid, patient_id, day, "090000"
    ds.ModalitiesInStudy = modalities
    return ds.to_json_dict()


def series_answer(uid: str, modality: str, body_part: str, instances: int) -> dict:
    ds = Dataset()
    ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = uid, modality, body_part
    ds.NumberOfSeriesRelatedInstances = instances
    return ds.to_json_dict()


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


# -- QIDO-RS --------------------------------------------------------------------------------


def test_qido_answers_become_data_sets_that_choose_takes(server):
    server.json([study_answer("1.2.3.1", "P1", "20230110", ["CT", "SEG"]),
                 study_answer("1.2.3.2", "P1", "20231001", ["MR"]),  # not the modality
                 study_answer("1.2.3.3", "P10", "20231101", ["CT"])])  # a looser match of another patient
    answers = dicomweb.find(server.source, dicomweb.study_query("P1", date_range(NOW, SPEC), "CT"), soon())
    assert [study.study_instance_uid for study in candidate_studies(NOW, SPEC, answers)] == ["1.2.3.1"]
    path, params, headers = server.requests[-1]
    assert path == "/dicom-web/studies" and headers["Accept"] == "application/dicom+json"
    assert ("PatientID", "P1") in params and ("StudyDate", "20210115-20240115") in params
    assert ("ModalitiesInStudy", "CT") in params and ("limit", "201") in params
    assert [value for key, value in params if key == "includefield"] == list(dicomweb.STUDY_FIELDS)

    server.json([series_answer("1.2.3.1.1", "CT", "CHEST", 40), series_answer("1.2.3.1.2", "CT", "CHEST", 300),
                 series_answer("1.2.3.1.3", "CT", "ABDOMEN", 500), series_answer("1.2.3.1.4", "SEG", "CHEST", 1)])
    answers = dicomweb.find(server.source, dicomweb.series_query("1.2.3.1"), soon())
    assert choose_series(NOW, SPEC, answers).series_instance_uid == "1.2.3.1.2"
    path, params, _headers = server.requests[-1]
    assert path == "/dicom-web/studies/1.2.3.1/series"
    assert [value for key, value in params if key == "includefield"] == list(dicomweb.SERIES_FIELDS)


@pytest.mark.parametrize(("answer", "error"), [
    ({"items": [study_answer(f"1.2.{i}", "P1", "20230110", ["CT"]) for i in range(3)]},
     "more than 2 matches; refusing to guess which is the prior"),
    ({"items": [], "headers": {"Warning": "299 pacs: There are additional results that can be requested"}},
     "more than 2 matches"),
    ({"items": b"<html>login</html>"}, "/dicom-web/studies: the answer is not JSON"),
    ({"items": {"00100020": {"vr": "LO", "Value": ["P1"]}}}, "the answer is not a DICOM JSON array of data sets"),
    ({"items": [{"00100020": {"vr": "LO", "Value": "P1"}}]}, "the answer is not DICOM JSON"),
    ({"items": [], "status": 500}, "/dicom-web/studies: HTTP 500 Internal Server Error"),
    ({"items": [], "status": 401}, "/dicom-web/studies: HTTP 401 Unauthorized"),
])
def test_a_qido_answer_that_cannot_be_trusted_is_an_error(server, answer, error):
    server.json(**answer)
    with pytest.raises(QueryError) as raised:
        dicomweb.find(server.source, dicomweb.study_query("SECRET-PATIENT", "20210119-20240115", "CT"), soon(),
                      max_matches=2)
    assert error in str(raised.value)
    assert "SECRET-PATIENT" not in str(raised.value)  # the query (patient data) never in a reason or log


def test_no_match_is_an_empty_list(server):
    server.json([])
    assert dicomweb.find(server.source, dicomweb.series_query("1.2.3"), soon()) == []
    server.answer = lambda path: (204, {}, [])
    assert dicomweb.find(server.source, dicomweb.series_query("1.2.3"), soon()) == []


def test_a_qido_search_ends_at_its_deadline(server):
    with pytest.raises(QueryError, match="deadline passed before the query"):
        dicomweb.find(server.source, dicomweb.series_query("1.2.3"), time.monotonic() - 1)
    assert server.requests == []

    def trickle():  # a byte every 0.3 s: each read is quick, the whole is not
        yield b"["
        for _ in range(20):
            time.sleep(0.3)
            yield b" "
    server.answer = lambda path: (200, {"Content-Type": "application/dicom+json"}, trickle())
    started = time.monotonic()
    with pytest.raises(QueryError, match="/dicom-web/studies/1.2.3/series ran past its deadline"):
        dicomweb.find(server.source, dicomweb.series_query("1.2.3"), soon(1.0))
    assert time.monotonic() - started < 2.5

    def silent(path):
        time.sleep(4)
        return 200, {}, [b"[]"]
    server.answer = silent
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"no answer within 1\.0 s \(ReadTimeout\)"):
        dicomweb.find(server.source, dicomweb.series_query("1.2.3"), soon(1.0))
    assert time.monotonic() - started < 2.5


# -- WADO-RS into the node's store ----------------------------------------------------------


@pytest.fixture
def store(tmp_path, database):
    """The node's StorageSCP with its index writer and no listener, as in a process of role web."""
    storage = Storage(tmp_path / "storage", incoming_name="host-web-8080")
    scp = StorageSCP(NodeConfig(port=0, storage_dir=tmp_path / "storage", min_free_disk_mb=0), database, storage)
    scp.open_index()
    yield scp
    scp.stop()


def multipart(*files, cut: int | None = None) -> list[bytes]:
    """The parts of a WADO-RS answer as chunks; ``cut``: the body ends that many bytes into the last part."""
    chunks = []
    for path in files:
        data = path.read_bytes()
        chunks.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        if cut is not None and path == files[-1]:
            return [*chunks, data[:cut]]
        chunks += [data[i:i + 4096] for i in range(0, len(data), 4096)]
        chunks.append(b"\r\n")
    return [*chunks, f"--{BOUNDARY}--\r\n".encode()]


def leftovers(store: StorageSCP) -> list:
    """Files in incoming/ with content (the node keeps a few empty spare files there)."""
    return [path for path in store.storage.incoming.iterdir() if path.stat().st_size > 0]


def indexed(database, series_uid: str) -> int:
    with database.session() as session:
        return session.query(Instance).filter_by(series_instance_uid=series_uid).count()


def test_wado_rs_parts_are_stored_as_they_stream_and_a_foreign_one_is_refused(tmp_path, server, store, caplog):
    series = make_ct_series(tmp_path / "prior", shape=(4, 16, 16), seed="wado")
    stranger = make_ct_series(tmp_path / "stranger", shape=(1, 16, 16), seed="stranger")
    server.answer = lambda path: (200, {"Content-Type": MULTIPART}, multipart(*series.paths[:2], *stranger.paths,
                                                                                *series.paths[2:]))
    with caplog.at_level(logging.WARNING):
        got = dicomweb.retrieve(server.source, series.study_instance_uid, series.series_instance_uid, store, soon())
    assert (got.stored, got.failed) == (4, 1) and "StudyInstanceUID differs" in got.first_failure
    assert got.size_bytes > sum(path.stat().st_size for path in series.paths)
    path, _params, headers = server.requests[-1]
    assert path == f"/dicom-web/studies/{series.study_instance_uid}/series/{series.series_instance_uid}"
    assert headers["Accept"] == dicomweb.ACCEPT_DICOM
    assert "refused WADO-RS from WADO-RS source web" in caplog.text
    assert indexed(store.database, series.series_instance_uid) == 4
    with store.database.session() as session:
        assert session.get(Study, series.study_instance_uid).released_at is not None  # completes promptly
        assert session.get(Study, stranger.study_instance_uid) is None
        stored = {row.sop_instance_uid: row.path for row in
                  session.query(Instance).filter_by(series_instance_uid=series.series_instance_uid)}
    for original in series.paths:
        sent = dcmread(original)
        assert dcmread(store.storage.absolute(stored[sent.SOPInstanceUID])).PixelData == sent.PixelData
    assert leftovers(store) == []


def test_a_wado_rs_answer_cut_off_not_dicom_or_too_large_ends_the_retrieve(tmp_path, server, store, monkeypatch):
    series = make_ct_series(tmp_path / "prior", shape=(3, 16, 16), seed="cut")
    study, uid = series.study_instance_uid, series.series_instance_uid

    def fails(answer, error):
        server.answer = answer
        with pytest.raises(QueryError) as raised:
            dicomweb.retrieve(server.source, study, uid, store, soon(2.0))
        assert error in str(raised.value)
        assert leftovers(store) == []  # a part cut off leaves nothing behind

    fails(lambda path: (404, {}, []), f"/series/{uid}: HTTP 404 Not Found")
    fails(lambda path: (200, {"Content-Type": "application/dicom+json"}, [b"[]"]),
          "the answer is not multipart/related; type=application/dicom")
    fails(lambda path: (200, {"Content-Type": MULTIPART}, multipart(*series.paths, cut=1000)),
          "the multipart body ends before its closing boundary")
    assert indexed(store.database, uid) == 2  # stored before the cut: kept, like a C-MOVE cut short

    def trickle():
        for chunk in multipart(*series.paths):
            time.sleep(0.2)
            yield chunk
    fails(lambda path: (200, {"Content-Type": MULTIPART}, trickle()), "ran past its deadline")
    monkeypatch.setattr(dicomweb, "MAX_SERIES_BYTES", 2_000)  # the three are ~5 KB
    fails(lambda path: (200, {"Content-Type": MULTIPART}, multipart(*series.paths)), "the series is over")
    with pytest.raises(QueryError, match="deadline passed before the retrieve"):
        dicomweb.retrieve(server.source, study, uid, store, time.monotonic())


# -- the fetcher with a DICOMweb source -----------------------------------------------------


def a_job_waiting_for_its_prior(tmp_path, database, source: str, seed: str = "current") -> int:
    """A follow-up CT of PATIENT (20240115) on the node with a queued job whose fetch is pending."""
    current = make_ct_series(tmp_path / seed, shape=(4, 16, 16), seed=seed, patient_id=PATIENT)
    with database.session() as session:
        store_series(session, Storage(tmp_path / "storage"), current)
        job_id = queue_job(session, current, "lung_ct_seg", "lungs", destinations=[])
        study = session.get(Study, current.study_instance_uid)
        study.patient_id, study.study_date = PATIENT, "20240115"
        session.get(Series, current.series_instance_uid).attributes = {"StudyTime": "101500"}
        session.add(PriorFetch(job_id=job_id, study_instance_uid=current.study_instance_uid, source=source,
                               criteria=SPEC.to_data(), state="pending", steps=[], attempts=0))
    return job_id


def fetch_of(database, job_id: int) -> PriorFetch:
    with database.session() as session:
        fetch = session.query(PriorFetch).filter_by(job_id=job_id).one()
        session.expunge(fetch)
        return fetch


def test_a_paused_or_unreachable_dicomweb_source_gives_the_reason(tmp_path, database, store):
    destinations = DestinationStore(database)
    destinations.seed_from_config((DestinationConfig(name="web", kind="dicomweb", timeout_s=2.0,
                                                     url=f"http://127.0.0.1:{free_port()}/dicom-web"),))
    submitted = []
    fetcher = PriorFetcher(database, destinations.get, "NODE", submitted.append, Deadlines(2, 2, 2),
                           receiver=store, is_paused=destinations.paused)
    paused_job = a_job_waiting_for_its_prior(tmp_path, database, "web", seed="paused")
    with database.session() as session:
        pause(session, "web", "admin")
    assert fetcher.run(paused_job) == "failed" and submitted == [paused_job]
    assert fetch_of(database, paused_job).reason == "source 'web' is paused (resume it to fetch priors from it)"

    with database.session() as session:
        resume(session, "web", "admin")
    down_job = a_job_waiting_for_its_prior(tmp_path, database, "web", seed="down")
    assert fetcher.run(down_job) == "failed"
    fetch = fetch_of(database, down_job)
    assert fetch.reason.startswith("web: cannot reach http://127.0.0.1:") and "ConnectError" in fetch.reason
    assert [step["step"] for step in fetch.steps] == ["error"] and not fetch.steps[0]["ok"]
    fetcher.shutdown()


@pytest.fixture
def pacs(orthanc_factory):
    """Orthanc with its DICOMweb plugin behind HTTP basic auth (user "node")."""
    peer = orthanc_factory(users={"node": PASSWORD})
    assert peer.dicomweb_loaded, "the DICOMweb plugin did not load:\n" + peer.log_tail()
    return peer


@pytest.mark.integration
@skip_unless_tools("/usr/sbin/Orthanc")
def test_the_fetcher_gets_the_prior_from_orthanc_by_qido_and_wado(tmp_path, database, store, pacs):
    prior = priors_in(pacs, tmp_path)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    source = DestinationConfig(name="web", kind="dicomweb", url=pacs.dicomweb_url, auth="basic", username="node",
                               secret_file=tmp_path / "password", timeout_s=10.0)
    fetcher = PriorFetcher(database, {"web": source}.__getitem__, "NODE", lambda job_id: None, receiver=store)
    job_id = a_job_waiting_for_its_prior(tmp_path, database, "web")
    started = time.monotonic()
    assert fetcher.run(job_id) == "done", fetch_of(database, job_id).reason
    took = time.monotonic() - started
    fetch = fetch_of(database, job_id)
    assert [step["step"] for step in fetch.steps] == ["QIDO-RS STUDIES", "QIDO-RS SERIES", "WADO-RS"]
    assert fetch.steps[0]["outcome"] == "1 studies answered, 1 earlier within 1095 days"  # the other patient's: not
    assert fetch.steps[2]["outcome"].startswith("40 stored, 0 refused (") and all(s["ok"] for s in fetch.steps)
    assert (fetch.prior_study_instance_uid, fetch.prior_series_instance_uid) == (prior.study_instance_uid,
                                                                                  prior.series_instance_uid)
    assert fetch.received_instances == fetch.expected_instances == 40
    assert indexed(database, prior.series_instance_uid) == 40
    print(f"QIDO-RS + WADO-RS of a 40-instance prior ({sum(p.stat().st_size for p in prior.paths) >> 10} KiB) "
          f"from Orthanc: {took:.2f} s; {fetch.steps[2]['outcome']}")
    fetcher.shutdown()


# -- the node end to end --------------------------------------------------------------------


def web_source(pacs, tmp_path, port: int | None = None) -> str:
    """A [[destinations]] entry "web": the DICOMweb side of Orthanc (or a port nobody listens on)."""
    (tmp_path / "password").write_text(PASSWORD + "\n")
    url = pacs.dicomweb_url if port is None else f"http://127.0.0.1:{port}/dicom-web"
    return (f'[[destinations]]\nname = "web"\nkind = "dicomweb"\nurl = "{url}"\nauth = "basic"\n'
            f'username = "node"\npassword_file = "{tmp_path / "password"}"\ntimeout_s = 5\n')


def node_with(tmp_path, pacs, destination: str) -> NodeProcess:
    """Results go to Orthanc by C-STORE; priors come from the destination "web"."""
    return NodeProcess(tmp_path / "node", port=pacs.node_port, destination_port=pacs.dicom_port,
                       rules=RULES.format(source="web", extra=destination), allowed_callers=CALLERS)


@pytest.mark.integration
@skip_unless_tools("storescu", "/usr/sbin/Orthanc")
def test_follow_up_gets_the_change_since_its_prior_fetched_by_dicomweb(tmp_path, pacs):
    prior = priors_in(pacs, tmp_path)
    current = follow_up(tmp_path)
    with node_with(tmp_path, pacs, web_source(pacs, tmp_path)) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "follow-up", NODE_AE))
        found, sr = sr_of(pacs, tmp_path, current.study_instance_uid)
        detail = wait_for(lambda: (d := node.study(current.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")
        prior_detail = node.study(prior.study_instance_uid)
        log = node.log()

    (fetch,) = detail["prior_fetches"]
    assert fetch["state"] == "done" and fetch["prior_study_instance_uid"] == prior.study_instance_uid
    assert fetch["received_instances"] == fetch["expected_instances"] == 40
    assert [s["step"] for s in fetch["steps"]] == ["QIDO-RS STUDIES", "QIDO-RS SERIES", "WADO-RS"]
    assert_compared_with_prior(tmp_path, pacs, detail, prior_detail, found, sr, current, prior)
    assert "WADO-RS from web: 40 stored, 0 refused" in log
    assert PASSWORD not in log and PATIENT not in log


@pytest.mark.integration
@skip_unless_tools("storescu", "/usr/sbin/Orthanc")
def test_a_dicomweb_source_that_is_down_fails_the_fetch_and_the_job_runs_without_it(tmp_path, pacs):
    current = follow_up(tmp_path)
    with node_with(tmp_path, pacs, web_source(pacs, tmp_path, port=free_port())) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "follow-up", NODE_AE))
        _found, sr = sr_of(pacs, tmp_path, current.study_instance_uid)
        detail = wait_for(lambda: (d := node.study(current.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")
    (fetch,) = detail["prior_fetches"]
    assert fetch["state"] == "failed" and fetch["reason"].startswith("web: cannot reach http://127.0.0.1:")
    assert detail["jobs"][0]["prior"] == "ran without prior: " + fetch["reason"]
    assert any(t.startswith("ran without prior: web: cannot reach") for t in comparison_text(sr))
    assert "PertinentOtherEvidenceSequence" not in sr
