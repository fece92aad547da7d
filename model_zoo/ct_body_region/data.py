"""Training and evaluation data for the body-region classifier (never used at inference time).

Per-slice labels, all from real CT, nothing downloaded:

* patient A, TotalSegmentator example_ct.nii.gz (abdomen + pelvis, lung bases), labels from
  its TotalSegmentator segmentation (example_seg_fast_force_split.nii.gz): chest = slices
  with lung and no liver/spleen/stomach; abdomen = no lung, above the top of the hip bones;
  pelvis = from the top of the hip bones (iliac crest) down; slices with both lung and
  upper-abdominal organs (the diaphragm dome) are left out as ambiguous.
* patient B, the two TotalSegmentator chest CTA crops: chest = slices whose classical lung
  mask (lung_ct_seg.data.classical_lung_reference) covers >= 3% of the slice; abdomen = no lung
  at all; in between left out.
* head: the VTK "headsq" head CT (93 slices, 3.2 x 3.2 x 1.5 mm, stored value - 1024 = HU).

Evaluation (evaluate.py) uses only DICOM slices of other patients, listed in EVAL_FILES with
the region each slice shows (read by eye; see the comment there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_zoo.ct_data import DEFAULT_DATA, TOTALSEG, TOTALSEG_CTA_CROPS, load_nifti
from model_zoo.lung_ct_seg.data import classical_lung_reference

HEADSQ = Path("ct_volumes/pyvista__vtk-data/Data/headsq")
LUNG = (10, 11, 12, 13, 14)
UPPER_ABDOMEN = (1, 5, 6)  # spleen, liver, stomach
HIP = (77, 78)

# Held-out real CT slices (other patients than training). The region is what the slice SHOWS,
# read by eye by the developer (not a radiologist) on a soft-tissue window: several headers are
# wrong for the slice (SignedCT says "CT THORAX" but shows liver and stomach; RTH/CT01 says
# LUNG but shows the kidneys; the KiTS "kidney" series holds chest slices too). Left out as
# fitting no class: two slices at the thoracic inlet / shoulders without lung
# (cornerstone CTImage 'HELICAL CHEST', dupe-positions CT25). CT26 and CT28 hold the same
# pixels; evaluate.py counts identical slices once.
KITS = "innolitics__dicom-numpy/tests/dupe-positions"
EVAL_FILES = {
    "chest": [
        "ct_volumes/JoHof__lungmask/tests/testdata/0.dcm",  # LIDC-IDRI, heart and lungs
        f"{KITS}/CT2.dcm", f"{KITS}/CT24.dcm", f"{KITS}/CT26.dcm", f"{KITS}/CT28.dcm", f"{KITS}/CT29.dcm",
    ],
    "abdomen": [
        "orthanc-mirrors__orthanc-tests/Database/SignedCT.dcm",  # liver, stomach
        "orthanc-mirrors__orthanc-tests/Database/HierarchicalAnonymization/RTH/CT01.dcm",  # kidneys
        "pydicom__pydicom-data/data_store/data/explicit_VR-UN.dcm",  # pancreas
        f"{KITS}/CT20.dcm", f"{KITS}/CT21.dcm", f"{KITS}/CT22.dcm", f"{KITS}/CT27.dcm",  # liver, spleen
    ],
    "pelvis": [
        f"{KITS}/CT23.dcm",  # iliac wings and bowel (below the iliac crest)
        "ct_volumes/pyvista__vtk-data/Data/prostate.img",  # low pelvis / upper thighs
    ],
    "head": [],
}


def patient_a(data: Path = DEFAULT_DATA):
    pixels, spacing = load_nifti(data / TOTALSEG / "example_ct.nii.gz")
    labels, _ = load_nifti(data / TOTALSEG / "example_seg_fast_force_split.nii.gz", dtype=np.uint8)
    per_slice = lambda ids: np.isin(labels, ids).any(axis=(1, 2))  # noqa: E731
    lung, upper, hip = per_slice(LUNG), per_slice(UPPER_ABDOMEN), per_slice(HIP)
    hip_top = int(np.nonzero(hip)[0].max())  # slices run inferior -> superior
    region = np.full(len(pixels), -1)
    region[lung & ~upper] = 1
    region[~lung & (np.arange(len(pixels)) > hip_top)] = 2
    region[np.arange(len(pixels)) <= hip_top] = 3
    region[lung & upper] = -1
    return pixels, spacing, region


def patient_b(data: Path = DEFAULT_DATA):
    cases = []
    for relative in TOTALSEG_CTA_CROPS:
        pixels, spacing = load_nifti(data / relative)
        lung = classical_lung_reference(pixels, spacing, outside_edges=("anterior",))
        fraction = lung.mean(axis=(1, 2))
        region = np.full(len(pixels), -1)
        region[fraction >= 0.03] = 1
        region[fraction == 0] = 2
        cases.append((pixels, spacing, region))
    return cases


def head(data: Path = DEFAULT_DATA):
    folder = data / HEADSQ
    slices = [np.fromfile(folder / f"quarter.{i}", dtype="<u2").reshape(64, 64) for i in range(1, 94)]
    pixels = np.stack(slices).astype(np.float32) - 1024.0
    return pixels, (1.5, 3.2, 3.2), np.zeros(len(pixels), int)


def eval_slices(data: Path = DEFAULT_DATA):
    """[(region, path, HU slice, (row, col) spacing)] for the held-out DICOM files."""
    from pydicom import dcmread

    out = []
    for region, files in EVAL_FILES.items():
        for relative in files:
            ds = dcmread(data / relative, force=True)
            if "TransferSyntaxUID" not in ds.get("file_meta", {}):  # prostate.img: no file meta
                from pydicom.dataset import FileMetaDataset
                from pydicom.uid import ImplicitVRLittleEndian

                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            spacing = [float(v) for v in ds.PixelSpacing]
            out.append((region, relative, hu, tuple(spacing)))
    return out
