"""CT body region per axial slice (head / chest / abdomen / pelvis), with Grad-CAM saliency.

Pipeline (``BodyRegionClassifier.predict``):

1. Every axial slice is resampled in-plane to 3 mm pixels (area averaging) and centred on a
   128 x 128 canvas (384 mm; larger fields of view are cropped at the edges, smaller ones
   padded with air), HU clipped to -1000..1000 and divided by 1000. Slices go through the
   network in batches of ``BATCH``, so memory does not grow with the number of slices.
2. A small 2D MONAI DenseNet gives per-slice class probabilities (softmax).
3. The series' finding is the region with the highest mean probability over all slices; the
   probability reported is that mean.
4. Grad-CAM (monai.visualize.GradCAM on the last dense block) for the predicted class on up to
   three slices where that class is most probable, mapped back onto the input grid: the
   saliency shown on the key images. Other slices have zero saliency.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet

from model_zoo.base import Finding, ModelOutput, with_weights

CLASSES = ("head", "chest", "abdomen", "pelvis")
PIXEL_MM = 3.0
SIZE = 128
BATCH = 32
KEY_SLICES = 3
TARGET_LAYER = "features.denseblock3"


def build_network() -> torch.nn.Module:
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=len(CLASSES), init_features=24,
                    growth_rate=12, block_config=(3, 4, 6), bn_size=2)


def prepare_slices(pixels: np.ndarray, spacing, start: int = 0, stop: int | None = None):
    """HU slices [start:stop] -> (n, 1, SIZE, SIZE) network input, and the placement
    (top, left, height, width) of the resampled slice on the canvas (for mapping back)."""
    stop = pixels.shape[0] if stop is None else stop
    x = torch.from_numpy(np.ascontiguousarray(pixels[start:stop], np.float32))[:, None]
    rows, cols = pixels.shape[1:]
    h = max(1, int(round(rows * spacing[1] / PIXEL_MM)))
    w = max(1, int(round(cols * spacing[2] / PIXEL_MM)))
    mode = "area" if h <= rows and w <= cols else "bilinear"
    x = F.interpolate(x, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    x = x.clamp(-1000.0, 1000.0) / 1000.0
    canvas = torch.full((x.shape[0], 1, SIZE, SIZE), -1.0)
    top, left = (SIZE - h) // 2, (SIZE - w) // 2
    # source and destination windows (crop when larger than the canvas, pad when smaller)
    sy, dy = max(0, -top), max(0, top)
    sx, dx = max(0, -left), max(0, left)
    ch, cw = min(h - sy, SIZE - dy), min(w - sx, SIZE - dx)
    canvas[:, :, dy:dy + ch, dx:dx + cw] = x[:, :, sy:sy + ch, sx:sx + cw]
    return canvas, (top, left, h, w)


def canvas_to_slice(cam: torch.Tensor, placement, rows: int, cols: int) -> np.ndarray:
    """A (SIZE, SIZE) map on the canvas -> (rows, cols) on the input slice."""
    top, left, h, w = placement
    full = torch.zeros(h, w)
    sy, dy = max(0, -top), max(0, top)
    sx, dx = max(0, -left), max(0, left)
    ch, cw = min(h - sy, SIZE - dy), min(w - sx, SIZE - dx)
    full[sy:sy + ch, sx:sx + cw] = cam[dy:dy + ch, dx:dx + cw]
    return F.interpolate(full[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0].numpy()


class BodyRegionClassifier:
    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.device = torch.device(device)
        self.network = with_weights(build_network(), manifest).to(self.device).eval()

    @torch.inference_mode()
    def slice_probabilities(self, pixels: np.ndarray, spacing) -> np.ndarray:
        out = []
        for start in range(0, pixels.shape[0], BATCH):
            x, _ = prepare_slices(pixels, spacing, start, start + BATCH)
            out.append(torch.softmax(self.network(x.to(self.device)), dim=1).float().cpu())
        return torch.cat(out).numpy()

    def saliency(self, pixels: np.ndarray, spacing, indices, class_index: int) -> dict[int, np.ndarray]:
        from monai.visualize import GradCAM

        cam = GradCAM(nn_module=self.network, target_layers=TARGET_LAYER)
        maps = {}
        for index in indices:
            x, placement = prepare_slices(pixels, spacing, index, index + 1)
            with torch.enable_grad():
                heat = cam(x=x.to(self.device), class_idx=class_index)[0, 0].detach().float().cpu()
            maps[index] = np.clip(canvas_to_slice(heat, placement, *pixels.shape[1:]), 0.0, 1.0)
        return maps

    def predict(self, volume) -> ModelOutput:
        pixels = volume.pixels
        probabilities = self.slice_probabilities(pixels, volume.spacing)
        mean = probabilities.mean(axis=0)
        best = int(np.argmax(mean))
        ranked = np.argsort(-probabilities[:, best], kind="stable")[:KEY_SLICES]
        key_slices = sorted(int(i) for i in ranked)
        saliency = np.zeros(pixels.shape, np.float32)  # untouched pages cost no memory
        for index, heat in self.saliency(pixels, volume.spacing, key_slices, best).items():
            saliency[index] = heat
        return ModelOutput(findings=[Finding("body_region", CLASSES[best], float(mean[best]))],
                           saliency=saliency, key_slices=key_slices)
