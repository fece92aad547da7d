"""A "quirk corpus" (issue 18 §7): one folder of real CT files per quirk that real archives hold.

    cases = make_quirk_corpus(tmp_path / "quirks", SHARED_DATA)
    for case in cases:
        storescu(..., case.folder, extra_args=case.storescu_args)
        ...  # case.expect == "result": SEG/SR come back; "refused": the reason contains case.reason

Every case starts from the same real chest CT: the TCIA 4D-Lung planning CT of patient
113_HM10395 (ADAC Pinnacle3 headers, CTP de-identification, Implicit VR Little Endian; licence
TCIA CC BY 3.0) in ``../shared/data``. To keep the end-to-end tests fast the base is a block of
:data:`BLOCK_SLICES` contiguous 3 mm slices chosen from the pixels (the block with the most
lung-density voxels inside the body, > 1.5 litres of lung) and is averaged in-plane 4 x 4
(512 -> 128, HU averaged, stored back with the slice's own slope and intercept); Rows, Columns,
PixelSpacing and ImagePositionPatient follow. Every other real attribute stays as it is
(private CTP elements, the de-identification sequence, ADAC manufacturer, ...). One thing is
normalised: the real files hold their sequences with undefined length; the base writes defined
lengths, so that only the ``undefined_length_sequences`` case has the delimiters.

Each case is that base with one quirk (``QuirkCase.what`` says which) and its own study, series,
SOP instance and frame of reference UIDs and accession number, derived from the case name: the
cases never collide in one node or one Orthanc, and the same call writes the same files.
Nothing from ../shared/data is copied into the repository; the corpus is written where asked.

Sending with dcmtk ``storescu`` (checked against storescp and a pynetdicom SCP, with and
without ``-R``): every file of every case is read and stored, given ``storescu_args``. Those
matter because storescu re-encodes to the transfer syntax the receiver accepts, and the node
accepts the first one proposed in each context: ``-xt`` is needed at all for JPEG-LS (storescu
cannot decompress: "unable to convert dataset ... to 'Little Endian Explicit'"); without ``-xd``
Deflate is never proposed and the files arrive inflated as Explicit VR Little Endian; ``-xb``
puts Big Endian alone in the first context (storescu's default also proposes it, first in its
second context); ``-xi`` keeps ``private_wrong_length`` in Implicit VR, so the receiver must
take the VR from its private dictionary (without it dcmtk sends the elements as explicit UN of
4 bytes, which pydicom still converts with its private dictionary and fails on). Files without
preamble and meta need no option (storescu's default ``+f`` also reads bare data sets). What
storescu never puts on the wire is in :data:`NOT_KEPT_BY_STORESCU`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

BASE_SERIES = Path("chest_ct/bhklab__readii/tests/4D-Lung/113_HM10395/11-26-1999-NA-p4-13296/"
                   "1.000000-P4P113S303I10349 Gated 40.0B-29543")
BLOCK_SLICES = 40  # 3 mm slices in the base block: 12 cm of chest
DOWNSAMPLE = 4  # in-plane block averaging: 512 x 512 -> 128 x 128
LUNG_HU = (-950.0, -500.0)  # "lung" voxels when choosing the block
MIN_LUNG_ML = 1500.0  # the block must hold at least this much lung

# The 8 mm case: what the node is expected to do with it. The lung model takes slices up to
# 10 mm apart since 2.0.1 (its card, "Thick slices"); the end-to-end test reads this.
THICK_SLICE_EXPECT = "result"
THICK_SLICE_REASON = ""
THICK_SLICE_MM = 8.0

_UID_SEED = "dicom-ai-node quirk corpus v1"


@dataclass(frozen=True)
class QuirkCase:
    name: str                  # e.g. "private_wrong_length"
    what: str                  # one sentence: what is odd, as a PACS admin would say it
    folder: Path               # the files to send (only this case's files)
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]  # of the files written, in slice (position) order where positions exist
    expect: str                # "result" or "refused"
    reason: str = ""           # for "refused": a lower-case substring the refusal reason should contain
    storescu_args: tuple[str, ...] = ()  # extra storescu options this case needs (e.g. to propose its transfer syntax)


# --------------------------------------------------------------------------------------------
# The base: a real lung block, downsampled


def _normal(ds: Dataset) -> np.ndarray:
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(orientation[:3], orientation[3:])


def _position_along_normal(ds: Dataset) -> float:
    return float(np.array([float(v) for v in ds.ImagePositionPatient]) @ _normal(ds))


def _fmt(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _store_hu(ds: Dataset, hu: np.ndarray, *, signed: bool | None = None) -> None:
    """Store HU in ds with its own RescaleSlope/RescaleIntercept (16 bits); PixelRepresentation
    follows ``signed`` when given. Raises if a value does not fit the stored range."""
    if signed is not None:
        ds.PixelRepresentation = 1 if signed else 0
    stored = np.rint((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    dtype = np.dtype("<i2") if ds.PixelRepresentation == 1 else np.dtype("<u2")
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"HU {hu.min()}..{hu.max()} do not fit {dtype} with slope "
                         f"{ds.RescaleSlope} and intercept {ds.RescaleIntercept}")
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.astype(dtype).tobytes()
    ds["PixelData"].VR = "OW"


def _downsample(ds: Dataset, factor: int) -> None:
    """Average HU in factor x factor blocks, in place; geometry follows."""
    hu = _hu(ds)
    rows, columns = hu.shape
    small = hu.reshape(rows // factor, factor, columns // factor, factor).mean(axis=(1, 3))
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    # the centre of the first new pixel: the middle of the first factor x factor block
    shift = (factor - 1) / 2
    position = position + shift * column_spacing * orientation[:3] + shift * row_spacing * orientation[3:]
    _store_hu(ds, small)
    ds.PixelSpacing = [_fmt(row_spacing * factor), _fmt(column_spacing * factor)]
    ds.ImagePositionPatient = [_fmt(v) for v in position]


def _defined_lengths(ds: Dataset) -> None:
    """Convert every raw element (recursively) and give sequences and items defined lengths."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False
                _defined_lengths(item)


def lung_voxels(ds: Dataset) -> int:
    """Voxels of lung density (LUNG_HU) inside the body (holes of the > -500 HU mask filled)."""
    from scipy import ndimage

    hu = _hu(ds)
    body = ndimage.binary_fill_holes(hu > -500)
    return int(np.count_nonzero(body & (hu > LUNG_HU[0]) & (hu < LUNG_HU[1])))


def lung_volume_ml(slices: list[Dataset]) -> float:
    """Lung-density volume of a stack of parallel slices, in ml (slice spacing from positions)."""
    positions = sorted(_position_along_normal(ds) for ds in slices)
    spacing = float(np.median(np.diff(positions))) if len(positions) > 1 else float(slices[0].SliceThickness)
    total = 0.0
    for ds in slices:
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        total += lung_voxels(ds) * row_spacing * column_spacing * spacing
    return total / 1000.0


@functools.lru_cache(maxsize=4)
def _series(series_dir: str) -> tuple[tuple[Dataset, ...], int]:
    """The whole real series downsampled (ascending along the slice normal) and the index of
    the first slice of the lung block."""
    paths = sorted(Path(series_dir).glob("*.dcm"))
    if not paths:
        raise FileNotFoundError(f"no DICOM files in {series_dir}")
    slices = []
    for path in paths:
        ds = pydicom.dcmread(path)
        _defined_lengths(ds)
        _downsample(ds, DOWNSAMPLE)
        slices.append(ds)
    slices.sort(key=_position_along_normal)
    counts = np.array([lung_voxels(ds) for ds in slices])
    if len(slices) < BLOCK_SLICES:
        raise ValueError(f"{series_dir}: {len(slices)} slices, fewer than {BLOCK_SLICES}")
    window = np.convolve(counts, np.ones(BLOCK_SLICES, dtype=np.int64), mode="valid")
    start = int(np.argmax(window))
    volume = lung_volume_ml(slices[start:start + BLOCK_SLICES])
    if volume < MIN_LUNG_ML:
        raise ValueError(f"the lung block of {series_dir} holds {volume:.0f} ml of lung, "
                         f"less than {MIN_LUNG_ML:.0f}")
    return tuple(slices), start


def _series_dir(shared_data: Path) -> str:
    return str((Path(shared_data) / BASE_SERIES).resolve())


def base_slices(shared_data: Path) -> list[Dataset]:
    """The clean downsampled lung block (ascending along the slice normal), deep copies."""
    slices, start = _series(_series_dir(shared_data))
    return [copy.deepcopy(ds) for ds in slices[start:start + BLOCK_SLICES]]


def _all_slices(shared_data: Path) -> list[Dataset]:
    """The whole real series, downsampled (ascending), deep copies."""
    slices, _ = _series(_series_dir(shared_data))
    return [copy.deepcopy(ds) for ds in slices]


# --------------------------------------------------------------------------------------------
# Helpers for the cases


def _uid(name: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[_UID_SEED, name, *map(str, parts)])


def accession_number(name: str) -> str:
    """The case's accession number: 'QK' and 12 hex digits of the name's hash (14 characters)."""
    return "QK" + hashlib.sha256(name.encode()).hexdigest()[:12].upper()


def _identify(name: str, slices: list[Dataset]) -> None:
    """Give the case its own study, series, SOP instance and frame of reference UIDs and
    accession number (slices in position order)."""
    study, series, frame = _uid(name, "study"), _uid(name, "series"), _uid(name, "frame-of-reference")
    for index, ds in enumerate(slices):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = _uid(name, "instance", index)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        ds.AccessionNumber = accession_number(name)


def _raw(ds: Dataset, keyword: str | int, value: bytes) -> None:
    """Put ``value`` on disk exactly (padded to even length with a space) in an Implicit VR
    file. pydicom would validate, convert and re-encode a value given with the element's own
    VR (and turns VR UN of a public tag back into it), but writes OB bytes untouched; Implicit
    VR has no VR on disk, so a reader sees the dictionary VR with exactly these bytes."""
    tag = Tag(keyword)
    if len(value) % 2:
        value += b" "
    ds[tag] = DataElement(tag, "OB", value)
    _RAW_TAGS.add(tag)


_RAW_TAGS: set[int] = set()  # tags _raw has written: only Implicit VR keeps them honest


@contextlib.contextmanager
def _no_validation() -> Iterator[None]:
    """pydicom writes invalid values (the point of the corpus) without complaint."""
    saved = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = saved


def _write(path: Path, ds: Dataset) -> None:
    """A Part 10 file in the transfer syntax named in its file meta."""
    if not ds.file_meta.TransferSyntaxUID.is_implicit_VR:
        raw = [tag for tag in _RAW_TAGS if tag in ds and ds[tag].VR == "OB"]
        if raw:
            raise AssertionError(f"raw values {raw} would be written as OB in Explicit VR")
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_big_endian(path: Path, ds: Dataset) -> None:
    """Explicit VR Big Endian (the pixel bytes already swapped: see _big_endian)."""
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)


def _write_no_preamble(path: Path, ds: Dataset) -> None:
    """The bare data set, Implicit VR Little Endian: no preamble, no 'DICM', no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The cases. Each builder gets the identified base block (a fresh copy) and the case name and
# returns the data sets to write, in slice order.

Builder = Callable[[str, list[Dataset], Path], list[Dataset]]


def _clean(name, slices, shared_data):
    return slices


# 4 bytes where the private dictionary says FD (8): pydicom raises BytesLengthException when
# the element is read. Philips CT writes creator "ELSCINT1" in group 01F1 (pydicom: (01F1,1026)
# Pitch, FD); "Philips Imaging DD 001" has no (01F1,xx26) entry in pydicom's dictionary, so its
# own FD element (2001,xx4F) Harmonization Offset carries the same fault in group 2001.
PRIVATE_WRONG_LENGTH = (
    (0x01F1, "ELSCINT1", 0x26),
    (0x2001, "Philips Imaging DD 001", 0x4F),
)


def _private_wrong_length(name, slices, shared_data):
    from pydicom.datadict import private_dictionary_VR

    for group, creator, element in PRIVATE_WRONG_LENGTH:
        tag = (group << 16) | 0x1000 | element
        vr = private_dictionary_VR(tag, creator)
        if vr != "FD":
            raise AssertionError(f"pydicom's private dictionary has {vr} for {tag:08X} of {creator!r}")
        for ds in slices:
            ds.add_new((group << 16) | 0x0010, "LO", creator)
            # a float32 (FL, 4 bytes) where FD (8 bytes) belongs
            ds[tag] = DataElement(tag, "UN", np.array([0.9375], "<f4").tobytes())
    return slices


def _frame_of_reference_per_slice(name, slices, shared_data):
    for index, ds in enumerate(slices):
        ds.FrameOfReferenceUID = _uid(name, "frame-of-reference", index)
    return slices


def _no_frame_of_reference(name, slices, shared_data):
    for ds in slices:
        del ds.FrameOfReferenceUID
        if "PositionReferenceIndicator" in ds:
            del ds.PositionReferenceIndicator
    return slices


MISSING_TYPE2 = ("PatientBirthDate", "PatientSex", "PatientName", "ReferringPhysicianName",
                 "StudyDate", "StudyTime", "StudyID", "AccessionNumber")


def _missing_type2_patient_study(name, slices, shared_data):
    for ds in slices:
        for keyword in MISSING_TYPE2:
            if keyword in ds:
                delattr(ds, keyword)
    return slices


def _referenced_items_missing_type1(name, slices, shared_data):
    for ds in slices:
        study = Dataset()
        study.ReferencedSOPInstanceUID = _uid(name, "referenced-study")  # no ReferencedSOPClassUID
        ds.ReferencedStudySequence = Sequence([study])
        step = Dataset()
        step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"  # MPPS; no ReferencedSOPInstanceUID
        ds.ReferencedPerformedProcedureStepSequence = Sequence([step])
        code = Dataset()
        code.CodeValue = "CTCHEST"
        code.CodingSchemeDesignator = "99LOCAL"  # no CodeMeaning
        ds.ProcedureCodeSequence = Sequence([code])
    return slices


def _lowercase_padded_code_strings(name, slices, shared_data):
    for ds in slices:
        _raw(ds, "BodyPartExamined", b"Chest ")
        _raw(ds, "PatientSex", b"m ")
        _raw(ds, "PatientPosition", b"hfs ")
        _raw(ds, "ImageType", b"original\\primary\\axial")
    return slices


# On disk "chest" plus a space: the trailing space is the padding of an odd-length value, so a
# reader that strips padding sees "chest", one that does not sees "chest ". (dcmtk strips any
# extra trailing spaces when it sends, so more spaces would not reach the node via storescu.)
BODY_PART_PADDED = b"chest "


def _body_part_chest_padded(name, slices, shared_data):
    for ds in slices:
        _raw(ds, "BodyPartExamined", BODY_PART_PADDED)
    return slices


def _body_part_absent(name, slices, shared_data):
    for ds in slices:
        del ds.BodyPartExamined
    return slices


PN_RETIRED = {"PatientName": b"DOE JOHN", "ReferringPhysicianName": b"Doe^John^^^^",
              "OperatorsName": b"A^B^C^D^E^F"}


def _pn_retired_forms(name, slices, shared_data):
    for ds in slices:
        for keyword, value in PN_RETIRED.items():
            _raw(ds, keyword, value)
    return slices


CHARSET_TEXT = {
    "charset_latin1": ("ISO_IR 100", "Müller^Jürgen", "Thorax Übersicht"),
    "charset_utf8": ("ISO_IR 192", "Øresund^Zoë", "Θώρακας / Грудная клетка"),
    "charset_iso2022_ir87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", None),
}


def _charset(name, slices, shared_data):
    charset, patient_name, study_description = CHARSET_TEXT[name]
    for ds in slices:
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name  # pydicom encodes with the data set's character set
        if study_description is not None:
            ds.StudyDescription = study_description
    return slices


DS_TOO_LONG = ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "RescaleIntercept")
DS_TOO_LONG_CHARACTERS = 20


def _ds_long(text: str) -> bytes:
    """The same number in DS_TOO_LONG_CHARACTERS characters: '3.9064' -> '3.906400000000000001'
    (the trailing 1 is below double precision, so the value read back is unchanged)."""
    text = text.strip()
    if "." not in text and "e" not in text.lower():
        text += "."
    return (text.ljust(DS_TOO_LONG_CHARACTERS - 1, "0") + "1").encode()


def _ds_too_long(name, slices, shared_data):
    for ds in slices:
        for keyword in DS_TOO_LONG:
            elem = ds[keyword]
            values = elem.value if elem.VM > 1 else [elem.value]
            _raw(ds, keyword, b"\\".join(_ds_long(str(v)) for v in values))
    return slices


def _monochrome1(name, slices, shared_data):
    for ds in slices:
        ds.PhotometricInterpretation = "MONOCHROME1"
    return slices


PIXEL_PADDING_STORED = -2000  # with intercept -1024: -3024 HU, below any real value
PIXEL_PADDING_INTERCEPT = -1024
PIXEL_PADDING_RADIUS = 0.9  # of half the width: the circular field of view


def _pixel_padding(name, slices, shared_data):
    for ds in slices:
        hu = _hu(ds)
        ds.RescaleIntercept = str(PIXEL_PADDING_INTERCEPT)
        _store_hu(ds, hu, signed=True)
        stored = ds.pixel_array.copy()
        rows, columns = stored.shape
        y, x = np.mgrid[:rows, :columns]
        radius = PIXEL_PADDING_RADIUS * columns / 2
        outside = (y - (rows - 1) / 2) ** 2 + (x - (columns - 1) / 2) ** 2 > radius ** 2
        stored[outside] = PIXEL_PADDING_STORED
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.add_new("PixelPaddingValue", "SS", PIXEL_PADDING_STORED)
    return slices


def _signed_unsigned_mixed(name, slices, shared_data):
    for index, ds in enumerate(slices):
        hu = _hu(ds)
        if index % 2 == 0:
            ds.RescaleIntercept = "-1024"
            _store_hu(ds, hu, signed=False)
        else:
            ds.RescaleIntercept = "0"
            _store_hu(ds, hu, signed=True)
    return slices


RESCALES = (("1", "-1024"), ("0.5", "-1000"), ("1", "-2048"), ("0.5", "-2048"))  # (slope, intercept)


def _rescale_varies(name, slices, shared_data):
    for index, ds in enumerate(slices):
        hu = _hu(ds)
        ds.RescaleSlope, ds.RescaleIntercept = RESCALES[index % len(RESCALES)]
        _store_hu(ds, hu)
    return slices


GANTRY_TILT_DEGREES = 15.0


def _gantry_tilt(name, slices, shared_data):
    spacing = _position_along_normal(slices[1]) - _position_along_normal(slices[0])
    shift = math.tan(math.radians(GANTRY_TILT_DEGREES)) * spacing
    for index, ds in enumerate(slices):
        column_direction = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        position = np.array([float(v) for v in ds.ImagePositionPatient]) + index * shift * column_direction
        ds.ImagePositionPatient = [_fmt(v) for v in position]
        ds.GantryDetectorTilt = _fmt(GANTRY_TILT_DEGREES)
    return slices


def _missing_position_one_slice(name, slices, shared_data):
    del slices[len(slices) // 2].ImagePositionPatient
    return slices


def _duplicate_instance_number(name, slices, shared_data):
    for ds in slices:
        ds.InstanceNumber = 1
    return slices


MIXED_SIZE_SLICES = 3  # at the top end of the block, at 64 x 64


def _mixed_rows_columns(name, slices, shared_data):
    for ds in slices[-MIXED_SIZE_SLICES:]:
        _downsample(ds, 2)
    return slices


def _no_preamble(name, slices, shared_data):
    for ds in slices:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    return slices


def _deflate(name, slices, shared_data):
    for ds in slices:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # pydicom deflates on write
    return slices


def _jpeg_ls(name, slices, shared_data):
    for ds in slices:
        ds.compress(JPEGLSLossless)  # encodes with pyjpegls, sets the transfer syntax
    return slices


def _big_endian(name, slices, shared_data):
    """pydicom byte-swaps the numbers it writes but writes OW Pixel Data bytes as they are:
    swap the 16-bit pixels (stored little endian by _store_hu) here."""
    for ds in slices:
        little = "<i2" if ds.PixelRepresentation == 1 else "<u2"
        ds.PixelData = np.frombuffer(ds.PixelData, little).astype(little.replace("<", ">")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    return slices


def _undefined_length_sequences(name, slices, shared_data):
    for ds in slices:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = _uid(name, "localizer")  # a scout that is not sent
        ds.ReferencedImageSequence = Sequence([item])
        for keyword in ("DeidentificationMethodCodeSequence", "ReferencedImageSequence"):
            ds[keyword].is_undefined_length = True
            for sequence_item in ds[keyword].value:
                sequence_item.is_undefined_length_sequence_item = True
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return slices


def _thick_slices(name, slices, shared_data):
    """Every THICK_SLICE_MM through the whole real series, HU interpolated linearly along z."""
    full = _all_slices(shared_data)
    z = np.array([_position_along_normal(ds) for ds in full])
    volume = np.stack([_hu(ds) for ds in full])
    targets = np.arange(z[0], z[-1] + 1e-6, THICK_SLICE_MM)
    normal = _normal(full[0])
    out = []
    for index, target in enumerate(targets):
        upper = min(int(np.searchsorted(z, target, side="right")), len(z) - 1)
        lower = max(upper - 1, 0)
        weight = 0.0 if z[upper] == z[lower] else (target - z[lower]) / (z[upper] - z[lower])
        weight = min(max(weight, 0.0), 1.0)
        hu = (1 - weight) * volume[lower] + weight * volume[upper]
        ds = copy.deepcopy(full[lower if weight < 0.5 else upper])  # the nearest real header
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        position = position + (target - float(position @ normal)) * normal
        ds.ImagePositionPatient = [_fmt(v) for v in position]
        ds.SliceLocation = _fmt(target)
        ds.SliceThickness = _fmt(THICK_SLICE_MM)
        ds.InstanceNumber = len(targets) - index  # top slice first, as in the real series
        _store_hu(ds, hu)
        out.append(ds)
    _identify(name, out)
    return out


@dataclass(frozen=True)
class _Spec:
    what: str
    build: Builder
    expect: str = "result"
    reason: str = ""
    storescu_args: tuple[str, ...] = ()
    write: Callable[[Path, Dataset], None] = _write


_SPECS: dict[str, _Spec] = {
    "clean": _Spec("Nothing odd: the baseline chest CT.", _clean),
    "private_wrong_length": _Spec(
        "Philips-style private elements (ELSCINT1 (01F1,1026) Pitch and Philips Imaging DD 001 "
        "(2001,104F)) hold 4 bytes where the vendor dictionary says an 8-byte double.",
        _private_wrong_length,
        # -xi keeps Implicit VR on the wire: the receiver must take the VR from its private
        # dictionary, as with the many scanners that only send Implicit VR
        storescu_args=("-xi",)),
    "frame_of_reference_per_slice": _Spec(
        "Every slice has a different Frame of Reference UID.", _frame_of_reference_per_slice),
    "no_frame_of_reference": _Spec(
        "Frame of Reference UID and Position Reference Indicator are missing from every slice.",
        _no_frame_of_reference),
    "missing_type2_patient_study": _Spec(
        "Patient name, birth date, sex, referring physician, study date and time, study ID and "
        "accession number are absent, not just empty.", _missing_type2_patient_study),
    "referenced_items_missing_type1": _Spec(
        "Referenced study, performed procedure step and procedure code items each lack a "
        "required attribute (SOP class, SOP instance, code meaning).",
        _referenced_items_missing_type1),
    "lowercase_padded_code_strings": _Spec(
        "Code strings in lower/mixed case: body part 'Chest', sex 'm', patient position 'hfs', "
        "image type 'original\\primary\\axial'.", _lowercase_padded_code_strings),
    "body_part_chest_padded": _Spec(
        "Body Part Examined is 'chest ' in lower case with a trailing space.",
        _body_part_chest_padded),
    "body_part_absent": _Spec("Body Part Examined is missing.", _body_part_absent),
    "pn_retired_forms": _Spec(
        "Person names in old forms: 'DOE JOHN' with a space instead of '^', 'Doe^John^^^^' with "
        "empty trailing components, and an operator name with six components.",
        _pn_retired_forms),
    "charset_latin1": _Spec(
        "Latin-1 (ISO_IR 100) patient name and study description with umlauts.", _charset),
    "charset_utf8": _Spec(
        "UTF-8 (ISO_IR 192) patient name with Ø/ë and a Greek and Cyrillic study description.",
        _charset),
    "charset_iso2022_ir87": _Spec(
        "Japanese patient name (romaji, kanji, kana) in ISO 2022 IR 87 with escape sequences.",
        _charset),
    "ds_too_long": _Spec(
        "Pixel spacing, slice thickness, image position and rescale intercept are written as "
        "decimal strings longer than the 16 characters DICOM allows.", _ds_too_long),
    "monochrome1": _Spec(
        "Photometric interpretation is MONOCHROME1 (inverted display), pixels unchanged.",
        _monochrome1),
    "pixel_padding": _Spec(
        "Signed pixels with a Pixel Padding Value (-3024 HU) outside a circular field of view.",
        _pixel_padding),
    "signed_unsigned_mixed": _Spec(
        "Slices alternate between unsigned pixels (intercept -1024) and signed pixels "
        "(intercept 0) in one series.", _signed_unsigned_mixed),
    "rescale_varies": _Spec(
        "Rescale slope and intercept change from slice to slice (slope 1 or 0.5, intercept "
        "-1024, -1000 or -2048).", _rescale_varies),
    "gantry_tilt": _Spec(
        "Gantry tilted 15 degrees: the slice positions shift along the column direction from "
        "slice to slice.", _gantry_tilt, expect="refused", reason="tilt"),
    "missing_position_one_slice": _Spec(
        "One slice in the middle has no Image Position (Patient).", _missing_position_one_slice,
        expect="refused", reason="imagepositionpatient"),
    "duplicate_instance_number": _Spec(
        "Every slice has Instance Number 1.", _duplicate_instance_number),
    "mixed_rows_columns": _Spec(
        f"The top {MIXED_SIZE_SLICES} slices are 64 x 64 while the rest are 128 x 128.",
        _mixed_rows_columns, expect="refused", reason="different sizes"),
    "no_preamble": _Spec(
        "Files without the 128-byte preamble, 'DICM' and file meta information: bare Implicit "
        "VR data sets.", _no_preamble, write=_write_no_preamble),
    "deflate": _Spec(
        "Deflated Explicit VR Little Endian transfer syntax.",
        _deflate, storescu_args=("-xd",)),
    "big_endian": _Spec(
        "Explicit VR Big Endian (retired) transfer syntax.",
        _big_endian, storescu_args=("-xb",), write=_write_big_endian),
    "jpeg_ls": _Spec(
        "JPEG-LS lossless compressed pixel data.", _jpeg_ls,
        storescu_args=("-xt",)),
    "undefined_length_sequences": _Spec(
        "Sequences and their items with undefined length (delimiter items), Explicit VR "
        "Little Endian.", _undefined_length_sequences),
    "thick_slices_8mm": _Spec(
        f"{THICK_SLICE_MM:g} mm slices through the whole scan (interpolated from the 3 mm series).",
        _thick_slices),  # expect/reason: THICK_SLICE_EXPECT / THICK_SLICE_REASON, read when made
}

CASE_NAMES: tuple[str, ...] = tuple(_SPECS)

# What a case has on disk that dcmtk storescu does not put on the wire (the node then sees the
# case without that part of its quirk); a sender that keeps it is named.
NOT_KEPT_BY_STORESCU: dict[str, str] = {
    "undefined_length_sequences": (
        "dcmtk's DIMSE layer writes every sequence and item with an explicit length, so the "
        "delimiters never reach the receiver; pynetdicom's send_c_store(pydicom.dcmread(file)) "
        "keeps them (pydicom remembers the undefined lengths it read)"),
}


def make_quirk_corpus(root: Path, shared_data: Path, names: Iterable[str] | None = None) -> list[QuirkCase]:
    """Write the chosen cases (all by default) under root/<name>/ and describe them."""
    root = Path(root)
    chosen = list(CASE_NAMES if names is None else names)
    unknown = [n for n in chosen if n not in _SPECS]
    if unknown:
        raise ValueError(f"unknown quirk case(s) {unknown}; known: {list(CASE_NAMES)}")
    cases = []
    with _no_validation():
        for name in chosen:
            spec = _SPECS[name]
            slices = base_slices(shared_data)
            _identify(name, slices)
            slices = spec.build(name, slices, Path(shared_data))
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("IM*.dcm"):
                old.unlink()
            for number, ds in enumerate(slices, start=1):
                spec.write(folder / f"IM{number:04d}.dcm", ds)
            expect, reason = spec.expect, spec.reason
            if name == "thick_slices_8mm":
                expect = THICK_SLICE_EXPECT
                reason = THICK_SLICE_REASON if expect == "refused" else ""
            cases.append(QuirkCase(
                name=name, what=spec.what, folder=folder,
                study_instance_uid=str(slices[0].StudyInstanceUID),
                series_instance_uid=str(slices[0].SeriesInstanceUID),
                sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in slices),
                expect=expect, reason=reason, storescu_args=spec.storescu_args))
    return cases
