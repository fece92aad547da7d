"""The Model interface and what a model returns.

A model is loaded once (``load``) and then called per series (``predict``). It receives a
:class:`~dicom_ai_node.imaging.volume.Volume` and returns a :class:`ModelOutput` whose arrays
are on the same grid as the input volume. Coded concepts (what a segment *is*, the unit of a
measurement) come from the model's manifest, not from code, so the encoders in
``dicom_ai_node.results`` can turn any model's output into SEG / SR / key images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from dicom_ai_node.imaging.volume import Volume
    from model_zoo.manifest import Manifest


@dataclass
class SegmentMask:
    name: str  # key of an [[outputs.segments]] entry in the manifest
    mask: np.ndarray  # bool (slices, rows, columns), same grid as the input volume


@dataclass
class Measurement:
    name: str  # key of an [[outputs.measurements]] entry in the manifest
    value: float
    segment: str | None = None  # segment the measurement was taken on, if any


@dataclass
class Finding:
    name: str  # key of an [[outputs.findings]] entry in the manifest
    value: str  # key of one of that finding's coded values
    probability: float  # 0..1


@dataclass
class ModelOutput:
    segments: list[SegmentMask] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # An image series on the input grid, in the input's units (e.g. a denoised CT in HU).
    derived_pixels: np.ndarray | None = None
    # A per-voxel saliency map in 0..1 on the input grid (e.g. Grad-CAM), shown on key images.
    saliency: np.ndarray | None = None
    # Slice indices a radiologist should look at first; the encoder picks some when empty.
    key_slices: list[int] = field(default_factory=list)
    # Where the measurements without a segment were taken (bool, input grid), e.g. the uniform
    # region a noise measurement used; the SR outlines it so viewers can show it.
    measurement_region: np.ndarray | None = None
    # A model that compares (``compares_with_prior``) and was given a prior: its result there.
    prior: "PriorResult | None" = None


@dataclass
class PriorResult:
    """What a comparing model found on the prior volume (its own grid): the same measurements
    as on the current one, the segments, and the prior's slice at the level of the current
    key slice (for side-by-side key images)."""

    measurements: list[Measurement] = field(default_factory=list)
    segments: list[SegmentMask] = field(default_factory=list)
    key_slice: int | None = None


def with_weights(network: "torch.nn.Module", manifest: "Manifest | None") -> "torch.nn.Module":
    """``network`` with the manifest's committed weights (state_dict) loaded, when it names any."""
    import torch

    if manifest is not None and manifest.weights:
        state = torch.load(manifest.folder / manifest.weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    return network


class Model(Protocol):
    """``predict(volume)``; a model with ``compares_with_prior = True`` is also called as
    ``predict(volume, prior=prior_volume)`` when its rule asks for priors and one was fetched,
    and then fills ``ModelOutput.prior``."""

    manifest: "Manifest"

    def predict(self, volume: "Volume") -> ModelOutput: ...
