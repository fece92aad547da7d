"""What the adapters share: [model.options] -> preprocessing, tiled inference, output decoding.

Options (all in ``[model.options]`` of model.toml; ``[]`` = optional)::

    spatial_dims = 3                 # 3: the network takes (N, C, D, H, W) volumes;
                                     # 2: it takes (N, C, H, W) axial slices, run slab by slab
    [clip] = [-1000.0, 500.0]        # input values are clipped to this range (e.g. an HU window)
    [scale_to] = [0.0, 1.0]          # ...and mapped linearly from the clip range to this range
    [spacing_mm] = [2.5, 2.5, 2.5]   # resample (slices, rows, cols) to this spacing first (3D only)
    [roi_size] = [64, 128, 128]      # sliding-window tile size (bounded memory); absent: whole input
    [sw_batch_size] = 1
    [overlap] = 0.25
    [slab] = 16                      # 2D: slices per network call
    output = "segmentation"          # segmentation | image | class
    # output = "segmentation":
    activation = "sigmoid"           # sigmoid: channel i > threshold -> segments[i]
                                     # softmax / argmax: label i (>0) of argmax -> segments[i-1]
    [threshold] = 0.5
    segments = ["lung"]              # names of [[outputs.segments]] in output order
    # output = "image" (denoising): the network returns an image in the scaled units; it is
    # mapped back to input units and returned as derived_pixels.
    # output = "class": the network returns (N, classes) logits, one row per volume (3D) or per
    # slice (2D, averaged after softmax); classes = value keys of [[outputs.findings]] (first).
    [classes] = ["chest", "abdomen"]

A measurement named ``volume`` declared in the manifest is filled in (mL, per segment).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from model_zoo.base import Finding, Measurement, ModelOutput, SegmentMask
from model_zoo.manifest import ManifestError

OUTPUTS = ("segmentation", "image", "class")
ACTIVATIONS = ("sigmoid", "softmax", "argmax")


class AdapterOptions:
    """[model.options] validated against the manifest; errors name file and key."""

    def __init__(self, manifest):
        raw = dict(manifest.extra)
        self.path = manifest.path

        def fail(key, problem):
            raise ManifestError(f"{manifest.path}: model.options.{key}: {problem}")

        def numbers(key, count, default=None):
            value = raw.get(key, default)
            if value is None:
                return None
            if (not isinstance(value, list) or (count and len(value) != count)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                fail(key, f"must be a list of {count or 'some'} numbers, got {value!r}")
            return [float(v) for v in value]

        self.spatial_dims = raw.get("spatial_dims", 3)
        if self.spatial_dims not in (2, 3):
            fail("spatial_dims", f"must be 2 or 3, got {self.spatial_dims!r}")
        self.clip = numbers("clip", 2)
        if self.clip and self.clip[0] >= self.clip[1]:
            fail("clip", "must be [low, high] with low < high")
        self.scale_to = numbers("scale_to", 2)
        if self.scale_to and not self.clip:
            fail("scale_to", "needs clip (the range that is mapped)")
        self.spacing_mm = numbers("spacing_mm", 3)
        if self.spacing_mm and (self.spatial_dims != 3 or min(self.spacing_mm) <= 0):
            fail("spacing_mm", "needs spatial_dims = 3 and positive values")
        roi = numbers("roi_size", self.spatial_dims)
        self.roi_size = tuple(int(v) for v in roi) if roi else None
        self.sw_batch_size = int(raw.get("sw_batch_size", 1))
        self.overlap = float(raw.get("overlap", 0.25))
        self.slab = int(raw.get("slab", 16))
        self.output = raw.get("output", {"segmentation": "segmentation", "denoising": "image",
                                          "classification": "class"}[manifest.task])
        if self.output not in OUTPUTS:
            fail("output", f"must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        self.activation = raw.get("activation", "sigmoid")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        self.threshold = float(raw.get("threshold", 0.5))
        declared = [s.name for s in manifest.segments]
        self.segments = list(raw.get("segments", declared[:1] if self.output == "segmentation" else []))
        for name in self.segments:
            if name not in declared:
                fail("segments", f"{name!r} is not an [[outputs.segments]] name ({', '.join(declared) or 'none'})")
        if self.output == "segmentation" and not self.segments:
            fail("segments", "a segmentation model needs at least one [[outputs.segments]] entry")
        self.finding = manifest.findings[0] if manifest.findings else None
        self.classes = list(raw.get("classes", list(self.finding.values) if self.finding else []))
        if self.output == "class":
            if self.finding is None:
                fail("output", "output = 'class' needs an [[outputs.findings]] entry")
            unknown = [c for c in self.classes if c not in self.finding.values]
            if unknown:
                fail("classes", f"{unknown} are not values of finding {self.finding.name!r}")
        if self.output == "image" and manifest.task != "denoising":
            fail("output", "output = 'image' is for task = 'denoising'")
        self.volume_measurement = any(m.name == "volume" for m in manifest.measurements)


class AdapterModel:
    """Subclasses set ``self.predictor``: a callable torch tensor -> torch tensor on ``device``."""

    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.device = torch.device(device)
        self.options = AdapterOptions(manifest)
        self.predictor = None

    # -- preprocessing ---------------------------------------------------------------------
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.clip:
            x = x.clamp(o.clip[0], o.clip[1])
            if o.scale_to:
                x = (x - o.clip[0]) / (o.clip[1] - o.clip[0]) * (o.scale_to[1] - o.scale_to[0]) + o.scale_to[0]
        return x

    def _unscale(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.clip and o.scale_to:
            x = (x - o.scale_to[0]) / (o.scale_to[1] - o.scale_to[0]) * (o.clip[1] - o.clip[0]) + o.clip[0]
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        x = x.to(self.device)
        if o.roi_size and o.output != "class":
            return sliding_window_inference(x, roi_size=o.roi_size, sw_batch_size=o.sw_batch_size,
                                            predictor=self.predictor, overlap=o.overlap, mode="gaussian")
        return self.predictor(x)

    @torch.inference_mode()
    def raw_output(self, pixels: np.ndarray, spacing) -> torch.Tensor:
        """The network's output on the input grid (segmentation/image), or logits (class)."""
        o = self.options
        volume = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if o.spatial_dims == 2:
            parts = []
            for start in range(0, volume.shape[0], o.slab):
                parts.append(self._run(self._scale(volume[start:start + o.slab])[:, None]).float().cpu())
            out = torch.cat(parts)  # (slices, C, H, W) or (slices, classes)
            return out if o.output == "class" else out.permute(1, 0, 2, 3)  # (C, D, H, W)
        x = self._scale(volume)[None, None]
        if o.spacing_mm:
            size = [max(1, round(n * s / t)) for n, s, t in zip(volume.shape, spacing, o.spacing_mm)]
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        out = self._run(x).float().cpu()
        if o.output == "class":
            return out
        if out.shape[2:] != volume.shape:
            out = F.interpolate(out, size=tuple(volume.shape), mode="trilinear", align_corners=False)
        return out[0]  # (C, D, H, W)

    def predict(self, volume) -> ModelOutput:
        o = self.options
        out = self.raw_output(volume.pixels, volume.spacing)
        if o.output == "image":
            return ModelOutput(derived_pixels=self._unscale(out[0]).numpy().astype(np.float32))
        if o.output == "class":
            probability = torch.softmax(out, dim=-1).mean(dim=0)
            if probability.numel() != len(o.classes):
                raise ValueError(f"{self.manifest.name}: the network gives {probability.numel()} classes, "
                                 f"model.options.classes lists {len(o.classes)}")
            best = int(torch.argmax(probability))
            return ModelOutput(findings=[Finding(o.finding.name, o.classes[best], float(probability[best]))])
        if o.activation == "sigmoid":
            masks = [(torch.sigmoid(out[i]) > o.threshold).numpy() for i in range(len(o.segments))]
        else:
            labels = torch.argmax(out, dim=0).numpy() if out.shape[0] > 1 else (out[0] > o.threshold).numpy()
            masks = [labels == i + 1 for i in range(len(o.segments))]
        segments = [SegmentMask(name, mask) for name, mask in zip(o.segments, masks)]
        measurements = []
        if o.volume_measurement:
            measurements = [Measurement("volume", float(s.mask.sum()) * volume.voxel_volume_ml, segment=s.name)
                            for s in segments if s.mask.any()]
        return ModelOutput(segments=segments, measurements=measurements)
