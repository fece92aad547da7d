"""Paths come only from checked UIDs; writes are atomic and refuse when the disk is full."""

from __future__ import annotations

import os

import pytest

from dicom_ai_node.storage import DiskFullError, Storage, check_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.123", "0"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.3 ", "1.2\\3", "1.2\n3", "1." + "2" * 64, None, 12])
def test_what_cannot_be_an_identifier_is_refused(tmp_path, uid):
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        Storage(tmp_path).instance_path("1.2.3", uid, "1.2.3.4")


def test_a_uid_with_a_leading_zero_is_stored_but_is_not_valid_for_results(tmp_path):
    # old archives hold such UIDs; digits and dots name the file as they are (issue 18)
    assert not is_valid_uid("1.2.03")
    assert Storage(tmp_path).instance_path("1.2.3", "1.2.03", "1.2.3.4") == "instances/1.2.3/1.2.03/1.2.3.4.dcm"


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1..2", "1.2.", "1.2.3/4", "1.2.a", ".1",
                                 "05fa52f0e599f17b8186ff18fcdf2b5570a52206a75c4d03afebf5c475dc8758"])
def test_any_other_identifier_is_stored_under_its_hash_never_as_a_path(tmp_path, uid):
    # a hash an anonymiser wrote (pydicom-data bad_sequence.dcm), or a hostile one: stored, as
    # Orthanc stores them, but the file is named by the SHA-256 of it
    assert not is_valid_uid(uid)
    path = Storage(tmp_path).instance_path("1.2.3", uid, "1.2.3.4")
    study, series, name = path.split("/")[1:]
    assert study == "1.2.3" and name == "1.2.3.4.dcm"
    assert series.startswith("h-") and len(series) == 42 and set(series[2:]) <= set("0123456789abcdef")
    assert series != uid and ".." not in path
    assert Storage(tmp_path).study_folder(uid).startswith("instances/h-")


def test_check_uid_message_names_the_attribute():
    with pytest.raises(ValueError, match="SeriesInstanceUID '../ x' is not a valid UID"):
        check_uid("../ x", "SeriesInstanceUID")


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


def test_clearing_incoming_counts_received_files_not_the_spare_ones(tmp_path):
    storage = Storage(tmp_path)
    for _ in range(3):  # the node's own empty spare files
        descriptor, _path = storage._create_incoming()
        os.close(descriptor)
    (storage.incoming / "123-7.tmp").write_bytes(b"\0" * 128 + b"DICM")  # a data set cut off by a crash
    assert storage.clear_incoming() == 1
    assert list(storage.incoming.iterdir()) == []


def test_moving_into_place_says_whether_a_file_was_replaced(tmp_path):
    storage = Storage(tmp_path)
    relative = storage.instance_path("1.2", "1.2.3", "1.2.3.4")
    for expected in (False, True):
        descriptor, temporary = storage._create_incoming()
        os.close(descriptor)
        assert storage.commit_incoming(temporary, relative) is expected
    storage.remove(relative)
    assert not storage.absolute(relative).exists()
