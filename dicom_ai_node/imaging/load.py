"""Read a DICOM series (single-frame files or enhanced multi-frame) into a :class:`Volume`.

Every check that can refuse a series raises :class:`VolumeError` with a sentence a PACS
administrator can act on; it is shown on the failed job.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName

from dicom_ai_node.imaging.functional_groups import shared_frame_values
from dicom_ai_node.imaging.volume import SourceFrame, Volume, VolumeError

ORIENTATION_TOLERANCE = 1e-3  # difference between direction cosines still counted as "same"
MIN_SPACING_TOLERANCE_MM = 0.01
RELATIVE_SPACING_TOLERANCE = 0.01  # 1 % of the slice spacing


@dataclass
class _Frame:
    """One 2D image of the series, before sorting."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based for multi-frame files
    position: np.ndarray
    orientation: np.ndarray  # the six ImageOrientationPatient values
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    rows: int
    columns: int


PIXEL_DATA = 0x7FE00010
PIXEL_THREADS = min(4, os.cpu_count() or 1)
_DEFER_BYTES = 64 * 1024  # values larger than this (the pixel data) are not read with the header
_NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def read_header(path: str | Path) -> Dataset:
    """The dataset of ``path`` without its pixel data; VolumeError if it is not DICOM.

    Whether it had pixel data is kept (``pixel_data_present``, for the fitness check), and where
    uncompressed pixel data starts in the file (``native_pixel_data_offset``), so load_series
    reads the pixels with one read instead of parsing the file again."""
    try:
        header = pydicom.dcmread(str(path), defer_size=_DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError, EOFError, RecursionError) as error:
        raise VolumeError(f"{Path(path).name} could not be read as a DICOM file: {error}") from None
    header.native_pixel_data_offset = None
    header.pixel_data_present = PIXEL_DATA in header  # for the fitness check (jobs/fitness.py)
    if PIXEL_DATA in header:
        pixels = header.get_item(PIXEL_DATA, keep_deferred=True)
        del header[PIXEL_DATA]  # results and checks never need it; readers must not load it
        syntax = header.file_meta.get("TransferSyntaxUID") if "file_meta" in header.__dict__ else None
        if (isinstance(pixels, RawDataElement) and pixels.value is None and syntax in _NATIVE_SYNTAXES
                and pixels.length != 0xFFFFFFFF):
            header.native_pixel_data_offset = pixels.value_tell
    return header


@dataclass
class SeriesPlan:
    """Everything about a series' volume that its headers decide, before a pixel is read: the
    frames in volume order and the grid. plan_series makes it (or refuses with VolumeError),
    read_volume reads the pixels into it; the job's fitness check (jobs/fitness.py) looks at it
    before anything expensive runs."""

    frames: list[_Frame]
    headers: dict[str, Dataset]  # path -> header
    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray
    spacing: tuple[float, float, float]  # mm: (between slices, rows, columns)
    shape: tuple[int, int, int]
    modality: str
    attributes: dict  # series-level values every file shares (keyword -> value)
    present: frozenset[str]  # keywords with a value in every file, shared or not (e.g. RescaleIntercept)


def load_series(paths: list[str | Path], headers: list[Dataset] | None = None) -> Volume:
    """Assemble the files of one series into a Volume sorted along the slice normal.

    ``headers``: the files' headers when the caller has read them already (same order)."""
    return read_volume(plan_series(paths, headers))


def plan_series(paths: list[str | Path], headers: list[Dataset] | None = None) -> SeriesPlan:
    """The volume's geometry from the headers alone; VolumeError says why there is none."""
    if not paths:
        raise VolumeError("The series has no files.")
    headers = headers if headers is not None else [read_header(path) for path in paths]
    _check_one_series(headers, paths)
    frames = [frame for path, header in zip(paths, headers) for frame in _frames_of(header, str(path))]
    if len(frames) < 2:
        raise VolumeError(f"The series has {len(frames)} image; at least 2 slices are needed to build a volume.")

    row_direction, column_direction = _common_orientation(frames)
    normal = np.cross(row_direction, column_direction)
    frames.sort(key=lambda frame: float(frame.position @ normal))
    # the matrix first: images of another size (a different reconstruction) also sit elsewhere,
    # and "different sizes" is the reason an admin can act on, not the drift that follows
    rows, columns = _common_size(frames)
    pixel_spacing = _common_pixel_spacing(frames)
    slice_spacing = _uniform_slice_spacing(frames, normal)
    return SeriesPlan(
        frames=frames,
        headers={str(path): header for path, header in zip(paths, headers)},
        row_direction=row_direction,
        column_direction=column_direction,
        normal=normal,
        spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        shape=(len(frames), rows, columns),
        modality=str(headers[0].get("Modality", "") or "").strip().upper(),
        attributes=_series_attributes(headers),
        present=_present_in_all(headers),
    )


def read_volume(plan: SeriesPlan) -> Volume:
    """Decode the pixels of a planned series (rescale applied) into its Volume."""
    frames = plan.frames
    pixels = np.empty(plan.shape, dtype=np.float32)
    _read_pixels(frames, plan.headers, pixels)
    return Volume(
        pixels=pixels,
        origin=frames[0].position.copy(),
        row_direction=plan.row_direction,
        column_direction=plan.column_direction,
        slice_direction=plan.normal,
        spacing=plan.spacing,
        source_frames=[SourceFrame(f.sop_instance_uid, f.sop_class_uid, f.path, f.frame_number) for f in frames],
        modality=plan.modality,
        attributes=plan.attributes,
    )


# --- headers -> frames ---------------------------------------------------------------------


def _check_one_series(headers: list[Dataset], paths) -> None:
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise VolumeError(f"The files belong to {len(series)} different series; a job must hold exactly one.")
    for header, path in zip(headers, paths):
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(header.get(keyword, "")).strip():
                raise VolumeError(
                    f"{Path(path).name} has an empty {keyword}; results could not reference it. "
                    "Fix the sending system or the archive copy of this series."
                )
        if int(header.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(
                f"{Path(path).name} is a colour image (SamplesPerPixel={header.SamplesPerPixel}); "
                "only grayscale series can be processed."
            )
        if "Rows" not in header or "Columns" not in header:
            raise VolumeError(f"{Path(path).name} is not an image (it has no Rows/Columns).")


def _frames_of(header: Dataset, path: str) -> list[_Frame]:
    frame_count = int(header.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in header:
        return [_enhanced_frame(header, path, index) for index in range(frame_count)]
    if frame_count > 1:
        raise VolumeError(
            f"{Path(path).name} holds {frame_count} frames without per-frame geometry "
            "(no PerFrameFunctionalGroupsSequence); it cannot be placed in the patient."
        )
    return [_Frame(
        path=path,
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        frame_number=None,
        position=_vector(header, "ImagePositionPatient", 3, path),
        orientation=_vector(header, "ImageOrientationPatient", 6, path),
        pixel_spacing=tuple(_vector(header, "PixelSpacing", 2, path)),
        slope=_number(header, "RescaleSlope", 1.0, path),
        intercept=_number(header, "RescaleIntercept", 0.0, path),
        rows=int(header.Rows),
        columns=int(header.Columns),
    )]


def _enhanced_frame(header: Dataset, path: str, index: int) -> _Frame:
    where = f"{path} frame {index + 1}"
    per_frame = header.PerFrameFunctionalGroupsSequence[index]
    shared = header.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in header else Dataset()

    def group(keyword: str) -> Dataset:
        """A functional group macro item, per-frame taking precedence over shared."""
        for source in (per_frame, shared):
            if keyword in source and len(source[keyword].value) > 0:
                return source[keyword].value[0]
        return Dataset()

    transform = group("PixelValueTransformationSequence")
    return _Frame(
        path=path,
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        frame_number=index + 1,
        position=_vector(group("PlanePositionSequence"), "ImagePositionPatient", 3, where),
        orientation=_vector(group("PlaneOrientationSequence"), "ImageOrientationPatient", 6, where),
        pixel_spacing=tuple(_vector(group("PixelMeasuresSequence"), "PixelSpacing", 2, where)),
        slope=_number(transform, "RescaleSlope", 1.0, where),
        intercept=_number(transform, "RescaleIntercept", 0.0, where),
        rows=int(header.Rows),
        columns=int(header.Columns),
    )


def _vector(dataset: Dataset, keyword: str, length: int, where: str) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        if value is None or value == "" or len(value) != length:
            raise ValueError
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeError(
            f"{Path(where).name} has no valid {keyword}; the image cannot be placed in the patient."
        ) from None
    if not np.all(np.isfinite(vector)):
        raise VolumeError(f"{Path(where).name} has a {keyword} that is not a finite number.")
    return vector


def _number(dataset: Dataset, keyword: str, default: float, where: str) -> float:
    """A single-valued DS/IS such as RescaleSlope; ``default`` when absent or empty."""
    value = dataset.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"{Path(where).name} has {keyword} {str(value)[:40]!r}, which is not a number.") from None
    if not np.isfinite(number) or (keyword == "RescaleSlope" and number == 0):
        raise VolumeError(f"{Path(where).name} has {keyword} {number}, which cannot scale pixel values.")
    return number


# --- geometry checks ----------------------------------------------------------------------


def _common_orientation(frames: list[_Frame]) -> tuple[np.ndarray, np.ndarray]:
    first = frames[0].orientation
    for frame in frames[1:]:
        if np.max(np.abs(frame.orientation - first)) > ORIENTATION_TOLERANCE:
            raise VolumeError(
                "The series mixes image orientations (e.g. axial and coronal images, or a "
                f"localizer): {_describe(frames[0])} vs {_describe(frame)}. Send one orientation per series."
            )
    row, column = first[:3], first[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(column) - 1) > 0.01 or abs(row @ column) > 0.01:
        raise VolumeError(f"ImageOrientationPatient {list(first)} is not two orthogonal unit vectors.")
    row = row / np.linalg.norm(row)
    column = column / np.linalg.norm(column)
    return row, column


def _uniform_slice_spacing(frames: list[_Frame], normal: np.ndarray) -> float:
    """The distance between neighbouring slices; refuse duplicates, gaps and tilted stacks."""
    along = np.array([frame.position @ normal for frame in frames])
    steps = np.diff(along)
    duplicate = int(np.argmin(steps))
    if steps[duplicate] < MIN_SPACING_TOLERANCE_MM:
        raise VolumeError(
            f"Two images share the same position ({_describe(frames[duplicate])} and "
            f"{_describe(frames[duplicate + 1])}). The series probably holds several phases, "
            "echoes or repeated acquisitions; send a single 3D volume."
        )
    spacing = float(np.median(steps))
    tolerance = max(MIN_SPACING_TOLERANCE_MM, RELATIVE_SPACING_TOLERANCE * spacing)
    worst = int(np.argmax(np.abs(steps - spacing)))
    if abs(steps[worst] - spacing) > tolerance:
        raise VolumeError(
            f"Slices are not evenly spaced: {steps[worst]:.3f} mm between {_describe(frames[worst])} and "
            f"{_describe(frames[worst + 1])}, but {spacing:.3f} mm elsewhere (missing slices or a gap)."
        )
    # Positions must lie on a line along the normal; a sheared stack (gantry tilt) does not.
    offsets = np.array([frame.position - frame.position @ normal * normal for frame in frames])
    drift = float(np.max(np.linalg.norm(offsets - offsets[0], axis=1)))
    if drift > tolerance:
        raise VolumeError(
            f"Slice positions drift {drift:.2f} mm sideways across the series (gantry tilt or "
            "sheared stack); such a series cannot be treated as a regular volume."
        )
    return spacing


def _common_size(frames: list[_Frame]) -> tuple[int, int]:
    sizes = {(frame.rows, frame.columns) for frame in frames}
    if len(sizes) > 1:
        raise VolumeError(f"Images in the series have different sizes (rows x columns): {sorted(sizes)}.")
    return sizes.pop()


def _common_pixel_spacing(frames: list[_Frame]) -> tuple[float, float]:
    first = frames[0].pixel_spacing
    for frame in frames[1:]:
        if max(abs(a - b) for a, b in zip(frame.pixel_spacing, first)) > MIN_SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"Images in the series have different PixelSpacing: {list(first)} vs "
                f"{list(frame.pixel_spacing)} ({_describe(frame)})."
            )
    if min(first) <= 0:
        raise VolumeError(f"PixelSpacing {list(first)} is not positive.")
    return float(first[0]), float(first[1])


def _describe(frame: _Frame) -> str:
    name = Path(frame.path).name
    return f"{name} frame {frame.frame_number}" if frame.frame_number else name


# --- pixels -------------------------------------------------------------------------------


def _read_pixels(frames: list[_Frame], headers: dict[str, Dataset], out: np.ndarray) -> None:
    """Decode every frame into its slot of ``out`` with rescale applied (one file open per file).

    Files are read by a few threads: reading, decoding and the rescale arithmetic release the
    GIL, so this uses more than one core (each thread writes only its own slots)."""
    slot_of = {(f.path, f.frame_number or 1): index for index, f in enumerate(frames)}
    paths = list(dict.fromkeys(frame.path for frame in frames))
    with ThreadPoolExecutor(max_workers=min(PIXEL_THREADS, len(paths)), thread_name_prefix="pixels") as pool:
        for done in [pool.submit(_read_file_pixels, path, headers[path], frames, slot_of, out) for path in paths]:
            done.result()  # the first file that fails stops the load with its VolumeError


def _read_file_pixels(path: str, header: Dataset, frames: list[_Frame], slot_of: dict, out: np.ndarray) -> None:
    try:
        for number, stored in enumerate(_stored_frames(path, header, out.shape[1:]), start=1):
            index = slot_of.get((path, number))
            if index is None:
                continue
            if stored.shape != out.shape[1:]:
                raise VolumeError(
                    f"{_describe(frames[index])}: decoded pixels have shape {stored.shape}, "
                    f"expected {out.shape[1:]} (colour or corrupt image)."
                )
            frame = frames[index]
            if frame.slope == 1:  # the usual CT case: one pass instead of two
                np.add(stored, np.float32(frame.intercept), out=out[index], dtype=np.float32)
            else:
                np.multiply(stored, frame.slope, out=out[index], casting="unsafe")
                out[index] += frame.intercept
    except VolumeError:
        raise
    except Exception as error:  # decoders raise many types; all mean "cannot decode"
        syntax = _transfer_syntax_name(path)
        raise VolumeError(
            f"The pixel data of {Path(path).name} ({syntax}) could not be decoded: {error}. "
            "Ask the sender to use an uncompressed or standard JPEG/JPEG 2000/RLE transfer syntax."
        ) from None


def _stored_frames(path: str, header: Dataset, shape: tuple[int, int]):
    """The stored values of each frame of ``path``. A plain single-frame grayscale image in
    little-endian native encoding is read straight from its offset (what pydicom would return,
    without parsing the file a second time); everything else goes through pydicom's decoders."""
    offset = getattr(header, "native_pixel_data_offset", None)
    bits, bits_stored = header.get("BitsAllocated"), header.get("BitsStored")
    if (offset is not None and bits in (8, 16) and isinstance(bits_stored, int) and 0 < bits_stored <= bits
            and int(header.get("NumberOfFrames", 1) or 1) == 1 and int(header.get("SamplesPerPixel", 1)) == 1):
        signed = header.get("PixelRepresentation") == 1
        dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
        count = int(header.Rows) * int(header.Columns)
        stored = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if stored.size == count:
            unused = bits - bits_stored
            if unused:  # as pydicom does: ignore the unused high bits (sign-extend when signed)
                np.left_shift(stored, unused, out=stored)
                np.right_shift(stored, unused, out=stored)
            yield stored.reshape(int(header.Rows), int(header.Columns))
            return
    syntax = header.file_meta.get("TransferSyntaxUID") if "file_meta" in header.__dict__ else None
    if syntax == DeflatedExplicitVRLittleEndian:
        # pydicom's iter_pixels reads the file as stored and does not inflate it: read it whole
        # (the receiver refused any that inflates beyond its limit)
        dataset = pydicom.dcmread(path)
        frames = dataset.pixel_array
        yield from (frames if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else [frames])
        return
    yield from iter_pixels(path)


def _transfer_syntax_name(path: str) -> str:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
    except Exception:
        return "unknown transfer syntax"


# --- series-level attributes --------------------------------------------------------------

_PER_IMAGE = {"SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
              "AcquisitionTime", "ContentTime", "InstanceCreationTime"}


def _series_attributes(headers: list[Dataset]) -> dict:
    """Top-level public, non-sequence values that every file of the series shares; for enhanced
    multi-frame files also the functional-group values all their frames share (RescaleSlope,
    WindowCenter, ... under their classic keywords, as a model's input check expects them)."""
    attributes = {}
    first = headers[0]
    for tag in list(first.keys()):
        first_raw = first.get_item(tag, keep_deferred=True)  # before first[tag] decodes it
        keyword = keyword_for_tag(tag)
        if not keyword or first_raw.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "UN") or keyword in _PER_IMAGE:
            continue
        element = first[tag]
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "UN"):
            continue
        value = _plain(element.value)
        if all(_same_value(header, tag, first_raw, value) for header in headers[1:]):
            attributes[keyword] = value
    lifted = [shared_frame_values(header) for header in headers]
    for keyword, value in lifted[0].items():
        if keyword not in attributes and all(other.get(keyword) == value for other in lifted[1:]):
            attributes[keyword] = value
    return attributes


def _present_in_all(headers: list[Dataset]) -> frozenset[str]:
    """Keywords with a non-empty top-level value in every header (for required attributes that
    may differ per file, such as RescaleIntercept), plus those every enhanced file's frames all
    have in their functional groups."""
    tags, lifted = None, None
    for header in headers:  # tags first, keywords once: 400 headers x 100 keyword lookups cost
        has = {tag for tag in header.keys()
               if not tag.is_private and _has_value(header.get_item(tag, keep_deferred=True))}
        tags = has if tags is None else tags & has
        frames = set(shared_frame_values(header)) if "PerFrameFunctionalGroupsSequence" in header else set()
        lifted = frames if lifted is None else lifted & frames
    present = {keyword_for_tag(tag) for tag in tags or ()} | (lifted or set())
    present.discard("")
    return frozenset(present)


def _has_value(item) -> bool:
    if isinstance(item, RawDataElement):
        return item.length not in (0, None) and (item.value is None or item.value.strip(b" \x00") != b"")
    return not item.is_empty


def _same_value(header: Dataset, tag, first_raw, value) -> bool:
    """Compare undecoded bytes when both are still raw: decoding 400 headers costs seconds."""
    raw = header.get_item(tag, keep_deferred=True)
    if raw is None:
        return False
    if isinstance(raw, RawDataElement) and isinstance(first_raw, RawDataElement) and raw.VR == first_raw.VR:
        if raw.value == first_raw.value:
            return True
    return _plain(header[tag].value) == value


def _plain(value):
    if isinstance(value, MultiValue):
        return [_plain(v) for v in value]
    if isinstance(value, PersonName):
        return str(value)
    return value
