"""Paths come only from checked UIDs; writes are atomic and refuse when the disk is full."""

from __future__ import annotations

import pytest

from dicom_ai_node.storage import DiskFullError, Storage, check_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.123", "0"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../../etc/passwd", "1.2.03", "1..2", "1.2.", "1.2.3/4", "1.2.a",
                                 "1." + "2" * 64, None, 12])
def test_invalid_uids_never_make_a_path(tmp_path, uid):
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        Storage(tmp_path).instance_path("1.2.3", uid, "1.2.3.4")


def test_check_uid_message_names_the_attribute():
    with pytest.raises(ValueError, match="SeriesInstanceUID '../x' is not a valid UID"):
        check_uid("../x", "SeriesInstanceUID")


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    storage = Storage(tmp_path)
    path = storage.instance_path("1.2", "1.2.3", "1.2.3.4")
    assert storage.write_atomic(path, [b"abc", b"def"]) == 6
    assert storage.absolute(path).read_bytes() == b"abcdef"
    assert [p.name for p in storage.absolute(path).parent.iterdir()] == ["1.2.3.4.dcm"]


def test_full_disk_is_refused_before_writing(tmp_path):
    storage = Storage(tmp_path, min_free_bytes=2**62)
    with pytest.raises(DiskFullError, match="MiB free"):
        storage.write_atomic(storage.instance_path("1.2", "1.2.3", "1.2.3.4"), b"x")
    assert not list((tmp_path / "instances").rglob("*"))
