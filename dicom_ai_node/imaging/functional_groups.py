"""Series-level values of an enhanced multi-frame object, read from its functional groups.

Enhanced CT/MR (and the Legacy Converted Enhanced objects) keep orientation, pixel spacing,
slice thickness, rescale and window of each frame in the Shared or Per-frame Functional Groups
Sequence, not at the top level where a classic image has them. :func:`shared_frame_values`
lifts the ones every frame shares to their classic keywords, so the index (what routing rules
and the series selector test) and the loader (what a model's input check reads) see an
enhanced series the way they see a classic one.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# functional group macro -> the attributes in it that describe the whole series when all frames agree
LIFTED = {
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth"),
}


def shared_frame_values(dataset: Dataset) -> dict[str, object]:
    """Keyword -> value (float, str or a list of those) for each attribute of :data:`LIFTED`
    that every frame of ``dataset`` has with the same value; {} for a classic image.

    A macro in the shared groups holds for every frame; a macro in the per-frame groups counts
    only when all frames carry it with equal values (an oblique frame among axial ones leaves
    ImageOrientationPatient out, and the loader refuses the mix later with its own reason)."""
    try:
        per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    except Exception:  # noqa: BLE001 - malformed: the instance is still indexed, the loader says what is wrong
        return {}
    if not per_frame:
        return {}
    shared = _first_item(dataset, "SharedFunctionalGroupsSequence")
    values: dict[str, object] = {}
    for macro, keywords in LIFTED.items():
        in_shared = _first_item(shared, macro) if shared is not None else None
        items = [in_shared] if in_shared is not None else [_first_item(frame, macro) for frame in per_frame]
        if any(item is None for item in items):
            continue
        for keyword in keywords:
            found = [_value(item, keyword) for item in items]
            if found[0] is not None and all(value == found[0] for value in found[1:]):
                values[keyword] = found[0]
    return values


def _first_item(dataset: Dataset, keyword: str) -> Dataset | None:
    try:
        sequence = dataset.get(keyword)
        return sequence[0] if sequence else None
    except Exception:  # noqa: BLE001 - a malformed sequence counts as absent: the loader says what is wrong
        return None


def _value(item: Dataset, keyword: str) -> object:
    """JSON-friendly: DS/IS/FD as float, multi-valued as a list, text as str; None when absent,
    empty or unreadable."""
    try:
        return _plain(item.get(keyword))
    except (TypeError, ValueError, OverflowError):
        return None


def _plain(value: object) -> object:
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = [_plain(item) for item in value]
        return None if not items or None in items else items
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return str(value)
