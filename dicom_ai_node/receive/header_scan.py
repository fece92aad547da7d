"""The few header values the receiver needs for every instance of a series it already knows:
its UIDs, InstanceNumber and NumberOfFrames. They are collected by the walk that checks every
data set (`data_set_check.py`), so such an instance is indexed without pydicom (whose parser
costs ~0.4 ms for a CT header: it builds every element).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200013: "InstanceNumber",
    0x00280008: "NumberOfFrames",
}
_REQUIRED = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)


def header_from_values(values: dict[int, bytes]) -> Dataset | None:
    """A Dataset of the WANTED elements' raw values, or None when pydicom should look."""
    if not all(tag in values for tag in _REQUIRED):
        return None  # let pydicom look (and word the refusal) when a UID seems missing
    header = Dataset()
    for tag, raw in values.items():
        text = raw.decode("ascii", "replace").strip("\0 ")
        if text:
            try:
                setattr(header, WANTED[tag], text)
            except (ValueError, TypeError):  # e.g. an InstanceNumber that is not a number
                return None
    return header
