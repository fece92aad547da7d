"""results/conform.py: what a result copies from a sloppy source is made valid (unit level; the
end-to-end proof with dciodvfy is tests/test_fitness.py and tests/test_quirks_end_to_end.py)."""

from __future__ import annotations

import io
import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage

from dicom_ai_node.results.conform import (
    _mended_person_name,
    conform_result,
    conform_source,
    conform_values,
)


def raw_dataset(*elements: tuple[int, int, bytes, bytes]) -> Dataset:
    """A data set read from Explicit VR Little Endian bytes, as the node reads a header."""
    data = b""
    for group, element, vr, value in elements:
        value += b" " if len(value) % 2 else b""
        data += struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value
    return read_dataset(io.BytesIO(data), False, True)


@pytest.mark.parametrize("name, mended", [
    ("Doe^John^^^^", "Doe^John"),
    ("A^B^C^D^E^F", "A^B^C^D^E F"),
    ("DOE JOHN", "DOE JOHN"),
    ("Yamada^Tarou=山田^太郎=", "Yamada^Tarou=山田^太郎"),
])
def test_person_names_keep_at_most_five_components_and_no_trailing_empty_ones(name, mended):
    assert _mended_person_name(name) == mended


def test_values_the_vr_does_not_allow_are_mended_or_emptied_never_kept():
    dataset = raw_dataset(
        (0x0008, 0x0020, b"DA", b"2020-01-31"),          # StudyDate with dashes
        (0x0008, 0x0030, b"TM", b"10:15:00"),            # StudyTime with colons
        (0x0008, 0x0060, b"CS", b"ct"),                  # Modality in lower case
        (0x0010, 0x0040, b"CS", b"x"),                   # PatientSex: not M, F or O
        (0x0018, 0x0015, b"CS", b"Chest "),              # BodyPartExamined
        (0x0018, 0x0050, b"DS", b"2.500000000000000001"),  # SliceThickness of 20 characters
        (0x0020, 0x0013, b"IS", b"7.0"),                 # InstanceNumber written as a float
        (0x0028, 0x0010, b"US", b"\x01\x02\x03\x04"),    # Rows holding two values' bytes: fine
    )
    changes = conform_values(dataset)
    assert dataset.StudyDate == "20200131" and dataset.StudyTime == "101500"
    assert dataset.Modality == "CT" and dataset.BodyPartExamined == "CHEST"
    assert dataset.PatientSex in ("", None)  # emptied: Type 2, unknown
    assert str(dataset.SliceThickness) == "2.5" and int(dataset.InstanceNumber) == 7
    assert len(changes) == 7 and all("Patient" not in c or "PatientSex" in c for c in changes)
    assert not conform_values(dataset)  # a second pass finds nothing left to change


def test_a_value_read_as_bytes_wrong_length_is_left_out():
    dataset = raw_dataset((0x0018, 0x9306, b"FD", b"\x00\x00\x80\x3f"))  # FD of 4 bytes
    assert isinstance(dataset[0x00189306].value, bytes)  # pydicom's convert_wrong_length_to_UN
    assert conform_values(dataset) == ["SingleCollimationWidth could not be read as FD and was left out"]
    assert 0x00189306 not in dataset


def test_the_copied_modules_of_a_source_get_their_type2_and_lose_items_without_type1():
    source = Dataset()
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    source.StudyInstanceUID = "1.2.3"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    source.ReferencedStudySequence = [item]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "L", "CT chest"
    incomplete = Dataset()
    incomplete.CodeValue, incomplete.CodingSchemeDesignator = "X", "L"
    source.ProcedureCodeSequence = [code, incomplete]

    changes = conform_source(source)
    assert source.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        assert keyword in source and not source[keyword].value, keyword
    assert "ReferencedStudySequence" not in source  # Type 3: gone with its only item
    assert [c.CodeValue for c in source.ProcedureCodeSequence] == ["CTCHEST"]
    assert "ReferencedStudySequence item 1 lacked Type 1 ReferencedSOPClassUID and was left out" in changes
    assert "ProcedureCodeSequence item 2 lacked Type 1 CodeMeaning and was left out" in changes
    assert not conform_source(source)


def test_a_result_copied_whole_is_checked_in_all_its_modules():
    derived = Dataset()
    derived.SOPClassUID = CTImageStorage
    derived.ImageType = ["derived", "secondary", "axial"]
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = "1.2.3"  # no class: a Type 1 of the reference macro
    derived.ReferencedImageSequence = [reference]
    changes = conform_result(derived, copied_whole=True)
    assert derived.ImageType == ["DERIVED", "SECONDARY", "AXIAL"]
    assert "ReferencedImageSequence" not in derived
    assert "KVP" in derived and "AcquisitionNumber" in derived  # CT Image module's Type 2, added empty
    assert any("ReferencedImageSequence item 1" in change for change in changes)
    # a highdicom-built result is checked only in what it copied: its other modules stay as built
    seg_like = Dataset()
    seg_like.SOPClassUID = CTImageStorage
    assert "KVP" not in seg_like and not any("KVP" in c for c in conform_result(seg_like))


def test_identity_removed_without_a_method_keeps_the_flag_and_says_the_method_is_unknown():
    # NSCLC-Radiomics LUNG1-001 (TCIA): PatientIdentityRemoved YES, no method (a Type 1C error)
    source = Dataset()
    source.PatientIdentityRemoved = "YES"
    changes = conform_source(source)
    assert source.PatientIdentityRemoved == "YES" and source.DeidentificationMethod == "not stated by the source"
    assert any("de-identification method" in change for change in changes)
    assert not any("de-identification" in change for change in conform_source(source))
