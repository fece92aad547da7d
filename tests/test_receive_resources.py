"""What one sender's data set can cost the node (issue 10): memory stays bounded whatever the
data set holds, the free-disk reserve holds while an instance streams in, a data set cut short
or nested absurdly deep is refused (the same for a new series as for a known one), and the
node's own spare files are not reported as half-received. A real node process, real sockets
(a raw sender where the data set must be malformed on purpose), dcmtk storescu otherwise."""

from __future__ import annotations

import shutil
import sqlite3
import struct
import subprocess
import time
from contextlib import closing
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ai_node.db.engine import Database
from dicom_ai_node.index import ReceivedInstance
from dicom_ai_node.receive.index_writer import IndexWriter
from dicom_ai_node.storage import DiskFullError
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures, write_tiny_ct
from tests.raw_peer import c_store_rq, p_data, raw_associate, read_exact

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu")]

PDV_BYTES = 16_000  # below the 16384-byte maximum PDU the raw sender announces
MiB = 2**20


@pytest.fixture
def node(tmp_path):
    started = NodeProcess(tmp_path / "node").start()
    yield started
    started.stop()


def rows(node, query: str, *params):
    with closing(sqlite3.connect(node.workdir / "node.db")) as connection:
        return connection.execute(query, params).fetchall()


def stored_files(node) -> list[Path]:
    return list((node.workdir / "storage" / "instances").rglob("*.dcm"))


def incoming_folder(node) -> Path:
    """The node's own folder under storage/incoming (one per receiving process: host-role-port)."""
    folders = list((node.workdir / "storage" / "incoming").iterdir())
    port = node.web_port if node.role == "web" else node.port  # a web process is named by its web port
    assert len(folders) == 1 and folders[0].is_dir() and folders[0].name.endswith(f"-{node.role}-{port}"), folders
    return folders[0]


def received_leftovers(node) -> list[Path]:
    """Files in incoming/ with content (the node keeps a few empty spare files there)."""
    return [p for p in incoming_folder(node).iterdir() if p.stat().st_size > 0]


# -- a raw sender: an association by hand, then any bytes as a data set --------------------


def store(connection, sop_uid: str, *pieces: bytes | tuple[int, int]) -> int:
    """Send one C-STORE whose data set is ``pieces`` in order (bytes, or (size, byte) for that
    many copies of one byte, streamed a MiB at a time); returns the response's status."""
    from pynetdicom.dsutils import decode

    def chunks():
        for piece in pieces:
            if isinstance(piece, tuple):
                size, value = piece
                block = bytes([value]) * MiB
                for start in range(0, size, MiB):
                    yield block[:min(MiB, size - start)]
            else:
                yield piece

    connection.sendall(p_data(True, True, c_store_rq(sop_uid)))
    pending = bytearray()
    for chunk in chunks():
        pending += chunk
        sent = 0
        while len(pending) - sent > PDV_BYTES:
            connection.sendall(p_data(False, False, memoryview(pending)[sent:sent + PDV_BYTES]))
            sent += PDV_BYTES
        del pending[:sent]
    connection.sendall(p_data(False, True, pending))
    pdu_type, length = struct.unpack(">BxL", read_exact(connection, 6))
    assert pdu_type == 0x04, f"expected the C-STORE response, got PDU type 0x{pdu_type:02X}"
    return decode(BytesIO(read_exact(connection, length)[6:]), True, True).Status


def release(connection) -> None:
    connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    read_exact(connection, 10)  # A-RELEASE-RP
    connection.close()


# -- data sets ---------------------------------------------------------------------------------


def ct(tmp_path: Path, series_uid: str | None = None, **kwargs) -> Dataset:
    return write_tiny_ct(tmp_path / f"{generate_uid()}.dcm", series_uid=series_uid, **kwargs)


def encode(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def split(dataset: Dataset, before_group: int) -> tuple[bytes, bytes]:
    """The data set encoded in two parts: the groups below ``before_group``, and the rest."""
    head, tail = Dataset(), Dataset()
    for element in dataset:
        (head if element.tag.group < before_group else tail).add(element)
    return encode(head), encode(tail)


def element(group: int, number: int, vr: bytes, length: int) -> bytes:
    """An explicit VR Little Endian element header."""
    if vr in (b"OB", b"SQ", b"UN", b"OW"):
        return struct.pack("<HH2sHL", group, number, vr, 0, length)
    return struct.pack("<HH2sH", group, number, vr, length)


PRIVATE_CREATOR_0009 = element(0x0009, 0x0010, b"LO", 4) + b"TEST"
PRIVATE_CREATOR_0029 = element(0x0029, 0x0010, b"LO", 4) + b"TEST"


def nested(depth: int) -> bytes:
    """A private sequence (0029,1010) nested ``depth`` deep, undefined lengths throughout."""
    opening = element(0x0029, 0x1010, b"SQ", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return PRIVATE_CREATOR_0029 + opening * depth + closing * depth


# -- memory ---------------------------------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def settled_rss_kib(pid: int) -> int:
    """The node's RSS once it stops moving (the warm-up thread imports highdicom at start)."""
    previous = memory_kib(pid, "VmRSS")
    for _ in range(60):  # at most ~30 s
        time.sleep(0.5)
        current = memory_kib(pid, "VmRSS")
        if abs(current - previous) < 1024:
            return current
        previous = current
    return previous


def test_a_giant_private_element_does_not_grow_the_nodes_memory(node, tmp_path):
    pid = node.process.pid
    element_size = 384 * MiB
    connection = raw_associate(node, timeout=60)
    try:
        warm_up = ct(tmp_path)  # the same path (a new series, header read from the file) with a small value
        head, tail = split(warm_up, 0x0010)
        status = store(connection, warm_up.SOPInstanceUID, head, PRIVATE_CREATOR_0009,
                       element(0x0009, 0x1000, b"OB", 512 * 1024), (512 * 1024, 0), tail)
        assert status == 0x0000
        baseline = settled_rss_kib(pid)
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
        except OSError as error:
            pytest.skip(f"cannot reset the node's peak RSS here: {error}")
        big = ct(tmp_path)  # a new series: its whole header is read, the big value lies in it
        head, tail = split(big, 0x0010)
        status = store(connection, big.SOPInstanceUID, head, PRIVATE_CREATOR_0009,
                       element(0x0009, 0x1000, b"OB", element_size), (element_size, 0), tail)
        peak = memory_kib(pid, "VmHWM")
    finally:
        release(connection)
    growth_mib = (peak - baseline) / 1024
    print(f"node RSS before {baseline / 1024:.0f} MiB, peak while storing a {element_size // MiB} MiB "
          f"element {peak / 1024:.0f} MiB (+{growth_mib:.0f} MiB)")
    assert status == 0x0000
    assert growth_mib < 64, f"the node's RSS grew by {growth_mib:.0f} MiB for one {element_size // MiB} MiB element"
    [(path, size)] = rows(node, "select path, size_bytes from instance where sop_instance_uid = ?",
                          big.SOPInstanceUID)
    assert size > element_size and (node.workdir / "storage" / path).stat().st_size == size
    [(attributes,)] = rows(node, "select attributes from series where series_instance_uid = ?",
                           big.SeriesInstanceUID)
    assert '"Modality": "CT"' in attributes  # the header around the big value was indexed


# -- data sets cut short or nested too deep ---------------------------------------------------------


def test_pixel_data_declared_longer_than_what_came_is_refused_and_nothing_kept(node, tmp_path):
    dataset = ct(tmp_path, rows=16, cols=16)
    encoded = encode(dataset)
    connection = raw_associate(node, timeout=60)
    try:
        status = store(connection, dataset.SOPInstanceUID, encoded[:-200])  # 200 pixel bytes missing
        whole = ct(tmp_path, series_uid=dataset.SeriesInstanceUID, rows=16, cols=16)
        status_whole = store(connection, whole.SOPInstanceUID, encode(whole))
    finally:
        release(connection)
    assert status == 0xC000
    assert status_whole == 0x0000  # the association goes on
    assert rows(node, "select sop_instance_uid from instance") == [(whole.SOPInstanceUID,)]
    assert len(stored_files(node)) == 1 and not received_leftovers(node)
    assert "runs past the end of the data set" in node.log()


def test_a_known_series_is_cut_short_the_same(node, tmp_path):
    first = ct(tmp_path, rows=16, cols=16)
    second = ct(tmp_path, series_uid=first.SeriesInstanceUID, rows=16, cols=16)
    connection = raw_associate(node, timeout=60)
    try:
        assert store(connection, first.SOPInstanceUID, encode(first)) == 0x0000
        status = store(connection, second.SOPInstanceUID, encode(second)[:-200])
    finally:
        release(connection)
    assert status == 0xC000
    assert rows(node, "select sop_instance_uid from instance") == [(first.SOPInstanceUID,)]
    assert len(stored_files(node)) == 1 and not received_leftovers(node)


def test_a_sequence_nested_10000_deep_is_refused_for_a_new_and_a_known_series_alike(node, tmp_path):
    first = ct(tmp_path)
    known = ct(tmp_path, series_uid=first.SeriesInstanceUID)
    new = ct(tmp_path)
    modest = ct(tmp_path, series_uid=first.SeriesInstanceUID)
    connection = raw_associate(node, timeout=60)
    try:
        assert store(connection, first.SOPInstanceUID, encode(first)) == 0x0000
        statuses = {}
        for name, dataset, depth in (("known", known, 10_000), ("new", new, 10_000), ("modest", modest, 8)):
            head, tail = split(dataset, 0x0029)  # after (0028,0008), where the quick scan stops
            statuses[name] = store(connection, dataset.SOPInstanceUID, head, nested(depth), tail)
    finally:
        release(connection)
    assert statuses == {"known": 0xC000, "new": 0xC000, "modest": 0x0000}
    assert {uid for (uid,) in rows(node, "select sop_instance_uid from instance")} == {
        first.SOPInstanceUID, modest.SOPInstanceUID}
    assert len(stored_files(node)) == 2 and not received_leftovers(node)
    assert node.log().count("sequences nested deeper than 32") == 2


# -- the free-disk reserve -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (skipped where mounting is not permitted); unmounted afterwards."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             check=False, capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        for _ in range(20):  # bounded: a process that just exited may hold it for a moment
            unmounted = subprocess.run(["umount", str(mount_point)], check=False, capture_output=True,
                                       text=True, timeout=30)
            if unmounted.returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)
            raise AssertionError(f"the tmpfs stayed busy: {unmounted.stderr.strip()}")


def test_the_disk_reserve_is_checked_while_an_instance_streams_in(small_disk, tmp_path):
    # storage and database on a 64 MiB disk of which 24 MiB must stay free; a 42 MiB instance
    # fits the disk (and the reserve when it starts) but would eat into the reserve
    node = NodeProcess(small_disk / "node")
    node.config_path.write_text(node.config_path.read_text().replace("min_free_disk_mb = 0",
                                                                     "min_free_disk_mb = 24"))
    big = write_tiny_ct(tmp_path / "big.dcm", rows=4608, cols=4608)
    small = write_tiny_ct(tmp_path / "small.dcm", series_uid=big.SeriesInstanceUID)
    node.start()
    try:
        failures = storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "big.dcm"], NODE_AE))
        free_after = shutil.disk_usage(small_disk).free
        leftovers = received_leftovers(node)
        stored = stored_files(node)
        second = storescu("127.0.0.1", node.port, [tmp_path / "small.dcm"], NODE_AE)
    finally:
        node.stop()
    assert len(failures) == 1 and failures[0].status == "Refused: OutOfResources", failures
    assert stored == [] and leftovers == []  # the partial file was removed
    assert free_after > 24 * MiB, f"{free_after // MiB} MiB free: the reserve was eaten into"
    assert not storescu_failures(second)  # the database and the node are fine
    assert rows(node, "select sop_instance_uid from instance") == [(small.SOPInstanceUID,)]
    assert "MiB must stay free" in node.log()


def test_a_full_disk_under_the_index_is_out_of_resources(small_disk):
    # the index's SQLite database on a disk filled up to the last byte: the row cannot be
    # written, and the receiver is told "disk full" (A700 for the sender), not an unknown error
    database = Database(f"sqlite:///{small_disk / 'node.db'}")
    database.upgrade()
    writer = IndexWriter(database)
    header = Dataset()
    header.Modality = "CT"
    item = ReceivedInstance(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                            sop_class_uid=CTImageStorage, transfer_syntax_uid=ExplicitVRLittleEndian,
                            path="instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm", size_bytes=100,
                            calling_ae_title="STORESCU", header=header)
    try:
        with open(small_disk / "filler", "wb", buffering=0) as filler:
            block = bytes(MiB)
            for _ in range(128):  # bounded: the disk holds 64 MiB
                try:
                    filler.write(block)
                except OSError:
                    break
        with pytest.raises(DiskFullError):
            writer.record(item, series_known=False)
    finally:
        writer.stop()
        database.dispose()



def test_a_stored_file_whose_index_row_fails_is_removed(small_disk, tmp_path):
    # the storage has room, the database's disk is full: the sender gets A700 and the file
    # moved into instances/ is taken out again, so no stored file is left without its row
    from dicom_ai_node.config import NodeConfig
    from dicom_ai_node.receive.commands import Command
    from dicom_ai_node.receive.incoming import IncomingInstance, file_meta
    from dicom_ai_node.receive.scp import OUT_OF_RESOURCES, StorageSCP
    from dicom_ai_node.storage import Storage

    database = Database(f"sqlite:///{small_disk / 'node.db'}")
    database.upgrade()
    storage = Storage(tmp_path / "storage")
    scp = StorageSCP(NodeConfig(port=0, storage_dir=tmp_path / "storage", min_free_disk_mb=1), database, storage)
    scp.start()
    try:
        dataset = ct(tmp_path)
        meta = file_meta(CTImageStorage, dataset.SOPInstanceUID, ExplicitVRLittleEndian, "STORESCU",
                         "1.2.3", "TEST")
        instance = IncomingInstance(storage, meta)
        instance.write(memoryview(encode(dataset)))
        instance.finish()
        with open(small_disk / "filler", "wb", buffering=0) as filler:
            for _ in range(128):  # bounded: the disk holds 64 MiB
                try:
                    filler.write(bytes(MiB))
                except OSError:
                    break
        request = Command(command_field=1, message_id=1, has_data_set=True,
                          affected_sop_class_uid=CTImageStorage, affected_sop_instance_uid=dataset.SOPInstanceUID)
        status, _, _ = scp.store(instance, request, ExplicitVRLittleEndian, "STORESCU")
        assert status == OUT_OF_RESOURCES
        assert not [p for p in (tmp_path / "storage" / "instances").rglob("*") if p.is_file()]
    finally:
        scp.stop()
        database.dispose()

# -- restarts -----------------------------------------------------------------------------------------


def test_a_restart_reports_only_really_half_received_instances(node, tmp_path):
    write_tiny_ct(tmp_path / "one.dcm")
    assert not storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE))
    incoming = incoming_folder(node)
    node.stop()
    spares = list(incoming.iterdir())
    assert spares and all(p.stat().st_size == 0 for p in spares)  # the node's own spare files
    seen = len(node.log())
    node.start()
    assert "half-received" not in node.log()[seen:]
    node.stop()
    (incoming / "12345-0.tmp").write_bytes(b"\0" * 132 + b"part of a data set")  # cut off by a crash
    seen = len(node.log())
    node.start()
    assert "removed 1 half-received instances" in node.log()[seen:]
    assert not (incoming / "12345-0.tmp").exists()
