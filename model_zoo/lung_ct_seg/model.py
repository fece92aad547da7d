"""3D CT lung segmentation: a small MONAI UNet run on a coarse 2.5 mm grid.

Pipeline (``LungSegmentation.predict``):

1. Downsample the HU volume to ~2.5 mm voxels with area averaging (anti-aliased, memory
   bounded by the output), clip and scale HU to about [-1, 1].
2. Run the UNet with ``sliding_window_inference`` over fixed-size windows, so memory stays
   bounded whatever the number of slices.
3. Zero the probability in air outside the patient (classical guard, see ``outside_air``), drop
   connected components whose bulk lies below (inferior to) another large component (colon or
   stomach gas under the lung bases, see ``keep_lung_components``; uses the volume's slice
   direction), keep the largest remaining component(s) (left and right lungs may be separate
   components), zero the rest.
4. Upsample the probability back onto the input grid exactly (trilinear, half-voxel-centred
   geometry that inverts the area downsampling), slab by slab, threshold at 0.5, and compute the
   measurements on the original HU values in the same pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from model_zoo.base import Measurement, ModelOutput, SegmentMask, with_weights

TARGET_SPACING_MM = 2.5
HU_LOW, HU_HIGH = -1000.0, 500.0
EMPHYSEMA_HU = -950.0
ROI = (64, 160, 160)  # sliding-window size in coarse voxels (160 mm x 400 mm x 400 mm)
SLAB = 32  # input slices upsampled at a time when going back to the input grid


def build_network() -> torch.nn.Module:
    """The network; train.py and the model share it so weights always fit."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32, 64),
                strides=(2, 2, 2), num_res_units=1)


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """HU -> about [-1, 1] (air -1, water -0.33, dense bone 1)."""
    return (hu.clamp(HU_LOW, HU_HIGH) - (HU_LOW + HU_HIGH) / 2) / ((HU_HIGH - HU_LOW) / 2)


def coarse_shape(shape, spacing, target=TARGET_SPACING_MM) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / target))) for n, s in zip(shape, spacing))


def downsample(pixels: np.ndarray, spacing) -> torch.Tensor:
    """HU (slices, rows, cols) -> coarse HU tensor (1, 1, d, h, w), area-averaged."""
    source = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    size = coarse_shape(pixels.shape, spacing)
    if tuple(size) == tuple(pixels.shape):
        return source.clone()
    return F.interpolate(source, size=size, mode="area")


def _axis_weights(n_out: int, n_in: int, start: int = 0, stop: int | None = None):
    """Linear interpolation taps mapping output index i (half-voxel centred) to the input axis."""
    stop = n_out if stop is None else stop
    pos = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (pos - low).astype(np.float32)


def label_components(mask: np.ndarray, join_axes=(0, 1)) -> np.ndarray:
    """6-connected component labels (0 = background; ids are arbitrary positive integers).

    Runs of foreground along the last axis are the nodes; runs touching across ``join_axes``
    are joined by union-find with pointer jumping, all vectorised in numpy (no scipy).
    ``join_axes=(1,)`` gives 2D (4-connected) components per slice.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    starts = mask.copy()
    starts[..., 1:] &= ~mask[..., :-1]
    runs = np.where(mask, np.cumsum(starts, dtype=np.int64).reshape(mask.shape), 0)  # run number, 1-based
    count = int(runs.max()) if runs.size else 0
    if count == 0:
        return runs
    pairs = []
    for axis in join_axes:
        a = runs[(slice(None),) * axis + (slice(1, None),)]
        b = runs[(slice(None),) * axis + (slice(None, -1),)]
        touch = (a > 0) & (b > 0)
        pairs.append(np.unique(a[touch] * (count + 1) + b[touch]))
    pairs = np.concatenate(pairs) if pairs else np.zeros(0, np.int64)
    u, v = pairs // (count + 1), pairs % (count + 1)
    parent = np.arange(count + 1, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(pu, pv)[differ], np.minimum(pu, pv)[differ])
        while True:  # pointer jumping: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent[runs]


def outside_air(hu: np.ndarray) -> np.ndarray:
    """Air outside the patient: per axial slice, air regions (< -400 HU) touching the image edge.

    Slice by slice (2D), so that airways opening to the outside (mouth, nose) in head/neck
    slices do not connect outside air to the lungs. Assumes the usual full field of view in
    which the lungs never touch the image edge.
    """
    labels = label_components(hu < -400, join_axes=(1,))
    edge = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    return np.isin(labels, edge[edge > 0])


def keep_lung_components(mask: np.ndarray, voxel_ml: float, superior: int = 1, min_ml: float = 20.0,
                         min_fraction: float = 0.1, max_components: int = 2) -> np.ndarray:
    """Anatomy-aware choice of the lung component(s) among the connected components of ``mask``.

    1. Inferior rule (only when ``superior`` is +1 or -1, the direction of increasing slice index
       towards the head): a component B is dropped when its centroid lies below the lowest slice
       of another component A of at least ``min_ml`` and at least ``min_fraction`` of B's size.
       Lungs sit on the diaphragm, so gas or fat that the network confuses with lung in the
       abdomen (colon, stomach) has its bulk below the lung bases and is removed even when it is
       larger than the lungs (scans covering only the lung bases). The left and right lung overlap
       in height, so neither removes the other.
    2. Of what is left, the largest component plus the next one if it holds at least
       ``min_fraction`` of the largest's size (separate left and right lungs).
    """
    labels = label_components(mask)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if ids.size == 0:
        return mask
    alive = np.ones(ids.size, bool)
    if superior in (1, -1):
        z = np.arange(mask.shape[0]) if superior == 1 else np.arange(mask.shape[0])[::-1]
        index = np.searchsorted(ids, labels[labels > 0])
        z_of = np.broadcast_to(z[:, None, None], mask.shape)[labels > 0]
        centroid = np.bincount(index, weights=z_of, minlength=ids.size) / counts
        lowest = np.full(ids.size, np.inf)
        np.minimum.at(lowest, index, z_of)
        big = np.nonzero(counts * voxel_ml >= min_ml)[0]
        for b in range(ids.size):
            above = big[(big != b) & (counts[big] >= min_fraction * counts[b])]
            alive[b] = not np.any(centroid[b] < lowest[above])
    ids, counts = ids[alive], counts[alive]
    order = np.argsort(counts)[::-1][:max_components]
    keep = [ids[i] for i in order if counts[i] >= min_fraction * counts[order[0]]]
    return np.isin(labels, keep)


def superior_direction(slice_direction) -> int:
    """+1 when the slice index increases towards the head (LPS +z), -1 towards the feet, 0 when
    the slices are not roughly axial (then no head-foot rule is applied)."""
    if slice_direction is None:
        return 0
    dz = float(np.asarray(slice_direction, dtype=float)[2])
    return 1 if dz > 0.5 else (-1 if dz < -0.5 else 0)


class LungSegmentation:
    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.device = torch.device(device)
        self.network = with_weights(build_network(), manifest).to(self.device).eval()

    @torch.inference_mode()
    def coarse_probability(self, pixels: np.ndarray, spacing, superior: int = 1) -> np.ndarray:
        """Lung probability on the coarse grid, after connected-component cleanup.

        ``superior``: +1 if the slice index increases towards the head, -1 if towards the feet,
        0 if unknown / not axial (see ``superior_direction``).
        """
        hu = downsample(pixels, spacing)
        coarse_ml = float(np.prod([n * s for n, s in zip(pixels.shape, spacing)])) / hu[0, 0].numel() / 1000
        image = normalise_hu(hu).to(self.device)
        logits = sliding_window_inference(image, roi_size=ROI, sw_batch_size=1, predictor=self.network,
                                          overlap=0.25, mode="gaussian")
        probability = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
        probability[outside_air(hu[0, 0].numpy())] = 0.0
        keep = keep_lung_components(probability > 0.5, coarse_ml, superior)
        # keep the soft edge just outside the kept components so the upsampled border stays smooth
        grown = F.max_pool3d(torch.from_numpy(keep.astype(np.float32))[None, None], 3, 1, 1)[0, 0].numpy() > 0
        return np.where(grown, probability, 0.0).astype(np.float32)

    def predict(self, volume) -> ModelOutput:
        pixels = volume.pixels
        probability = self.coarse_probability(pixels, volume.spacing,
                                              superior_direction(getattr(volume, "slice_direction", None)))
        mask, volume_ml, mean_hu, emphysema = self._upsample_and_measure(probability, pixels,
                                                                        volume.voxel_volume_ml)
        area = mask.sum(axis=(1, 2))
        key_slices = [int(np.argmax(area))] if area.any() else []
        measurements = []
        if area.any():
            measurements = [
                Measurement("volume", volume_ml, segment="lung"),
                Measurement("mean_attenuation", mean_hu, segment="lung"),
                Measurement("emphysema_index", emphysema, segment="lung"),
            ]
        return ModelOutput(segments=[SegmentMask("lung", mask)], measurements=measurements,
                           key_slices=key_slices)

    @staticmethod
    def _upsample_and_measure(probability, pixels, voxel_ml):
        """Trilinear upsampling to the input grid in slabs of slices; sums taken on the way."""
        n, rows, cols = pixels.shape
        d, h, w = probability.shape
        coarse = torch.from_numpy(probability)
        mask = np.zeros(pixels.shape, dtype=bool)
        count, hu_sum, low_count = 0, 0.0, 0
        for start in range(0, n, SLAB):
            stop = min(n, start + SLAB)
            low, high, t = _axis_weights(n, d, start, stop)
            t = torch.from_numpy(t)[:, None, None]
            slab = coarse[low] * (1 - t) + coarse[high] * t  # (k, h, w) along slices
            if (h, w) != (rows, cols):
                slab = F.interpolate(slab[None], size=(rows, cols), mode="bilinear", align_corners=False)[0]
            slab_mask = (slab > 0.5).numpy()
            mask[start:stop] = slab_mask
            values = pixels[start:stop][slab_mask]
            count += values.size
            hu_sum += float(values.sum(dtype=np.float64))
            low_count += int((values < EMPHYSEMA_HU).sum())
        if count == 0:
            return mask, 0.0, math.nan, math.nan
        return mask, count * voxel_ml, hu_sum / count, 100.0 * low_count / count
