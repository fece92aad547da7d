"""The node's Storage SCP against dcmtk's storescu/echoscu (real peers, real node process)."""

from __future__ import annotations

import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydicom import dcmread

from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import echoscu, skip_unless_tools, storescu, storescu_failures, wait_for, write_tiny_ct
from tests.synthetic import make_ct_series

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "echoscu")]


def rows(node, query: str, *params):
    with sqlite3.connect(node.workdir / "node.db") as connection:
        return connection.execute(query, params).fetchall()


def test_echo_succeeds_for_an_allowed_caller(node_factory):
    node = node_factory()
    result = echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU")
    assert result.returncode == 0, result.stdout + result.stderr


def test_caller_not_on_the_allow_list_is_rejected_and_logged(node_factory):
    node = node_factory()
    result = echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert "rejected association from AE 'INTRUDER'" in node.log()


def test_caller_pinned_to_another_host_is_rejected(node_factory):
    node = node_factory(allowed_callers='{ ae_title = "ECHOSCU", host = "10.9.9.9" }')
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode != 0


def test_series_is_stored_as_received_and_indexed(node_factory, tmp_path):
    node = node_factory()
    series = make_ct_series(tmp_path / "ct", shape=(6, 32, 32))
    result = storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE)
    assert not storescu_failures(result), result.stdout
    stored = rows(node, "select sop_instance_uid, path, size_bytes from instance")
    assert {uid for uid, _, _ in stored} == set(series.sop_instance_uids)
    for sop_uid, path, size in stored:
        file = node.workdir / "storage" / path
        assert file.stat().st_size == size
        assert dcmread(file).SOPInstanceUID == sop_uid
    # the pixel bytes are exactly those sent
    original = {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in series.paths}
    for sop_uid, path, _ in stored:
        assert dcmread(node.workdir / "storage" / path).PixelData == original[sop_uid]
    assert rows(node, "select count(*) from series") == [(1,)]
    assert rows(node, "select modality from series") == [("CT",)]


def test_resent_instance_is_idempotent(node_factory, tmp_path):
    node = node_factory()
    write_tiny_ct(tmp_path / "one.dcm", sop_uid="1.2.826.0.1.3680043.8.498.1")
    for _ in range(2):
        assert not storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE))
    assert rows(node, "select count(*) from instance") == [(1,)]


@pytest.mark.parametrize("odd_uid", ["1.2.3.abc", "1.2.3.", "../../etc/passwd"])
def test_an_identifier_that_is_no_uid_is_stored_under_its_hash(node_factory, tmp_path, odd_uid):
    """As a PACS stores it (issue 18); the file is named by its SHA-256, never by what was sent."""
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "odd.dcm")
    dataset.SeriesInstanceUID = odd_uid
    dataset.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    assert not storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "odd.dcm"], NODE_AE))
    [(series_uid, path)] = rows(node, "select series_instance_uid, path from instance")
    assert series_uid == odd_uid and odd_uid not in path and path.split("/")[2].startswith("h-")
    assert (node.workdir / "storage" / path).is_file()
    assert not list((node.workdir / "storage").rglob("passwd*"))
    [(notes,)] = rows(node, "select header_notes from series")
    assert "SeriesInstanceUID is not a valid DICOM UID" in notes


def test_an_instance_without_a_study_uid_is_refused_with_a_reason(node_factory, tmp_path):
    """What cannot be filed at all (Orthanc refuses it too)."""
    node = node_factory()
    dataset = write_tiny_ct(tmp_path / "bad.dcm")
    del dataset.StudyInstanceUID
    dataset.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    failures = storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "bad.dcm"], NODE_AE))
    assert len(failures) == 1 and failures[0].status is not None
    assert rows(node, "select count(*) from instance") == [(0,)]
    assert "StudyInstanceUID is missing or empty" in node.log()
    assert not list((node.workdir / "storage" / "instances").rglob("*.dcm"))


def test_what_a_tolerant_reader_skips_never_costs_an_instance(node_factory, tmp_path):
    """Issue 18: a Philips CT's private FD of 4 bytes, a UID with a leading zero, no Modality
    and no PatientID: stored as received, indexed with NULLs, each oddity said once per series."""
    import json
    import struct

    from pydicom.uid import ImplicitVRLittleEndian

    node = node_factory()
    series = make_ct_series(tmp_path / "ct", shape=(4, 16, 16), seed="sloppy")
    for path in series.paths:
        dataset = dcmread(path)
        dataset.add_new((0x01F1, 0x0010), "LO", "ELSCINT1")  # pydicom's private dictionary: (01F1,xx26) FD
        dataset.add_new((0x01F1, 0x1026), "UN", struct.pack("<f", 1.5))  # 4 bytes, written implicit below
        dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.01"
        del dataset.Modality, dataset.PatientID
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        dataset.save_as(path, enforce_file_format=True)
    sent = {p.name: p.read_bytes() for p in series.paths}

    assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
    stored = rows(node, "select sop_instance_uid, path from instance")
    assert len(stored) == 4
    for _, path in stored:  # the data set exactly as sent (the node writes its own file meta)
        kept = dcmread(node.workdir / "storage" / path)
        assert kept.get_item(0x01F11026).value == struct.pack("<f", 1.5)  # raw: not converted
    [(modality, notes)] = rows(node, "select modality, header_notes from series")
    notes = json.loads(notes)
    assert modality is None
    assert any("(01F1,1026) holds 4 bytes" in note for note in notes), notes
    assert any(note.startswith("Modality (Type 1) is missing") for note in notes)
    assert any(note.startswith("PatientID (Type 2) is missing") for note in notes)
    assert any(note.startswith("SeriesInstanceUID is not a valid DICOM UID") for note in notes)
    assert rows(node, "select patient_id from study") == [(None,)]
    assert node.log().count("oddities in its header") == 1  # once per series, not per instance
    assert "unexpected error" not in node.log()
    assert len(sent) == 4


def test_full_disk_gives_out_of_resources(node_factory, tmp_path):
    node = node_factory(node_extra="")
    # ask for more free space than any disk has: every instance must be refused, nothing indexed
    text = node.config_path.read_text().replace("min_free_disk_mb = 0", "min_free_disk_mb = 100000000")
    node.stop()
    node.config_path.write_text(text)
    node.start()
    write_tiny_ct(tmp_path / "one.dcm")
    result = storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE)
    failures = storescu_failures(result)
    assert len(failures) == 1 and failures[0].status == "Refused: OutOfResources"
    assert rows(node, "select count(*) from instance") == [(0,)]
    assert "disk" in node.log()


def test_several_receiver_processes_share_the_port(node_factory, tmp_path):
    node = node_factory(node_extra="receivers = 2")
    wait_for(lambda: len(_children(node.process.pid)) == 1, timeout=30, what="a second receiver process")
    [child] = _children(node.process.pid)
    wait_for(lambda: "receiver-" in node.log() or "Traceback" in node.log(), timeout=30,
             what="the receiver process's first log line")
    folders = []
    for index in range(4):  # four concurrent associations, spread by the kernel across processes
        series = make_ct_series(tmp_path / f"ct{index}", shape=(5, 16, 16), seed=f"multi{index}")
        folders.append((tmp_path / f"ct{index}", series))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda f: storescu("127.0.0.1", node.port, f[0], NODE_AE), folders))
    assert all(not storescu_failures(result) for result in results)
    expected = {uid for _, series in folders for uid in series.sop_instance_uids}
    assert {uid for (uid,) in rows(node, "select sop_instance_uid from instance")} == expected
    assert _children(node.process.pid) == [child], "the receiver process died and was restarted"
    assert "Traceback" not in node.log()
    node.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=20, what="receiver process stopped")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


@pytest.mark.parametrize("receivers", [1, 2])
def test_sigterm_stops_the_node_cleanly(node_factory, receivers):
    node = node_factory(node_extra=f"receivers = {receivers}")
    node.stop()
    assert node.process.returncode == 0, node.log()[-3000:]
    assert "Traceback" not in node.log()
