"""Push every file of ../shared/data (real scanners, many vendors and transfer syntaxes,
malformed files on purpose) at the node with storescu. The node must never crash, and every
file storescu sends is either stored and indexed, or refused with a failure status and a
logged reason."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest
from pydicom import dcmread

from tests.conftest import requires_shared_data, shared_dicom_files
from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import echoscu, parse_storescu_output, skip_unless_tools, storescu

pytestmark = [pytest.mark.integration, pytest.mark.shared_data, requires_shared_data,
              skip_unless_tools("storescu", "echoscu")]


def dicom_files() -> list:
    """Files with the DICM marker (storescu sends nothing else); NIfTI and text are left out."""
    return shared_dicom_files(max_bytes=float("inf"))


def sop_instance_uid(path) -> str:
    """As dcmtk reads it: pydicom cannot parse some of these files at all."""
    result = subprocess.run(["dcmdump", "-q", "+P", "0008,0018", str(path)], capture_output=True,
                            text=True, timeout=30)
    return result.stdout.split("[", 1)[1].split("]", 1)[0].rstrip("\x00 ")


def patient_names(paths) -> set[str]:
    names = set()
    for path in paths:
        try:
            name = str(dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientName"])
                       .get("PatientName", "")).strip()
        except Exception:
            continue
        if len(name) >= 4 and not name.isdigit():  # short or numeric strings match by chance
            names.add(name)
    return names


def send_in_batches(port: int, files: list, size: int = 100) -> list:
    """dcmtk's storescu itself segfaults on a few of these malformed files while scanning them;
    send in batches and, when a batch crashes storescu, file by file, so one bad file costs
    only itself."""
    outcomes = []
    for start in range(0, len(files), size):
        batch = files[start:start + size]
        result = storescu("127.0.0.1", port, batch, NODE_AE, timeout=300)
        if result.returncode < 0:
            for path in batch:
                single = storescu("127.0.0.1", port, [path], NODE_AE, timeout=60)
                outcomes += parse_storescu_output(single.stdout + single.stderr)
        else:
            outcomes += parse_storescu_output(result.stdout + result.stderr)
    return outcomes


def test_every_shared_file_is_stored_or_refused_with_a_reason(node_factory):
    node = node_factory()
    files = dicom_files()
    assert len(files) > 300
    outcomes = send_in_batches(node.port, files)

    assert node.process.poll() is None, "the node crashed:\n" + node.log()[-3000:]
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0

    with sqlite3.connect(node.workdir / "node.db") as connection:
        indexed = {uid for (uid,) in connection.execute("select sop_instance_uid from instance")}
    accepted = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if o.status is not None and not o.ok]
    assert accepted, "nothing was stored"
    for outcome in accepted:
        sop_uid = sop_instance_uid(outcome.path)
        assert sop_uid in indexed, f"{outcome.path} acknowledged but not indexed"
    log = node.log()
    assert log.count("refused C-STORE") >= len(refused)
    leaked = sorted(name for name in patient_names(o.path for o in accepted) if name in log)
    assert not leaked, f"patient names in the log: {leaked[:5]}"
    print(f"{len(files)} DICOM files: {len(accepted)} stored, {len(refused)} refused with a status, "
          f"{len(outcomes) - len(accepted) - len(refused)} not sent by storescu; {len(indexed)} indexed")
