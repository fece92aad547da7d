"""Data helpers shared by train.py, evaluate.py and the tests (never used at inference time).

Everything is read from the shared data folder (default ``<repo>/../shared/data``, override
with ``DICOM_AI_NODE_SHARED_DATA`` or the scripts' ``--data``); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = Path(os.environ.get("DICOM_AI_NODE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOTALSEG = Path("ct_volumes/wasserth__TotalSegmentator/tests/reference_files")

# Real chest CT used for TRAINING (one patient, chest CTA; two overlapping crops). Labels come
# from classical_lung_labels below, not from a reference segmentation.
TRAIN_CASES = [
    TOTALSEG / "aorta_report/test_result/models/ct_cropped.nii.gz",
    TOTALSEG / "pulmonary_report/models/ct_cropped.nii.gz",
]
# Real CT used ONLY for EVALUATION (a different patient): TotalSegmentator's own output
# (lung lobe labels, "total" task, fast mode) is the reference.
EVAL_CT = TOTALSEG / "example_ct.nii.gz"
EVAL_REFERENCE = TOTALSEG / "example_seg_fast_force_split.nii.gz"
TOTALSEG_LUNG_LABELS = (10, 11, 12, 13, 14)  # lung_{upper_lobe_left,lower_lobe_left,upper,middle,lower}_right


def load_nifti(path: Path, dtype=np.float32):
    """A NIfTI image as (slices, rows, cols) in the usual DICOM axial layout, plus its spacing.

    Columns run to the patient's left, rows to posterior, slices to superior (LPS), i.e. what
    a Volume built from axial DICOM frames holds.
    """
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: i->right, j->anterior, k->superior
    data = np.asanyarray(image.dataobj)
    zooms = image.header.get_zooms()[:3]
    pixels = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0)).astype(dtype)
    return pixels, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_eval_case(data: Path = DEFAULT_DATA):
    pixels, spacing = load_nifti(data / EVAL_CT)
    labels, _ = load_nifti(data / EVAL_REFERENCE, dtype=np.uint8)
    return pixels, spacing, np.isin(labels, TOTALSEG_LUNG_LABELS)


def volume_from_array(pixels: np.ndarray, spacing, attributes=None):
    """A Volume for an axial array in the layout load_nifti returns (synthetic geometry)."""
    from dicom_ai_node.imaging.volume import SourceFrame, Volume

    frames = [SourceFrame(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", f"slice{i}.dcm")
              for i in range(pixels.shape[0])]
    return Volume(pixels=pixels.astype(np.float32, copy=False), origin=np.zeros(3),
                  row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]),
                  slice_direction=np.array([0, 0, 1.0]), spacing=tuple(float(s) for s in spacing),
                  source_frames=frames, modality="CT", attributes=dict(attributes or {}))


def classical_lung_labels(hu: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Lung labels for training volumes without a reference (documented in MODEL_CARD.md).

    HU < -400 -> 6-connected components -> drop components touching the anterior edge (row 0)
    of any slice (air in front of the patient; the training crops cut the lungs at the lateral
    and posterior edges, so only the anterior edge is used) -> keep components of at least
    100 mL (drops bowel gas and small airway fragments) -> 3x3x3 closing (fills small vessels)
    -> remove airway lumen: connected regions of at least 5 mL whose 3x3x3 mean is below
    -950 HU, dilated by one voxel (trachea, main bronchi; would also remove large bullae).
    """
    import torch
    import torch.nn.functional as F

    from model_zoo.lung_ct_seg.model import label_components

    air = hu < -400
    labels = label_components(air)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    outside = set(np.unique(labels[:, 0, :]).tolist())  # air touching the anterior edge of a slice
    keep = [i for i, c in zip(ids, counts) if c * voxel_ml >= 100 and i not in outside]
    lung = torch.from_numpy(np.isin(labels, keep).astype(np.float32))[None, None]
    closed = -F.max_pool3d(-F.max_pool3d(lung, 3, 1, 1), 3, 1, 1)  # dilation then erosion
    lung = closed[0, 0].numpy() > 0
    # airway lumen (trachea, main bronchi): regions >= 5 mL whose 3x3x3 mean is below -950 HU
    smooth = F.avg_pool3d(torch.from_numpy(hu.astype(np.float32))[None, None], 3, 1, 1,
                          count_include_pad=False)[0, 0].numpy()
    dark = label_components(smooth < -950)
    ids, counts = np.unique(dark[dark > 0], return_counts=True)
    airway = np.isin(dark, ids[counts * voxel_ml >= 5])
    airway = F.max_pool3d(torch.from_numpy(airway.astype(np.float32))[None, None], 3, 1, 1)[0, 0].numpy() > 0
    return lung & ~airway
