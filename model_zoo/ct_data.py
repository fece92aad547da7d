"""Real CT for training and evaluating the bundled models (never used at inference time).

Everything is read from the shared data folder (default ``<repo>/../shared/data``, override
with ``DICOM_AI_NODE_SHARED_DATA`` or the scripts' ``--data``); nothing is downloaded and
nothing from it is stored in this repository (licences differ; see each folder's _SOURCE.txt).

Arrays are (slices, rows, cols) in the layout of an axial DICOM Volume: columns run to the
patient's left, rows to posterior, slices to superior (LPS).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DICOM_AI_NODE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOTALSEG = Path("ct_volumes/wasserth__TotalSegmentator/tests/reference_files")

# One contrast-enhanced chest CT (TotalSegmentator test files): two overlapping crops of the
# same scan, a cardiac field of view and a chest / upper-abdomen one.
TOTALSEG_CTA_CROPS = [
    TOTALSEG / "aorta_report/test_result/models/ct_cropped.nii.gz",
    TOTALSEG / "pulmonary_report/models/ct_cropped.nii.gz",
]
# Another patient: abdomen and pelvis with the lung bases, with TotalSegmentator's own labels.
TOTALSEG_ABDOMEN = TOTALSEG / "example_ct.nii.gz"
TOTALSEG_ABDOMEN_LABELS = TOTALSEG / "example_seg_fast_force_split.nii.gz"
TOTALSEG_LUNG_LABELS = (10, 11, 12, 13, 14)  # lung_{upper_lobe_left,lower_lobe_left,upper,middle,lower}_right


def load_nifti(path: Path, dtype=np.float32):
    """A NIfTI image as (slices, rows, cols) in the usual DICOM axial layout, plus its spacing."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: i->right, j->anterior, k->superior
    data = np.asanyarray(image.dataobj)
    zooms = image.header.get_zooms()[:3]
    pixels = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0)).astype(dtype)
    return pixels, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_dicom_series(folder: Path):
    """The CT images in ``folder`` (recursively) through the node's own loader: a Volume."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_ai_node.imaging.load import load_series

    images = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            if dcmread(path, stop_before_pixels=True).get("Modality") == "CT":
                images.append(path)
        except InvalidDicomError:  # README, licence and YAML files beside the images
            continue
    return load_series(images)


def volume_from_array(pixels: np.ndarray, spacing, attributes=None):
    """A Volume for an axial array in the layout load_nifti returns (synthetic geometry)."""
    from dicom_ai_node.imaging.volume import SourceFrame, Volume

    frames = [SourceFrame(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", f"slice{i}.dcm")
              for i in range(pixels.shape[0])]
    return Volume(pixels=pixels.astype(np.float32, copy=False), origin=np.zeros(3),
                  row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]),
                  slice_direction=np.array([0, 0, 1.0]), spacing=tuple(float(s) for s in spacing),
                  source_frames=frames, modality="CT", attributes=dict(attributes or {}))
