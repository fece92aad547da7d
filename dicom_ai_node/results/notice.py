"""The "AI result not produced" notice: a small Secondary Capture in the source study that
tells the radiologist no result will come for a series, and why, so nobody waits for it.

Sent only when the routing rule asks for it (``no_result_notice = true``), for a job that ends
without a result: refused before inference (with the fitness check's reason), failed, or
dropped by its quality checks. One grey image with white text, readable in any viewer; the
reason also in ImageComments. It is not a result: no banner claims an AI finding, and the
series description says "NO RESULT".
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicom_ai_node.results import common
from dicom_ai_node.results.conform import conform_source, copied_keywords
from model_zoo.manifest import Manifest

SERIES_NUMBER = 9006  # after the result series (encode.SERIES_NUMBER) and rejection notes (9005)
SIZE = 512
TITLE = "AI RESULT NOT PRODUCED"
MAX_REASON_LINES = 12


def build_notice(source: Dataset, manifest: Manifest, rule_name: str, reason: str, uid_seed: str) -> Dataset:
    """The notice for one job. ``source`` is a header of the job's series (patient and study
    are copied from it, made valid first); ``reason`` is the job's, without patient data."""
    source = _copied(source)
    series = f"series {source.get('SeriesNumber', '?')}"
    description = str(source.get("SeriesDescription", "") or "").strip()
    lines = [f"{manifest.algorithm_name} {manifest.algorithm_version}"[:80],
             f"for {series}{': ' + description if description else ''}"[:80],
             f"rule: {rule_name}"[:80], "", "Reason:"]
    picture = _render(lines, reason)
    notice = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),  # emptied below: a card of text has no orientation
        series_instance_uid=common.new_uid(uid_seed, "notice", "series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=common.new_uid(uid_seed, "notice", "instance"),
        instance_number=1,
        manufacturer=common.NODE_MANUFACTURER,
        series_description=f"AI NO RESULT: {manifest.algorithm_name}"[:64],  # viewers show the start
        manufacturer_model_name=manifest.algorithm_name[:64],
        software_versions=common.node_software_versions(manifest),
    )
    notice.PatientOrientation = None  # Type 2C: present, unknown
    notice.BurnedInAnnotation = "YES"
    notice.ConversionType = "WSD"
    notice.ImageComments = f"{TITLE}: {reason}"[:10240]
    notice.DerivationDescription = (f"No result of {manifest.algorithm_name} {manifest.algorithm_version} "
                                    f"for series {source.get('SeriesInstanceUID', '')}")[:1024]
    common.copy_clinical_context(notice, source)
    common.add_unknown_laterality(notice)
    common.add_contributing_equipment(notice, manifest)
    return notice


_SERIES_KEYWORDS = ("SpecificCharacterSet", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                    "BodyPartExamined", "Laterality", "Modality")


def _copied(source: Dataset) -> Dataset:
    """The patient and study modules and the series attributes the notice needs, on a fresh
    dataset (the source's own may be invalid: conform_source mends them on the copy)."""
    copy = Dataset()
    for keyword in (*_SERIES_KEYWORDS, *sorted(copied_keywords())):
        if keyword in source:
            copy.add(source.data_element(keyword))
    conform_source(copy)
    return copy


def _render(lines: list[str], reason: str) -> np.ndarray:
    picture = Image.new("L", (SIZE, SIZE), 40)
    draw = ImageDraw.Draw(picture)
    size = SIZE // 30
    try:
        font, title_font = ImageFont.load_default(size=size), ImageFont.load_default(size=int(size * 1.4))
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        font = title_font = ImageFont.load_default()

    def fits(text: str) -> bool:
        return font.getlength(text) <= SIZE - 24

    draw.rectangle([0, 0, SIZE, int(size * 2.6)], fill=0)
    draw.text((12, 8), TITLE, fill=255, font=title_font)
    rows = [row for line in lines for row in (_wrapped(line, fits) or [""])]
    wrapped = _wrapped(reason, fits)
    if len(wrapped) > MAX_REASON_LINES:
        wrapped = [*wrapped[:MAX_REASON_LINES - 1], "... (the full reason is in the image comments)"]
    rows += wrapped + ["", "No AI result will follow for this series."]
    top = int(size * 3.2)
    for row in rows:
        draw.text((12, top), row, fill=230, font=font)
        top += int(size * 1.35)
    return np.asarray(picture)


def _wrapped(text: str, fits) -> list[str]:
    """Words to lines for which ``fits`` holds (a word too long for a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and fits(candidate):
            lines[-1] = candidate
        else:
            while not fits(word) and len(word) > 1:
                word = word[:-1]
            lines.append(word)
    return lines
