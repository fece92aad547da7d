"""What the routing engine is told about a study: its series and their header attributes."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SeriesFacts:
    """One received series, as the index knows it."""

    series_instance_uid: str
    # header of its first instance, keyword -> value (str, int, float, list of those);
    # study and series level merged. Multi-valued attributes must be lists, not "A\\B" strings.
    # For an enhanced multi-frame instance the index adds what all its frames share in the
    # functional groups (ImageOrientationPatient, PixelSpacing, SliceThickness, ...).
    attributes: dict[str, object]
    # number of instances (for a single multi-frame instance: its NumberOfFrames)
    instance_count: int


def is_empty(value: object) -> bool:
    """DICOM type 2 attributes may be sent empty; for routing an empty value counts as absent."""
    return value is None or value == "" or (isinstance(value, (list, tuple)) and len(value) == 0)


def as_number(value: object) -> float | None:
    """A number, or a numeric string (DS/IS values are often stored as text); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def as_values(value: object) -> list[object]:
    """The values of a possibly multi-valued attribute."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def show_value(value: object, limit: int = 60) -> str:
    """A short repr for reasons; long values are cut so that a reason stays on one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def slice_count(series: SeriesFacts) -> int:
    """Instances, or frames when the series is one multi-frame instance."""
    if series.instance_count == 1:
        frames = as_number(series.attributes.get("NumberOfFrames"))
        if frames is not None and frames > 1:
            return int(frames)
    return series.instance_count


def series_label(series: SeriesFacts) -> str:
    """How a series is named in reasons: uid, modality, description and size."""
    modality = series.attributes.get("Modality") or "?"
    description = series.attributes.get("SeriesDescription") or ""
    count = slice_count(series)
    instances = f"{count} instance" if count == 1 else f"{count} instances"
    return f"series {series.series_instance_uid} ({modality} {description!r}, {instances})"


def describe_value(value: object) -> str:
    """Type and value, for parse problems: "a string 'CT'", "an integer 5"."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float", list: "a list", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} {show_value(value)}"
