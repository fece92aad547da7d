"""Synthetic CT series for tests: valid CT Image Storage files with a known phantom.

    series = make_ct_series(tmp_path, shape=(12, 48, 64))
    volume = load_series(series.paths)
    assert np.allclose(volume.pixels, series.hu)

The phantom is a body ellipse at ~0 HU in air (-1000 HU) with two lung-like regions at
~-850 HU. The lungs are asymmetric (the right one, on the image's left, is larger) and
start a few slices above the bottom of the stack, so any flip of rows, columns or slices
shows up in a comparison. ``series.lung_mask`` is the ground-truth lung mask.

Every file passes dciodvfy. ``series.hu`` and ``series.lung_mask`` are in volume order
(ascending along the slice normal, the order :func:`load_series` returns), whatever
``reverse`` says about the file order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# Axial tilted 20 degrees about the patient's left-right axis.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(20))), float(-np.sin(np.radians(20))))

RESCALE_INTERCEPT = -1024.0  # stored value 0 is -1024 HU, as on most scanners


@dataclass
class SyntheticSeries:
    paths: list[Path]  # in the order they were written (reversed when reverse=True)
    hu: np.ndarray  # float32 (slices, rows, columns) in volume order
    lung_mask: np.ndarray  # bool, same shape and order as hu
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]  # in volume order


def make_ct_series(
    folder: str | Path,
    shape: tuple[int, int, int] = (12, 48, 64),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
    orientation: tuple[float, ...] = AXIAL,
    reverse: bool = False,
    origin: tuple[float, float, float] = (-25.0, -20.0, -100.0),
    seed: str = "synthetic",
    patient_name: str = "Phantom^Lung",
    patient_id: str = "PHANTOM-001",
    body_part: str = "CHEST",
    study_instance_uid: str | None = None,
    noise_hu: float = 10.0,
    pixels: np.ndarray | None = None,
) -> SyntheticSeries:
    """Write a CT series to ``folder`` and return its files and ground truth.

    ``shape`` and ``spacing`` are (slices, rows, columns) and mm between (slices, rows, columns).
    ``orientation`` is ImageOrientationPatient; slices advance along row x column.
    ``reverse`` writes the files (and InstanceNumbers) from the top slice down, the order
    many scanners use. UIDs derive from ``seed``, so the same arguments give the same files.
    ``pixels``: HU (slices, rows, columns) to write instead of the phantom (e.g. a real scan
    from ../shared/data); ``shape`` is then taken from it and ``lung_mask`` is all False.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row_direction = np.array(orientation[:3], dtype=float)
    column_direction = np.array(orientation[3:], dtype=float)
    normal = np.cross(row_direction, column_direction)
    if pixels is None:
        hu, lung_mask = _phantom(shape, seed, noise_hu)
    else:
        hu = np.clip(np.round(pixels), RESCALE_INTERCEPT, RESCALE_INTERCEPT + 4095).astype(np.float32)
        shape, lung_mask = hu.shape, np.zeros(hu.shape, bool)

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=[seed, *map(str, parts)])

    study_uid = study_instance_uid or uid("study")
    series_uid = uid("series")
    frame_of_reference_uid = uid("frame-of-reference")
    sop_uids = [uid("instance", index) for index in range(shape[0])]
    order = list(range(shape[0]))[::-1] if reverse else list(range(shape[0]))

    paths = []
    for instance_number, index in enumerate(order, start=1):
        position = np.array(origin) + index * spacing[0] * normal
        ds = _ct_header(patient_name, patient_id, body_part, study_uid, series_uid, frame_of_reference_uid)
        ds.SOPInstanceUID = sop_uids[index]
        ds.InstanceNumber = instance_number
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
        ds.SliceThickness = _ds(spacing[0])
        ds.SliceLocation = _ds(float(position @ normal))
        ds.Rows, ds.Columns = shape[1], shape[2]
        stored = np.clip(np.round(hu[index] - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.file_meta = _file_meta(ds)
        path = folder / f"CT{instance_number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return SyntheticSeries(paths, hu, lung_mask, study_uid, series_uid, sop_uids)


def _phantom(shape, seed: str, noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    slices, rows, columns = shape
    r = (np.arange(rows)[:, None] + 0.5) / rows * 2 - 1  # -1..1 down the image
    c = (np.arange(columns)[None, :] + 0.5) / columns * 2 - 1  # -1..1 across
    body = (r / 0.8) ** 2 + (c / 0.9) ** 2 <= 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    lung_mask = np.zeros(shape, dtype=bool)
    first_lung_slice = max(1, slices // 4)  # lungs absent from the lowest slices
    for z in range(slices):
        hu[z][body] = 0.0
        if z < first_lung_slice:
            continue
        grow = 0.6 + 0.4 * (z - first_lung_slice + 1) / (slices - first_lung_slice)
        right = ((r + 0.05) / (0.55 * grow)) ** 2 + ((c + 0.42) / (0.33 * grow)) ** 2 <= 1
        left = ((r + 0.05) / (0.45 * grow)) ** 2 + ((c - 0.45) / (0.25 * grow)) ** 2 <= 1
        lung_mask[z] = (right | left) & body
    hu[lung_mask] = -850.0
    if noise_hu:
        rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
        hu += rng.normal(0, noise_hu, shape).astype(np.float32)
    # Keep to what 12-bit unsigned storage with intercept -1024 can hold, so files equal ``hu``.
    return np.clip(np.round(hu), RESCALE_INTERCEPT, RESCALE_INTERCEPT + 4095).astype(np.float32), lung_mask


def _ct_header(patient_name, patient_id, body_part, study_uid, series_uid, frame_of_reference_uid) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240115"
    ds.InstanceCreationTime = "101500"
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "CT CHEST"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Synthetic chest CT"
    ds.SeriesDate = "20240115"
    ds.SeriesTime = "101500"
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "Synthetic Scanners"
    ds.ManufacturerModelName = "Phantom CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    # General Image / acquisition
    ds.AcquisitionNumber = 1
    ds.ContentDate = "20240115"
    ds.ContentTime = "101500"
    ds.AcquisitionDate = "20240115"
    ds.AcquisitionTime = "101500"
    # Image Pixel + CT Image (stored 12-bit unsigned, HU = stored - 1024)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    # VOI LUT: a lung window
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return ds


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]
