"""STOW-RS in (web/stow.py): studies sent to the node's web server with dicomweb-client (the
ecosystem's Python client) and with Orthanc's DICOMweb plugin are stored, indexed, complete,
are routed and get their results in the PACS, exactly like C-STORE ones; bad parts get a
Failed SOP Sequence entry while good ones are stored; over-size, unauthenticated, slow and
aborted uploads leave nothing behind."""

from __future__ import annotations

import http.client
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests.node_process import NodeProcess
from tests.peers import skip_unless_tools, wait_for, write_tiny_ct
from tests.synthetic import make_ct_series
from tests.test_end_to_end import RULES, all_results_arrived
from tests.test_receive_resources import received_leftovers

pytestmark = [pytest.mark.integration, skip_unless_tools("/usr/sbin/Orthanc")]

BOUNDARY = "stow-test-boundary-7d3c"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
# completion only through the release STOW-RS records, never the quiet period, within the tests
STOW = "[dicomweb]\nstow_enabled = true\nmax_part_mb = 1\nmax_request_mb = 4\nrequest_timeout_s = 3\n"


def cli(node: NodeProcess, *args: str, stdin: str | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(node.config_path), *args],
                          input=stdin, text=True, check=True, capture_output=True, timeout=60).stdout


def token_for(node: NodeProcess, name: str, role: str) -> str:
    cli(node, "users", "add", name, "--role", role, "--password-stdin", stdin="stow-test-password\n")
    return cli(node, "tokens", "create", name).split()[-1]


def rows(node: NodeProcess, query: str, *params):
    with closing(sqlite3.connect(node.workdir / "node.db")) as connection:
        return connection.execute(query, params).fetchall()


def multipart(*parts: bytes, content_type: bytes = b"application/dicom") -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\n".encode() + b"Content-Type: " + content_type + b"\r\n\r\n" + part + b"\r\n"
                    for part in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def sequence(answer: dict, tag: str) -> list[dict]:
    return answer[tag].get("Value", [])


@pytest.fixture
def stow_node(tmp_path, orthanc):
    node = NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, web=True, quiet_period_s=600, extra=STOW).start()
    node.token = token_for(node, "pacs", "sender")
    yield node
    node.stop()


def test_a_study_sent_by_dicomweb_client_gets_results_in_the_pacs(tmp_path, stow_node, orthanc):
    series = make_ct_series(tmp_path / "ct", shape=(32, 64, 64), spacing=(2.5, 4.5, 4.5), seed="stow")
    client = DICOMwebClient(f"{stow_node.web_url}/dicom-web", headers={"Authorization": f"Bearer {stow_node.token}"})
    answer = client.store_instances([dcmread(path) for path in series.paths])

    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == set(series.sop_instance_uids) and not answer.get("FailedSOPSequence")
    # durable and indexed before the answer: every row is there the moment it came back
    assert rows(stow_node, "SELECT count(*) FROM instance")[0][0] == 32
    # completes through the release the request recorded (the quiet period is 10 minutes)
    wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=180,
             what="SEG, SR and key images in Orthanc")
    job = wait_for(lambda: (j := stow_node.study(series.study_instance_uid)["jobs"]) and j[0]["state"] == "done"
                   and j[0], timeout=30, what="job done")
    assert job["model"] == "lung_ct_seg"
    assert received_leftovers(stow_node) == []


def test_a_web_process_without_a_dicom_listener_stores_and_routes_stow_rs(tmp_path, orthanc):
    """serve --role web (scaled out: STOW-RS behind a load balancer, no DICOM port): it stores
    through its own index writer, and as the only leader completes and routes the study."""
    node = NodeProcess(tmp_path / "web-node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, web=True, quiet_period_s=600, extra=STOW, role="web").start()
    try:
        token = token_for(node, "pacs", "sender")
        series = make_ct_series(tmp_path / "ct", shape=(32, 64, 64), spacing=(2.5, 4.5, 4.5), seed="stow-web")
        client = DICOMwebClient(f"{node.web_url}/dicom-web", headers={"Authorization": f"Bearer {token}"})
        answer = client.store_instances([dcmread(path) for path in series.paths])
        assert {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence} == set(series.sop_instance_uids)
        assert rows(node, "SELECT count(*) FROM instance")[0][0] == 32
        assert not _port_listening(node.port)  # no DICOM listener in this role
        wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=180,
                 what="SEG, SR and key images in Orthanc")
        assert received_leftovers(node) == []
    finally:
        node.stop()


def _port_listening(port: int) -> bool:
    with closing(socket.socket()) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_orthanc_sends_a_study_with_stow_rs_and_it_gets_results(tmp_path, orthanc_factory, orthanc, stow_node):
    series = make_ct_series(tmp_path / "ct", shape=(32, 64, 64), spacing=(2.5, 4.5, 4.5), seed="orthanc-stow")
    sender = orthanc_factory(node_port=1, extra_config={"DicomWeb": {
        "Enable": True, "Root": "/dicom-web/", "Servers": {"node": {
            "Url": f"{stow_node.web_url}/dicom-web/",
            "HttpHeaders": {"Authorization": f"Bearer {stow_node.token}"}}}}})
    assert sender.dicomweb_loaded, sender.log_tail()
    for path in series.paths:
        sender.upload(path)
    study = sender.find_study(series.study_instance_uid)
    sender.rest_post("/dicom-web/servers/node/stow", {"Resources": [study], "Synchronous": True}, timeout=120)

    wait_for(lambda: rows(stow_node, "SELECT count(*) FROM instance JOIN series USING (series_instance_uid) "
                          "WHERE study_instance_uid = ?", series.study_instance_uid)[0][0] == 32, timeout=60, what="32 instances on the node")
    # the results go to the node's destination (the orthanc fixture, not the sender)
    wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=180,
             what="SEG, SR and key images in the PACS")
    assert "refused STOW-RS" not in stow_node.log()


def test_bad_parts_fail_with_a_reason_while_good_parts_are_stored(tmp_path, stow_node):
    study, other = "1.2.826.0.1.3680043.8.498.100", "1.2.826.0.1.3680043.8.498.200"
    good = write_tiny_ct(tmp_path / "good.dcm", study_uid=study)
    wrong_study = write_tiny_ct(tmp_path / "other.dcm", study_uid=other)
    client = DICOMwebClient(f"{stow_node.web_url}/dicom-web", headers={"Authorization": f"Bearer {stow_node.token}"})
    # dicomweb-client: one instance of the study in the URL, one of another study
    answer = client.store_instances([good, wrong_study], study_instance_uid=study)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [good.SOPInstanceUID]
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == wrong_study.SOPInstanceUID and failed.FailureReason == 0xA900

    # by hand: garbage, a truncated DICOM file, a part that is not application/dicom, and a good one
    second = write_tiny_ct(tmp_path / "second.dcm", study_uid=study, instance_number=2)
    whole = (tmp_path / "second.dcm").read_bytes()
    body = multipart(b"garbage" * 100, whole[:len(whole) - 40], whole)
    response = requests.post(f"{stow_node.web_url}/dicom-web/studies/{study}", data=body, timeout=30,
                             headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {stow_node.token}"})
    assert response.status_code == 202 and response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in sequence(answer, "00081199")] == [second.SOPInstanceUID]
    reasons = [(i.get("00081155", {}).get("Value", [None])[0], i["00081197"]["Value"][0])
               for i in sequence(answer, "00081198")]
    assert reasons == [(None, 0xC000), (second.SOPInstanceUID, 0xC000)]

    stored = {uid for (uid,) in rows(stow_node, "SELECT sop_instance_uid FROM instance")}
    assert stored == {good.SOPInstanceUID, second.SOPInstanceUID}
    assert received_leftovers(stow_node) == []
    # all failed: 409
    response = requests.post(f"{stow_node.web_url}/dicom-web/studies", data=multipart(b"x" * 200), timeout=30,
                             headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {stow_node.token}"})
    assert response.status_code == 409 and sequence(response.json(), "00081198")[0]["00081197"]["Value"] == [0xC000]


def test_wrong_media_type_and_missing_or_weak_credentials_are_refused(tmp_path, stow_node):
    write_tiny_ct(tmp_path / "one.dcm")
    body = multipart((tmp_path / "one.dcm").read_bytes())
    url = f"{stow_node.web_url}/dicom-web/studies"
    assert requests.post(url, data=body, headers={"Content-Type": CONTENT_TYPE}, timeout=30).status_code == 401
    viewer = token_for(stow_node, "reader", "viewer")
    assert requests.post(url, data=body, timeout=30, headers={
        "Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {viewer}"}).status_code == 403
    sender = {"Authorization": f"Bearer {stow_node.token}"}
    # a sender only stores: it reads nothing of the node
    assert requests.get(f"{stow_node.web_url}/api/studies", headers=sender, timeout=30).status_code == 403
    for wrong in ("application/dicom", 'multipart/related; type="application/dicom+json"; boundary=x',
                  "multipart/form-data; boundary=x"):
        answer = requests.post(url, data=body, headers={**sender, "Content-Type": wrong}, timeout=30)
        assert answer.status_code == 415, wrong
    assert rows(stow_node, "SELECT count(*) FROM instance")[0][0] == 0


def test_over_size_requests_and_parts_are_refused_with_nothing_left(tmp_path, stow_node):
    big = write_tiny_ct(tmp_path / "big.dcm", rows=800, cols=800)  # 1.28 MB: over max_part_mb = 1
    small = write_tiny_ct(tmp_path / "small.dcm")
    client = DICOMwebClient(f"{stow_node.web_url}/dicom-web", headers={"Authorization": f"Bearer {stow_node.token}"})
    answer = client.store_instances([big, small])
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [small.SOPInstanceUID]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in answer.FailedSOPSequence] == [
        (big.SOPInstanceUID, 0xA700)]

    # a request declared over max_request_mb = 4 is refused before a byte of it is read
    connection = http.client.HTTPConnection("127.0.0.1", int(stow_node.web_url.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/dicom-web/studies")
    for name, value in (("Content-Type", CONTENT_TYPE), ("Authorization", f"Bearer {stow_node.token}"),
                        ("Content-Length", str(5 << 20))):
        connection.putheader(name, value)
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()

    # chunked (no length): refused when it passes the limit, whatever it held until then
    part = (tmp_path / "small.dcm").read_bytes()
    huge = write_tiny_ct(tmp_path / "huge.dcm", rows=1000, cols=1000)  # not stored: over max_part_mb
    chunks = [multipart(part)[:-len(f"--{BOUNDARY}--\r\n")]] + [
        multipart((tmp_path / "huge.dcm").read_bytes())[:-len(f"--{BOUNDARY}--\r\n")]] * 3
    try:
        answer = requests.post(f"{stow_node.web_url}/dicom-web/studies", data=iter(chunks), timeout=30,
                               headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {stow_node.token}"})
        assert answer.status_code == 413
    except requests.ConnectionError:
        pass  # the node answered and closed while the client was still sending
    assert huge.SOPInstanceUID not in {uid for (uid,) in rows(stow_node, "SELECT sop_instance_uid FROM instance")}
    wait_for(lambda: received_leftovers(stow_node) == [], timeout=10, what="incoming/ empty")


def _upload_head(node: NodeProcess, part: bytes) -> socket.socket:
    """A STOW-RS request whose body stops half-way through its only part."""
    port = int(node.web_url.rsplit(":", 1)[1])
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part[:len(part) // 2]
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CONTENT_TYPE}\r\n"
                        f"Authorization: Bearer {node.token}\r\nContent-Length: {len(body) * 2}\r\n\r\n").encode()
                       + body)
    return connection


def test_slow_and_aborted_uploads_leave_nothing(tmp_path, stow_node):
    write_tiny_ct(tmp_path / "one.dcm", rows=256, cols=256)
    part = (tmp_path / "one.dcm").read_bytes()

    # aborted: the half-received part's temporary file is removed when the client goes
    connection = _upload_head(stow_node, part)
    wait_for(lambda: received_leftovers(stow_node), timeout=10, what="the part streaming into incoming/")
    connection.close()
    wait_for(lambda: received_leftovers(stow_node) == [], timeout=10, what="incoming/ empty after the abort")

    # slow: cut off at request_timeout_s (3 s) with 408
    with closing(_upload_head(stow_node, part)) as connection:
        status_line = connection.makefile("rb").readline()  # bounded by the socket timeout (30 s)
    assert status_line.split()[1] == b"408", status_line
    assert received_leftovers(stow_node) == []
    assert rows(stow_node, "SELECT count(*) FROM instance")[0][0] == 0
