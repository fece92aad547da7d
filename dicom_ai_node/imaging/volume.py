"""The Volume: a series' pixels in one array plus the geometry that places them in the patient.

Axis order is (slice, row, column), the order a stack of DICOM frames has. Slice 0 is the
frame whose ImagePositionPatient is lowest along ``slice_direction``; every output the node
writes (SEG frames, derived series) is mapped back to the source frames through
``source_frames``, so no flip can creep in between model and file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class VolumeError(ValueError):
    """A series cannot be assembled into a volume; the message says why (shown on the job)."""


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of the volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str
    frame_number: int | None = None  # 1-based, for multi-frame sources; None for single-frame


@dataclass
class Volume:
    pixels: np.ndarray  # float32 (slices, rows, columns), rescale slope/intercept applied (HU for CT)
    origin: np.ndarray  # (3,) ImagePositionPatient of slice 0, mm, LPS patient coordinates
    row_direction: np.ndarray  # (3,) unit vector along a row (first triplet of ImageOrientationPatient)
    column_direction: np.ndarray  # (3,) unit vector down a column (second triplet)
    slice_direction: np.ndarray  # (3,) unit vector from slice i to slice i+1
    spacing: tuple[float, float, float]  # mm: (between slices, between rows, between columns)
    source_frames: list[SourceFrame]  # one per slice, in volume order
    modality: str = ""
    attributes: dict = field(default_factory=dict)  # series-level header values (keyword -> value)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def slice_position(self, index: int) -> np.ndarray:
        """ImagePositionPatient of slice ``index``."""
        return self.origin + index * self.spacing[0] * self.slice_direction

    def with_pixels(self, pixels: np.ndarray) -> "Volume":
        """A copy with other pixels on the same grid (e.g. a model's input after resampling back)."""
        if pixels.shape != self.pixels.shape:
            raise ValueError(f"shape {pixels.shape} does not match volume {self.pixels.shape}")
        return Volume(pixels, self.origin, self.row_direction, self.column_direction,
                      self.slice_direction, self.spacing, self.source_frames, self.modality,
                      dict(self.attributes))
