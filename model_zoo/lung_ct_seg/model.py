"""3D CT lung segmentation: a small MONAI UNet decides *which* air is lung on a coarse 2.5 mm
grid; the lung border is then placed on the input grid from the HU values.

Pipeline (``LungSegmentation.predict``):

1. Downsample the HU volume to ~2.5 mm voxels (area averaging), turn it so that slices run to
   the head, rows to the back and columns to the patient's left (the orientation the network
   was trained in), pad every side by replicating the edge voxels (an image edge looks the same
   in training and here, whether it cuts through air, the body or a lung), clip and scale HU.
2. Run the UNet with ``sliding_window_inference`` over fixed-size windows (memory bounded
   whatever the slice count).
3. Choose the lung components (``keep_lung_components``, scipy.ndimage labels): those the
   network is sure of, minus any whose bulk lies below a sure one (gas in the bowel or stomach
   under the lung bases), grown into the less sure lung around them. No rule looks at the image
   edge: on a cropped field of view the lungs touch it.
4. Back on the input grid, slab by slab (``refine_on_input_grid``): a voxel is lung where the
   upsampled probability is high, or where it is at least low and the voxel is air-like
   (< -400 HU), so the border follows the real lung edge instead of the 2.5 mm grid; vessels
   (holes up to 3 cm2 within a slice) are filled. The measurements are taken in the same pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from scipy import ndimage as ndi

from model_zoo.base import Measurement, ModelOutput, PriorResult, SegmentMask, with_weights

TARGET_SPACING_MM = 2.5
HU_LOW, HU_HIGH = -1000.0, 500.0
AIR_HU = -400.0  # lung parenchyma (about -850) and air lie below, soft tissue (about +40) above
EMPHYSEMA_HU = -950.0
ROI = (64, 160, 160)  # sliding-window size in coarse voxels (160 mm x 400 mm x 400 mm)
PAD = 8  # coarse voxels of replicated edge around the volume (20 mm), as in training
CONFIDENT = 0.9  # mean probability of a component the network is sure is lung
MIN_SHARE = 0.01  # a sure component smaller than this share of the largest is left out
LOW = 0.3  # kept components grow into the connected region above this probability
CORE, BORDER = 0.9, 0.1  # probability: lung whatever the HU / lung when also air-like
MAX_VESSEL_MM2 = 300.0  # in-slice holes up to this area inside the lung are vessels: filled
SLAB = 32  # input slices refined at a time on the input grid
IN_PLANE = np.zeros((3, 3, 3), bool)  # 4-connectivity within a slice, nothing across slices
IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


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


def pad_edges(hu: torch.Tensor, minimum=ROI, margin: int = PAD) -> tuple[torch.Tensor, tuple]:
    """Replicate-pad a (1, 1, d, h, w) tensor by ``margin`` on every side and up to ``minimum``;
    also returns the slices that cut the original back out."""
    pads, box = [], []
    for n, low in zip(hu.shape[2:], minimum):
        extra = max(0, low - n - 2 * margin)
        before, after = margin + extra // 2, margin + extra - extra // 2
        pads.append((before, after))
        box.append(slice(before, before + n))
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
    return F.pad(hu, flat, mode="replicate"), tuple(box)


def canonical_flips(volume) -> tuple[int, ...]:
    """Axes (0 slices, 1 rows, 2 columns) to flip so that slices run to the head, rows to the
    back and columns to the patient's left (LPS +z, +y, +x), as in training. An axis whose
    direction is not mostly along one of those (oblique) is left as it is."""
    flips = []
    for axis, (direction, lps) in enumerate(((volume.slice_direction, 2), (volume.column_direction, 1),
                                             (volume.row_direction, 0))):
        component = float(np.asarray(direction, float)[lps]) if direction is not None else 1.0
        if component < -0.5:
            flips.append(axis)
    return tuple(flips)


def keep_lung_components(probability: np.ndarray, voxel_ml: float, confident: float = CONFIDENT,
                         min_share: float = MIN_SHARE, min_ml: float = 20.0, min_fraction: float = 0.1,
                         low: float = LOW) -> np.ndarray:
    """The lung among the connected components of ``probability > 0.5`` (axis 0 towards the head).

    1. Only components the network is sure of count: mean probability >= ``confident``. Air
       outside the body, under the table, between the shoulders, in the bowel or the trachea
       that the network half-believes is lung scores lower (see the model card).
    2. Inferior rule: a component B is dropped when its centroid lies below the lowest slice of
       another sure component A of at least ``min_ml`` and ``min_fraction`` of B's size. Lungs
       sit on the diaphragm, so gas in the bowel or stomach has its bulk below the lung bases,
       even when it is larger than the lungs (a scan of the lung bases). Left and right lung
       overlap in height, so neither drops the other.
    3. Of the rest, every component of at least ``min_share`` of the largest one: left and
       right lung, and the pieces of a lung that a cropped field of view or a tumour cuts apart.
    4. Hysteresis: the kept components grow into the connected region of probability > ``low``
       around them (lung the network is less sure of, e.g. dependent lung next to a cut edge).
    An empty result when nothing is sure: the quality check then holds it, not a wrong mask.
    """
    mask = probability > 0.5
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    index = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sure = np.asarray(ndi.mean(probability, labels, index)) >= confident
    centroid = np.asarray(ndi.center_of_mass(mask, labels, index))[:, 0]
    lowest = np.array([found[0].start for found in ndi.find_objects(labels)])
    big = sure & (sizes * voxel_ml >= min_ml)
    alive = sure.copy()
    for b in np.flatnonzero(sure):
        above = big & (index != b + 1) & (sizes >= min_fraction * sizes[b])
        alive[b] = not np.any(centroid[b] < lowest[above])
    if not alive.any():
        return np.zeros_like(mask)
    keep = np.isin(labels, index[alive & (sizes >= min_share * sizes[alive].max())])
    grown, _ = ndi.label(probability > low)
    touched = np.unique(grown[keep])
    return np.isin(grown, touched[touched > 0])


def fill_small_holes(mask: np.ndarray, spacing, max_area_mm2: float = MAX_VESSEL_MM2) -> np.ndarray:
    """``mask`` with its holes within a slice of at most ``max_area_mm2`` filled: vessels inside
    the lung (the heart between two lungs that meet in front and behind is a far bigger hole).
    A hole is a component of the background (per slice) that does not touch the slice border."""
    background, count = ndi.label(~mask, structure=IN_PLANE)
    if count == 0:
        return mask
    area = np.bincount(background.ravel(), minlength=count + 1) * (spacing[1] * spacing[2])
    fill = area <= max_area_mm2
    fill[0] = False
    border = np.concatenate([background[:, [0, -1], :].ravel(), background[:, :, [0, -1]].ravel()])
    fill[border] = False
    return mask | fill[background]


def _axis_weights(n_out: int, n_in: int, start: int = 0, stop: int | None = None):
    """Linear interpolation taps mapping output index i (half-voxel centred) to the input axis."""
    stop = n_out if stop is None else stop
    pos = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (pos - low).astype(np.float32)


def refine_on_input_grid(probability: np.ndarray, pixels: np.ndarray, spacing, voxel_ml: float):
    """The lung mask on the input grid and its measurements (volume mL, mean HU, LAA-950 %).

    Slab by slab: the coarse probability is upsampled (trilinear, half-voxel centred: the
    inverse of the area downsampling); lung = probability >= CORE, or >= BORDER where the voxel
    is air-like; then vessels inside are filled (``fill_small_holes``). Memory: one slab.
    """
    n, rows, cols = pixels.shape
    d, h, w = probability.shape
    coarse = torch.from_numpy(np.ascontiguousarray(probability))
    mask = np.zeros(pixels.shape, dtype=bool)
    count, hu_sum, low_count = 0, 0.0, 0
    for start in range(0, n, SLAB):
        stop = min(n, start + SLAB)
        low, high, t = _axis_weights(n, d, start, stop)
        t = torch.from_numpy(t)[:, None, None]
        slab = coarse[low] * (1 - t) + coarse[high] * t  # (k, h, w) along slices
        if (h, w) != (rows, cols):
            slab = F.interpolate(slab[None], size=(rows, cols), mode="bilinear", align_corners=False)[0]
        slab = slab.numpy()
        values = pixels[start:stop]
        lung = (slab >= CORE) | ((slab >= BORDER) & (values < AIR_HU))
        lung = fill_small_holes(lung, spacing)
        mask[start:stop] = lung
        inside = values[lung]
        count += inside.size
        hu_sum += float(inside.sum(dtype=np.float64))
        low_count += int((inside < EMPHYSEMA_HU).sum())
    if count == 0:
        return mask, 0.0, math.nan, math.nan
    return mask, count * voxel_ml, hu_sum / count, 100.0 * low_count / count


def same_level(mask: np.ndarray, index: int, other: np.ndarray) -> int | None:
    """The slice of ``other`` (a lung mask) at the same relative height within the lungs as
    slice ``index`` of ``mask``: the follow-up and the prior side by side at one anatomic level
    whatever their fields of view and slice spacings. None when either mask is empty."""
    here, there = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(other.any(axis=(1, 2)))
    if not len(here) or not len(there):
        return None
    span = max(int(here[-1] - here[0]), 1)
    fraction = (index - here[0]) / span
    return int(round(there[0] + fraction * (there[-1] - there[0])))


class LungSegmentation:
    compares_with_prior = True  # the runner passes a fetched prior volume (rule: priors = {...})

    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.device = torch.device(device)
        self.network = with_weights(build_network(), manifest).to(self.device).eval()

    @torch.inference_mode()
    def coarse_probability(self, pixels: np.ndarray, spacing, flips: tuple[int, ...] = ()) -> np.ndarray:
        """Lung probability on the coarse grid (input orientation), after the component choice.

        ``flips``: the axes to flip into the training orientation (``canonical_flips``).
        """
        hu = downsample(pixels, spacing)
        coarse_ml = float(np.prod([n * s for n, s in zip(pixels.shape, spacing)])) / hu[0, 0].numel() / 1000
        dims = [axis + 2 for axis in flips]
        if dims:
            hu = torch.flip(hu, dims)
        padded, box = pad_edges(hu)
        logits = sliding_window_inference(normalise_hu(padded).to(self.device), roi_size=ROI, sw_batch_size=1,
                                          predictor=self.network, overlap=0.25, mode="gaussian")
        probability = torch.sigmoid(logits)[0, 0].float().cpu()[box]
        if dims:
            probability = torch.flip(probability, [d - 2 for d in dims])
        probability = probability.numpy()
        keep = self._oriented(keep_lung_components, probability, coarse_ml, flips)
        # keep the soft edge just outside the kept components so the upsampled border stays smooth
        grown = ndi.binary_dilation(keep, structure=np.ones((3, 3, 3), bool))
        return np.where(grown, probability, 0.0).astype(np.float32)

    @staticmethod
    def _oriented(rule, probability, voxel_ml, flips):
        """Apply a rule that expects axis 0 to run to the head to an array in input orientation."""
        index = tuple(slice(None, None, -1) if axis == 0 and 0 in flips else slice(None) for axis in range(3))
        return rule(probability[index], voxel_ml)[index]

    def predict(self, volume, prior=None) -> ModelOutput:
        output = self._segment(volume)
        if prior is not None:
            earlier = self._segment(prior)
            mask, prior_mask = output.segments[0].mask, earlier.segments[0].mask
            key = output.key_slices[0] if output.key_slices else None
            output.prior = PriorResult(measurements=earlier.measurements, segments=earlier.segments,
                                       key_slice=same_level(mask, key, prior_mask) if key is not None else None)
        return output

    def _segment(self, volume) -> ModelOutput:
        pixels = volume.pixels
        probability = self.coarse_probability(pixels, volume.spacing, canonical_flips(volume))
        mask, volume_ml, mean_hu, emphysema = refine_on_input_grid(probability, pixels, volume.spacing,
                                                                   volume.voxel_volume_ml)
        area = mask.sum(axis=(1, 2))
        key_slices = [int(np.argmax(area))] if area.any() else []  # mid-lung: where the lungs are largest
        measurements = []
        if area.any():
            measurements = [
                Measurement("volume", volume_ml, segment="lung"),
                Measurement("mean_attenuation", mean_hu, segment="lung"),
                Measurement("emphysema_index", emphysema, segment="lung"),
            ]
        return ModelOutput(segments=[SegmentMask("lung", mask)], measurements=measurements,
                           key_slices=key_slices)
