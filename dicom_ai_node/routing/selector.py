"""Series selector: among the series that met a rule's conditions, which ones the models get."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .facts import SeriesFacts, as_number, slice_count

ORIENTATIONS = ("any", "axial", "coronal", "sagittal")
PICKS = ("all", "thinnest", "most_slices")
# how far the slice normal may lean from the patient axis and still count as that plane
ORIENTATION_TOLERANCE_DEG = 10.0
# the patient axis each plane's normal points along (DICOM LPS: x = left, y = posterior, z = head)
PLANE_BY_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass
class SeriesSelector:
    """`[rules.series]`; the defaults take every matching series."""

    orientation: str = "any"
    min_slices: int = 0
    pick: str = "all"

    def is_default(self) -> bool:
        return self == SeriesSelector()

    def select(self, candidates: list[SeriesFacts]) -> tuple[list[str], str]:
        """The chosen series uids and one reason line."""
        if not candidates:
            return [], "selector: no series matched the conditions"

        eligible, skipped = [], []
        for series in candidates:
            why_not = self._why_not(series)
            if why_not:
                skipped.append(f"{series.series_instance_uid} ({why_not})")
            else:
                eligible.append(series)

        line = f"selector: {len(candidates)} series matched"
        if skipped:
            line += f"; skipped {', '.join(skipped)}"
        if not eligible:
            return [], line + "; none left to pick"
        if self.pick == "all":
            uids = [s.series_instance_uid for s in eligible]
            return uids, line + f"; picked {', '.join(uids)} (all)"

        chosen = min(eligible, key=self._rank)
        thickness = _thickness(chosen)
        thickness_text = f"SliceThickness {thickness} mm" if thickness is not None else "SliceThickness unknown"
        detail = f"{thickness_text}, {slice_count(chosen)} slices"
        return [chosen.series_instance_uid], line + f"; picked {chosen.series_instance_uid} ({self.pick}, {detail})"

    def _why_not(self, series: SeriesFacts) -> str | None:
        if self.orientation != "any":
            plane, detail = orientation_of(series.attributes.get("ImageOrientationPatient"))
            if plane != self.orientation:
                return f"{detail}, not {self.orientation}"
        count = slice_count(series)
        if count < self.min_slices:
            return f"{count} slices < {self.min_slices}"
        return None

    def _rank(self, series: SeriesFacts) -> tuple:
        # unknown thickness sorts after any known one; the uid makes ties deterministic
        thickness = _thickness(series)
        thickness_key = thickness if thickness is not None else math.inf
        if self.pick == "thinnest":
            return (thickness_key, -slice_count(series), series.series_instance_uid)
        return (-slice_count(series), thickness_key, series.series_instance_uid)


def _thickness(series: SeriesFacts) -> float | None:
    return as_number(series.attributes.get("SliceThickness"))


def orientation_of(image_orientation: object) -> tuple[str, str]:
    """("axial" | "coronal" | "sagittal" | "oblique" | "unknown", detail for reasons)."""
    if not isinstance(image_orientation, (list, tuple)) or len(image_orientation) != 6:
        return "unknown", "no ImageOrientationPatient"
    numbers = [as_number(v) for v in image_orientation]
    if None in numbers:
        return "unknown", "ImageOrientationPatient not numeric"
    row, column = numbers[:3], numbers[3:]
    normal = [
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    ]
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        return "unknown", "ImageOrientationPatient degenerate"
    axis = max(range(3), key=lambda i: abs(normal[i]))
    tilt = math.degrees(math.acos(min(1.0, abs(normal[axis]) / length)))
    if tilt > ORIENTATION_TOLERANCE_DEG:
        return "oblique", f"oblique, {tilt:.0f} deg from {PLANE_BY_AXIS[axis]}"
    return PLANE_BY_AXIS[axis], PLANE_BY_AXIS[axis]
