"""Low-dose CT denoising: a small 2D MONAI UNet applied slice by slice, plus a noise measurement.

Pipeline (``CTDenoiser.predict``):

1. HU -> HU / 250 (clipped to -1024..3071), slabs of ``SLAB`` axial slices at a time.
2. The UNet predicts the noise (residual learning); output = input - predicted noise. Each slab
   goes through ``sliding_window_inference`` in ``ROI``-sized tiles, so memory is bounded by
   the slab, not by the matrix size or the number of slices.
3. Noise before/after: a homogeneous soft-tissue region is found automatically (the square of
   ~12 mm whose *denoised* values have the lowest local standard deviation with a local mean
   in -150..150 HU, i.e. no edges or structure inside); the HU standard deviation of the input
   and of the output inside that same square are reported.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from model_zoo.base import Measurement, ModelOutput, with_weights

HU_LOW, HU_HIGH = -1024.0, 3071.0
SCALE = 250.0  # HU per network unit: soft-tissue noise of 10-50 HU is 0.04-0.2 units
ROI = (256, 256)
SLAB = 16
ROI_MM = 12.0
SOFT_TISSUE_HU = (-150.0, 150.0)


def build_network() -> torch.nn.Module:
    # batch norm (running statistics at inference), not MONAI's default instance norm: instance
    # statistics change with the tile's content and padding, which shifted the output level
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 128),
                strides=(2, 2), num_res_units=2, norm="batch")


def to_input(hu: torch.Tensor) -> torch.Tensor:
    return hu.clamp(HU_LOW, HU_HIGH) / SCALE


class Residual(torch.nn.Module):
    """input - predicted noise, in the network's units."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return x - self.network(x)


def roi_size_px(pixel_mm: float) -> int:
    k = int(round(ROI_MM / max(pixel_mm, 1e-3)))
    return max(5, min(31, k | 1))


def find_uniform_region(denoised: np.ndarray, pixel_mm: float):
    """(slice, row, col, size) of the most homogeneous soft-tissue square, or None."""
    k = roi_size_px(pixel_mm)
    best = None
    for start in range(0, denoised.shape[0], SLAB):
        x = torch.from_numpy(np.ascontiguousarray(denoised[start:start + SLAB], np.float32))[:, None]
        if x.shape[-1] < k or x.shape[-2] < k:
            return None
        mean = F.avg_pool2d(x, k, stride=max(1, k // 2))
        sd = (F.avg_pool2d(x * x, k, stride=max(1, k // 2)) - mean ** 2).clamp(min=0).sqrt()
        ok = (mean >= SOFT_TISSUE_HU[0]) & (mean <= SOFT_TISSUE_HU[1])
        if not ok.any():
            continue
        sd = torch.where(ok, sd, torch.full_like(sd, float("inf")))
        index = int(torch.argmin(sd))
        value = float(sd.flatten()[index])
        if best is None or value < best[0]:
            s, _, r, c = np.unravel_index(index, sd.shape)
            stride = max(1, k // 2)
            best = (value, start + int(s), int(r) * stride, int(c) * stride, k)
    return None if best is None else best[1:]


class CTDenoiser:
    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.device = torch.device(device)
        self.model = Residual(with_weights(build_network(), manifest)).to(self.device).eval()

    @torch.inference_mode()
    def denoise(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty(pixels.shape, np.float32)
        for start in range(0, pixels.shape[0], SLAB):
            hu = torch.from_numpy(np.ascontiguousarray(pixels[start:start + SLAB], np.float32))[:, None]
            x = to_input(hu).to(self.device)
            y = sliding_window_inference(x, roi_size=ROI, sw_batch_size=4, predictor=self.model,
                                         overlap=0.25, mode="gaussian", padding_mode="replicate")
            # voxels outside the network's HU range (e.g. metal above 3071) are kept as they were
            restored = (y * SCALE).float().cpu()[:, 0]
            clipped = (hu[:, 0] < HU_LOW) | (hu[:, 0] > HU_HIGH)
            out[start:start + SLAB] = torch.where(clipped, hu[:, 0], restored).numpy()
        return out

    def predict(self, volume) -> ModelOutput:
        pixels = volume.pixels
        denoised = self.denoise(pixels)
        measurements, key_slices, where = [], [], None
        region = find_uniform_region(denoised, float(np.mean(volume.spacing[1:])))
        if region is not None:
            s, r, c, k = region
            where = np.zeros(pixels.shape, bool)  # untouched pages cost no memory
            where[s, r:r + k, c:c + k] = True  # the SR outlines it on the key slice
            measurements = [
                Measurement("noise_input", float(np.std(pixels[s, r:r + k, c:c + k], dtype=np.float64))),
                Measurement("noise_output", float(np.std(denoised[s, r:r + k, c:c + k], dtype=np.float64))),
            ]
            key_slices = [s]
        return ModelOutput(derived_pixels=denoised, measurements=measurements, key_slices=key_slices,
                           measurement_region=where)
