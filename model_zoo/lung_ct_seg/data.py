"""The real chest CT cases of the lung model, their references and field-of-view stress crops.

Used by train.py, evaluate.py and the tests, never at inference time. Every case is read from
the shared data folder (model_zoo.ct_data); nothing is downloaded or stored here.

Each case belongs to a patient: training folds leave out whole patients, and the model card
reports every case with a model that never saw that patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from model_zoo.ct_data import (DEFAULT_DATA, TOTALSEG, TOTALSEG_ABDOMEN, TOTALSEG_ABDOMEN_LABELS,
                               TOTALSEG_CTA_CROPS, TOTALSEG_LUNG_LABELS, load_dicom_series, load_nifti)
from model_zoo.lung_ct_seg.model import AIR_HU, IN_PLANE, fill_small_holes

CHEST = Path("chest_ct")
COPDGENE = CHEST / "acil-bwh__ChestImagingPlatform/Testing/Data/Input"
LUNG1 = CHEST / "NKI-RT__DecideDocker/workspace/decide/data/LUNG1-001"
FOUR_D_LUNG = CHEST / "bhklab__readii/tests/4D-Lung/113_HM10395"
TOTALSEG_ABDOMEN_SMALL = TOTALSEG / "example_ct_sm.nii.gz"
LIDC_SLICE = Path("ct_volumes/JoHof__lungmask/tests/testdata/0.dcm")


@dataclass(frozen=True)
class Case:
    name: str
    patient: str  # cases of one patient share it; folds leave out whole patients
    description: str
    reference: str  # what the reference mask is
    trainable: bool = True  # False: the licence allows evaluation only


CASES = [
    Case("cta_cardiac", "totalseg_cta",
         "contrast chest CTA, cardiac field of view: lungs cut at the left, right and posterior image edges; "
         "1.5 mm, 112 slices (TotalSegmentator pulmonary_report crop)",
         "classical (this file), air in front of the patient only at the anterior edge; checked by eye"),
    Case("cta_chest_abdomen", "totalseg_cta",
         "the same CTA, chest and upper abdomen crop (stomach and colon gas); lungs cut laterally; 1.5 mm, 164 slices",
         "classical (this file), air in front of the patient only at the anterior edge; checked by eye"),
    Case("abdomen_lung_bases", "totalseg_abdomen",
         "non-contrast abdomen/pelvis CT with only the lung bases (top 11 slices), bowel gas; 3 mm, 112 slices",
         "TotalSegmentator 'total' fast output, lung lobes merged (a model, not manual)"),
    # example_ct_sm.nii.gz holds the top 30 slices of example_ct (same pixels): not trained on
    # separately, so that patient's data is not counted twice
    Case("abdomen_lung_bases_sm", "totalseg_abdomen",
         "the top 30 slices of the same scan (TotalSegmentator example_ct_sm): upper abdomen, lung bases",
         "TotalSegmentator 'total' fast output of the whole scan, same slices", trainable=False),
    Case("copdgene", "copdgene",
         "COPDGene inspiratory chest CT, emphysema, downsampled x8 by its publisher (4.2 x 4.2 x 4.0 mm)",
         "Chest Imaging Platform wholeLung label map published with the scan (semi-automatic)"),
    Case("4d_lung", "4d_lung",
         "TCIA 4D-Lung planning CT, one respiratory phase, lung apex to upper abdomen; 3 mm, 99 slices",
         "classical (this file), full field of view; checked by eye"),
    Case("nsclc_lung1", "nsclc_lung1",
         "NSCLC-Radiomics LUNG1-001, full thorax, large right upper lobe tumour; 3 mm, 134 slices",
         "manual Lung-Left + Lung-Right contours (RTSTRUCT)", trainable=False),
    Case("lidc_slice", "lidc",
         "LIDC-IDRI single chest slice (lungmask test file) stacked 24 times at 1 mm",
         "classical (this file) on the slice; lungmask R231's area for comparison"),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def load_case(name: str, data: Path = DEFAULT_DATA):
    """(HU pixels, spacing (slice, row, col) mm, reference lung mask) of one case."""
    return _load_case(name, Path(data))


@lru_cache(maxsize=2)
def _load_case(name: str, data: Path):
    if name in ("cta_cardiac", "cta_chest_abdomen"):
        relative = TOTALSEG_CTA_CROPS[1 if name == "cta_cardiac" else 0]
        pixels, spacing = load_nifti(data / relative)
        return pixels, spacing, classical_lung_reference(pixels, spacing, outside_edges=("anterior",))
    if name == "abdomen_lung_bases":
        pixels, spacing = load_nifti(data / TOTALSEG_ABDOMEN)
        labels, _ = load_nifti(data / TOTALSEG_ABDOMEN_LABELS, dtype=np.uint8)
        return pixels, spacing, np.isin(labels, TOTALSEG_LUNG_LABELS)
    if name == "abdomen_lung_bases_sm":
        pixels, spacing = load_nifti(data / TOTALSEG_ABDOMEN_SMALL)
        labels, _ = load_nifti(data / TOTALSEG_ABDOMEN_LABELS, dtype=np.uint8)
        reference = np.isin(labels, TOTALSEG_LUNG_LABELS)[-len(pixels):]
        full, _ = load_nifti(data / TOTALSEG_ABDOMEN)
        if not np.array_equal(full[-len(pixels):], pixels):
            raise ValueError("example_ct_sm is no longer the top slices of example_ct")
        return pixels, spacing, reference
    if name == "copdgene":
        import nrrd

        volume = load_dicom_series(data / COPDGENE / "ct-64Dicom")
        labels, header = nrrd.read(str(data / COPDGENE / "wholeLung-64.nrrd"))
        # the label map is on the DICOM grid (same origin, LPS, x = columns): (x, y, z) -> (z, y, x)
        origin = np.asarray(header["space origin"], float)
        if not np.allclose(origin, volume.origin, atol=0.01) or labels.shape[::-1] != volume.shape:
            raise ValueError("COPDGene label map is not on the grid of the DICOM series")
        return volume.pixels, volume.spacing, np.ascontiguousarray(labels.transpose(2, 1, 0) > 0)
    if name == "4d_lung":
        volume = load_dicom_series(data / FOUR_D_LUNG)
        return volume.pixels, volume.spacing, classical_lung_reference(volume.pixels, volume.spacing)
    if name == "nsclc_lung1":
        from pydicom import dcmread

        volume = load_dicom_series(data / LUNG1 / "CT")
        structure_set = dcmread(next((data / LUNG1 / "RTSTRUCT").iterdir()))
        return volume.pixels, volume.spacing, rtstruct_mask(structure_set, volume, ("Lung-Left", "Lung-Right"))
    if name == "lidc_slice":
        from pydicom import dcmread

        ds = dcmread(data / LIDC_SLICE)
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        pixels, spacing = np.repeat(hu[None], 24, axis=0), (1.0, row_mm, col_mm)
        return pixels, spacing, classical_lung_reference(pixels, spacing, airway_removal=False)
    raise KeyError(f"no case {name!r}; cases: {', '.join(CASES_BY_NAME)}")


def rtstruct_mask(structure_set, volume, roi_names) -> np.ndarray:
    """The union of the named ROIs' closed planar contours, rasterised on the volume's grid
    (pixel centres inside the polygon; a contour inside another one is a hole)."""
    from skimage.draw import polygon

    number_of = {str(roi.ROIName): roi.ROINumber for roi in structure_set.StructureSetROISequence}
    missing = [name for name in roi_names if name not in number_of]
    if missing:
        raise ValueError(f"RTSTRUCT has no ROI {missing}")
    wanted = {int(number_of[name]) for name in roi_names}
    mask = np.zeros(volume.shape, bool)
    for roi in structure_set.ROIContourSequence:
        if int(roi.ReferencedROINumber) not in wanted:
            continue
        single = np.zeros(volume.shape, bool)
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3) - volume.origin
            column = points @ volume.row_direction / volume.spacing[2]
            row = points @ volume.column_direction / volume.spacing[1]
            index = int(round(float(np.mean(points @ volume.slice_direction)) / volume.spacing[0]))
            if 0 <= index < volume.shape[0]:
                rr, cc = polygon(row, column, shape=volume.shape[1:])
                single[index, rr, cc] ^= True
        mask |= single
    return mask


def classical_lung_reference(hu: np.ndarray, spacing, outside_edges=("anterior", "posterior", "right", "left"),
                             airway_removal: bool = True) -> np.ndarray:
    """A lung reference by an independent classical method, for scans without one.

    Made for *building references*, with what is known about each scan (``outside_edges``: the
    image edges where air outside the patient meets the image; all four for a full field of
    view), never used by the model:

    1. air = HU < -400; air components (per slice) touching an outside edge are outside air;
    2. trachea and main bronchi: explosion-controlled region growing from the trachea
       (``airway_tree``), opened with a 3 mm ball so that only airways wider than about 6 mm
       are removed (the intrapulmonary airways stay lung, as in manual contours);
    3. the lungs: the largest remaining 3D air component and the second one if it holds at
       least 10 % of the largest (left and right);
    4. vessels: holes of at most 3 cm2 within a slice are filled, then a 2 mm closing.

    Dense lung (tumour, consolidation, effusion) stays outside, as in the manual LUNG1-001
    contours. Checked by eye on every case that uses it (MODEL_CARD.md).
    """
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000
    air = hu < AIR_HU
    labels, _ = ndi.label(air, structure=IN_PLANE)
    border = {"anterior": labels[:, 0, :], "posterior": labels[:, -1, :], "right": labels[:, :, 0],
              "left": labels[:, :, -1]}
    outside_ids = np.unique(np.concatenate([border[edge].ravel() for edge in outside_edges]))
    inside = air & ~np.isin(labels, outside_ids[outside_ids > 0])
    del labels
    airway = np.zeros_like(inside)
    if airway_removal:
        seed = trachea_seed(hu, inside, spacing)
        if seed is not None:
            tree = airway_tree(hu, seed, spacing)
            big = ndi.binary_opening(tree, structure=ball(3.0, spacing))
            airway = ndi.binary_dilation(_component_at(big, seed) if big[seed] else big, structure=ball(1.5, spacing))
    components, count = ndi.label(inside & ~airway)
    if count == 0:
        return np.zeros_like(inside)
    sizes = np.bincount(components.ravel())[1:] * voxel_ml
    order = np.argsort(sizes)[::-1][:2]
    keep = [i + 1 for i in order if sizes[i] >= 0.1 * sizes[order[0]]]
    lung = fill_small_holes(np.isin(components, keep), spacing)
    lung |= ndi.binary_closing(lung, structure=ball(2.0, spacing))
    return lung & ~airway


def trachea_seed(hu: np.ndarray, inside_air: np.ndarray, spacing):
    """(slice, row, col) inside the trachea: going down from the top slice with air inside the
    patient, the first dark (< -900 HU) round component of 80..700 mm2 within 4 cm of the
    body's left-right centre. None when there is none (the trachea is not in the scan)."""
    slices = np.nonzero(inside_air.any(axis=(1, 2)))[0]
    body_columns = np.nonzero((hu > AIR_HU).any(axis=(0, 1)))[0]
    if slices.size == 0 or body_columns.size == 0:
        return None
    centre = (body_columns.min() + body_columns.max()) / 2
    top = int(slices.max())
    for z in range(top, max(int(slices.min()), top - int(60 / spacing[0])) - 1, -1):
        labels, count = ndi.label(inside_air[z] & (hu[z] < -900))
        if count == 0:
            continue
        areas = np.bincount(labels.ravel())[1:] * spacing[1] * spacing[2]
        centres = ndi.center_of_mass(labels > 0, labels, np.arange(1, count + 1))
        candidates = [(abs(c[1] - centre) * spacing[2], i + 1) for i, (a, c) in enumerate(zip(areas, centres))
                      if 80 <= a <= 700 and abs(c[1] - centre) * spacing[2] < 40]
        if candidates:
            rows, columns = np.nonzero(labels == min(candidates)[1])
            middle = len(rows) // 2
            return (z, int(rows[middle]), int(columns[middle]))
    return None


def airway_tree(hu: np.ndarray, seed, spacing, max_ml: float = 250.0) -> np.ndarray:
    """The airway lumen connected to ``seed``: on the HU averaged over 3x3x3 voxels (noise would
    leave the lumen ragged), the threshold rises from -990 HU in 10 HU steps until the region
    grows by more than half in one step (it leaked into the lung) or passes ``max_ml``; the
    last region before that is returned."""
    voxel_ml = float(np.prod(spacing)) / 1000
    smooth = ndi.uniform_filter(hu.astype(np.float32), size=3)
    result, previous = np.zeros(hu.shape, bool), None
    for threshold in range(-990, -840, 10):
        region = _component_at(smooth < threshold, seed)
        volume = region.sum() * voxel_ml
        if volume == 0:
            continue
        if volume > max_ml or (previous is not None and previous >= 5 and volume > 1.5 * previous):
            break
        result, previous = region, volume
    return result


def _component_at(mask: np.ndarray, seed) -> np.ndarray:
    labels, _ = ndi.label(mask)
    return labels == labels[seed] if labels[seed] else np.zeros_like(mask)


def ball(radius_mm: float, spacing) -> np.ndarray:
    """A ball-shaped structuring element on an anisotropic grid."""
    r = [int(radius_mm // s) for s in spacing]
    z, y, x = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    return (z * spacing[0]) ** 2 + (y * spacing[1]) ** 2 + (x * spacing[2]) ** 2 <= radius_mm ** 2 + 1e-6


# ---- field-of-view stress versions: crops of a case, defined on its reference lungs' extent

STRESS_CROPS = {
    "cut_right": "the patient's right 30 % of the lungs cut off (lung at the image edge on one side)",
    "cut_both": "20 % of the lung width cut off on both sides",
    "cardiac": "a cardiac field of view: 25 % cut on both sides and 20 % of the lungs' depth at the back",
    "upper_half": "only the upper half of the lungs (apices, trachea)",
    "lower_half": "only the lower half of the lungs and what lies below (bases, upper abdomen)",
}


def stress_crop(name: str, reference: np.ndarray) -> tuple[slice, slice, slice]:
    """The (slices, rows, cols) box of stress crop ``name`` for a case with this reference."""
    z, r, c = (np.nonzero(reference.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
    depth, width = r[-1] - r[0] + 1, c[-1] - c[0] + 1
    every = slice(None)
    middle = (z[0] + z[-1] + 1) // 2
    if name == "cut_right":  # image column 0 is the patient's right
        return every, every, slice(c[0] + int(0.3 * width), None)
    if name == "cut_both":
        return every, every, slice(c[0] + int(0.2 * width), c[-1] + 1 - int(0.2 * width))
    if name == "cardiac":
        return every, slice(None, r[-1] + 1 - int(0.2 * depth)), slice(c[0] + int(0.25 * width),
                                                                       c[-1] + 1 - int(0.25 * width))
    if name == "upper_half":
        return slice(middle, None), every, every
    if name == "lower_half":
        return slice(None, middle), every, every
    raise KeyError(f"no stress crop {name!r}")
