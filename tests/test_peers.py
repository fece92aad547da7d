"""The real peers work against each other (no node involved): dcmtk -> Orthanc, dcmtk -> storescp,
Orthanc -> storescp through DicomModalities."""

from __future__ import annotations

import io
import os
import socket
import time

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from tests.peers import (  # noqa: F401  (orthanc, orthanc_factory are fixtures)
    LOOPBACK,
    ORTHANC_BIN,
    OrthancError,
    OrthancPeer,
    StorescpPeer,
    echoscu,
    free_port,
    orthanc,
    orthanc_factory,
    parse_storescu_output,
    skip_unless_tools,
    storescu,
    storescu_failures,
    wait_for,
    write_tiny_ct,
)

pytestmark = pytest.mark.integration

needs_orthanc = skip_unless_tools(ORTHANC_BIN, "storescu", "echoscu")
needs_dcmtk = skip_unless_tools("storescu", "storescp", "echoscu")


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _j2k_copy(src, dst) -> str:
    """Re-encode a file as JPEG 2000 lossless (keeping its SOPInstanceUID); returns the UID."""
    ds = dcmread(src)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(dst)
    return str(ds.SOPInstanceUID)


@needs_orthanc
def test_storescu_to_orthanc_shows_in_rest(orthanc, tmp_path):
    ds = write_tiny_ct(tmp_path / "ct.dcm")

    proc = storescu(orthanc.host, orthanc.dicom_port, tmp_path / "ct.dcm", orthanc.aet)
    assert proc.returncode == 0, proc.stderr
    outcomes = parse_storescu_output(proc.stdout + proc.stderr)
    assert [o.status for o in outcomes] == ["Success"]

    orthanc.wait_for_instances([ds.SOPInstanceUID], timeout=10)
    ids = orthanc.instances()
    assert len(ids) == 1
    assert orthanc.instance_tags(ids[0])["SOPInstanceUID"] == ds.SOPInstanceUID

    back = dcmread(io.BytesIO(orthanc.instance_file(ids[0])))
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.pixel_array.shape == (8, 8)

    assert orthanc.studies() == [orthanc.find_study(ds.StudyInstanceUID)]
    (series,) = orthanc.study_series(ds.StudyInstanceUID)
    assert series["Modality"] == "CT"
    assert series["SeriesDescription"] == "tiny CT"
    assert series["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert series["SOPClassUIDs"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert series["SOPInstanceUIDs"] == [ds.SOPInstanceUID]
    assert orthanc.study_series("1.2.3.404") == []


@needs_orthanc
def test_storescu_folder_with_j2k_to_orthanc(orthanc, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    uids = [write_tiny_ct(folder / f"{i}.dcm", study_uid=study, series_uid=series,
                          instance_number=i, rows=64, cols=64).SOPInstanceUID for i in (1, 2)]
    # the third slice is JPEG 2000: storescu -R alone would fail it, "auto" adds -xv
    j2k_src = write_tiny_ct(tmp_path / "3.dcm", study_uid=study, series_uid=series,
                            instance_number=3, rows=64, cols=64)
    uids.append(_j2k_copy(tmp_path / "3.dcm", folder / "3.dcm"))
    assert uids[-1] == j2k_src.SOPInstanceUID

    proc = storescu(orthanc.host, orthanc.dicom_port, folder, orthanc.aet, check=True)
    assert storescu_failures(proc) == []
    orthanc.wait_for_instances(uids, timeout=10)
    (s,) = orthanc.study_series(study)
    assert sorted(s["SOPInstanceUIDs"]) == sorted(uids)


@needs_orthanc
def test_echoscu_to_orthanc(orthanc):
    proc = echoscu(orthanc.host, orthanc.dicom_port, orthanc.aet, "ECHOSCU")
    assert proc.returncode == 0, proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


@needs_orthanc
def test_orthanc_dicomweb_plugin(orthanc, tmp_path):
    if not orthanc.dicomweb_loaded:
        pytest.skip("DICOMweb plugin not loaded (absent or broke startup); see orthanc.log")
    ds = write_tiny_ct(tmp_path / "ct.dcm")
    orthanc.upload(tmp_path / "ct.dcm")
    import json

    studies = json.loads(orthanc.rest_get_bytes("/dicom-web/studies",
                                                accept="application/dicom+json"))
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]


@needs_dcmtk
def test_storescu_to_storescp_and_failure_parsing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    plain = write_tiny_ct(src / "plain.dcm")
    write_tiny_ct(tmp_path / "j.dcm", rows=64, cols=64)
    j2k_uid = _j2k_copy(tmp_path / "j.dcm", src / "j2k.dcm")

    with StorescpPeer(aet="STORESCP", out_dir=tmp_path / "received") as scp:
        pid = scp.proc.pid
        # Without a J2K proposal storescu cannot send the J2K file (and still exits 0!)
        proc = storescu(scp.host, scp.port, src, "STORESCP", propose="")
        failed = storescu_failures(proc)
        assert [os.path.basename(o.path) for o in failed] == ["j2k.dcm"]
        assert failed[0].status is None and failed[0].messages

        # "auto" proposes -xv for the J2K file: both arrive
        proc = storescu(scp.host, scp.port, src, "STORESCP", check=True)
        assert storescu_failures(proc) == []
        got = wait_for(lambda: {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                for p in scp.received()} >= {plain.SOPInstanceUID, j2k_uid},
                       timeout=10, what="files in storescp folder")
        assert got
        assert echoscu(scp.host, scp.port, "STORESCP").returncode == 0
    assert _pid_gone(pid)


@needs_orthanc
@skip_unless_tools("storescp")
def test_orthanc_stores_to_node_modality(orthanc_factory, tmp_path):
    """Orthanc's DicomModalities entry "node" points where our node will listen; a storescp
    stands in for the node here."""
    with StorescpPeer(aet="DICOM_AI_NODE", out_dir=tmp_path / "node") as node:
        pacs = orthanc_factory(node_aet=node.aet, node_port=node.port)
        ds = write_tiny_ct(tmp_path / "ct.dcm")
        inst = pacs.upload(tmp_path / "ct.dcm")["ID"]
        assert pacs.echo_modality("node")
        pacs.store_to_modality(inst, "node")
        (f,) = wait_for(node.received, timeout=10, what="file at the node")
        assert dcmread(f).SOPInstanceUID == ds.SOPInstanceUID


@skip_unless_tools(ORTHANC_BIN)
def test_orthanc_stop_by_pid_and_startup_error(tmp_path):
    peer = OrthancPeer("NODE", node_port=free_port())
    with peer:
        pid = peer.proc.pid
        assert peer.running
    assert _pid_gone(pid) and not peer.workdir.exists()

    # graceful stop (SIGTERM) also reaps
    peer = OrthancPeer("NODE", node_port=free_port(), workdir=tmp_path / "keep").start()
    pid = peer.proc.pid
    peer.stop()
    assert _pid_gone(pid) and (tmp_path / "keep" / "orthanc.log").exists()

    # an HTTP port already taken: a clear error with the log tail, quickly
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        s.listen()
        bad = OrthancPeer("NODE", node_port=free_port(), http_port=s.getsockname()[1],
                          workdir=tmp_path / "bad", start_timeout=15)
        t0 = time.monotonic()
        with pytest.raises(OrthancError, match="log tail"):
            bad.start()
        assert time.monotonic() - t0 < 20
        assert bad.proc is None


@skip_unless_tools("echoscu")
def test_echoscu_to_closed_port_fails_fast():
    t0 = time.monotonic()
    proc = echoscu(LOOPBACK, free_port(), "NOBODY", timeout=10)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10
