"""Key images: Secondary Capture slices with the mask or saliency burned in, plus a disclaimer.

The banner "AI RESULT - NOT FOR PRIMARY DIAGNOSIS" and the model's name/version are drawn into
the pixels (BurnedInAnnotation YES), so they travel with the image to any viewer or printout.
A result sent although it failed its quality checks says so right under the disclaimer, in
white on red: "QC FAILED: <reason>".
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont  # Pillow comes with highdicom
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from model_zoo.base import ModelOutput
from model_zoo.manifest import Manifest

MIN_WIDTH = 512  # small matrices are enlarged so the banner stays legible
FILL_OPACITY = 0.35
YELLOW, WHITE, QC_RED = (255, 255, 0), (255, 255, 255), (200, 0, 0)
MAX_QC_LINES = 4  # of the banner; each failure takes at most two, the rest is "+N more"
LUNG_WINDOW = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)


def build_key_images(
    sources: Sequence[Dataset],
    volume: Volume,
    output: ModelOutput,
    manifest: Manifest,
    uid_seed: str,
    series_number: int,
    max_images: int = 3,
    qc_failures: Sequence[str] = (),
    prior=None,
) -> list[Dataset]:
    """Up to ``max_images`` RGB Secondary Capture images, in slice order.

    Slices: see :func:`pick_key_slices`. Nothing to show (no masks, no saliency, no key
    slices) gives []. ``qc_failures``: the quality checks a result sent flagged failed.
    ``prior``: the job's PriorInput; when the model compared (``output.prior``), one more image
    shows this study's first key slice and the prior's slice at the same level side by side.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    series_uid = common.new_uid(uid_seed, "key-images", "series")
    images = []
    pictures = [(index, *render_slice(volume, output, manifest, index, qc_failures), False)
                for index in pick_key_slices(volume, output, max_images)]
    if (pictures and output.prior is not None and output.prior.key_slice is not None
            and prior is not None and prior.volume is not None):
        index = next((i for i in output.key_slices if i in [p[0] for p in pictures]), pictures[0][0])
        pictures.append((index, *side_by_side(volume, output, manifest, index, prior, qc_failures), True))
    for instance_number, (index, pixels, zoom, comparison) in enumerate(pictures, start=1):
        frame = volume.source_frames[index]
        source = by_uid[frame.sop_instance_uid]
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=common.new_uid(uid_seed, "key-images", index, *(["prior"] if comparison else [])),
            instance_number=instance_number,
            manufacturer=common.NODE_MANUFACTURER,
            pixel_spacing=(volume.spacing[1] / zoom, volume.spacing[2] / zoom),
            patient_orientation=(_dominant_letter(volume.row_direction), _dominant_letter(volume.column_direction)),
            series_description=common.series_description(manifest, "key images", qc_failed=bool(qc_failures)),
            manufacturer_model_name=manifest.algorithm_name[:64],
            software_versions=common.node_software_versions(manifest),
        )
        # Oblique planes need two or three letters per axis, which highdicom's enum does not allow.
        image.PatientOrientation = [orientation_letters(volume.row_direction),
                                    orientation_letters(volume.column_direction)]
        image.BurnedInAnnotation = "YES"
        image.ConversionType = "WSD"  # workstation
        image.ImageComments = "; ".join([common.DISCLAIMER,
                                         *(f"{common.QC_FAILED}: {r}" for r in qc_failures)])[:10240]
        image.DerivationDescription = f"Slice {index + 1} of {volume.shape[0]} with {manifest.algorithm_name} result"[:1024]
        image.SourceImageSequence = [_source_reference(frame)]
        if comparison:
            prior_frame = prior.volume.source_frames[output.prior.key_slice]
            image.SourceImageSequence.append(_source_reference(prior_frame))
            image.DerivationDescription = (f"Slice {index + 1} of {volume.shape[0]} (left) beside the prior study "
                                           f"{prior.study_date or ''} at the same level (right), with "
                                           f"{manifest.algorithm_name} result")[:1024]
        common.copy_clinical_context(image, source)
        # e.g. a lung CT (paired) without Laterality, or an enhanced CT made by a legacy
        # converter that keeps BodyPartExamined in its functional groups
        common.add_unknown_laterality(image)
        common.add_contributing_equipment(image, manifest)
        images.append(image)
    return images


def side_by_side(volume: Volume, output: ModelOutput, manifest: Manifest, index: int, prior,
                 qc_failures: Sequence[str] = ()) -> tuple[np.ndarray, int]:
    """This study's slice ``index`` (left) and the prior's slice at the same level (right), each
    with its mask; the prior panel is resized to this panel's millimetres per pixel, so the one
    PixelSpacing holds for the whole picture. Returns the picture and this panel's zoom."""
    left, zoom = render_slice(volume, output, manifest, index, qc_failures, label="this study")
    earlier = ModelOutput(segments=output.prior.segments)
    right, prior_zoom = render_slice(prior.volume, earlier, manifest, output.prior.key_slice, qc_failures,
                                     label=f"prior {prior.study_date or ''}".strip())
    scale = (prior.volume.spacing[1] / prior_zoom) / (volume.spacing[1] / zoom), \
        (prior.volume.spacing[2] / prior_zoom) / (volume.spacing[2] / zoom)
    size = (max(1, round(right.shape[1] * scale[1])), max(1, round(right.shape[0] * scale[0])))
    right = np.asarray(Image.fromarray(right).resize(size, Image.Resampling.BILINEAR))
    height = max(left.shape[0], right.shape[0])
    panels = [np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0))) for panel in (left, right)]
    return np.ascontiguousarray(np.concatenate(panels, axis=1)), zoom


def pick_key_slices(volume: Volume, output: ModelOutput, max_images: int) -> list[int]:
    """Slice indices to show, in ascending order: the model's ``key_slices`` (those that show a
    segment, for a segmentation), else the slices where the segments are largest (the lungs:
    around the hilum, not their first slice), else where the saliency is largest."""
    count = volume.shape[0]
    chosen = [i for i in dict.fromkeys(output.key_slices) if 0 <= i < count
              and (not output.segments or any(segment.mask[i].any() for segment in output.segments))]
    chosen = chosen[:max_images]
    if not chosen:
        if output.segments:
            score = sum(segment.mask.reshape(count, -1).sum(axis=1) for segment in output.segments)
        elif output.saliency is not None:
            score = output.saliency.reshape(count, -1).sum(axis=1)
        else:
            return []
        ranked = np.argsort(-np.asarray(score, dtype=float), kind="stable")
        chosen = [int(i) for i in ranked[:max_images] if score[i] > 0]
    return sorted(chosen)


def render_slice(volume: Volume, output: ModelOutput, manifest: Manifest, index: int,
                 qc_failures: Sequence[str] = (), label: str | None = None) -> tuple[np.ndarray, int]:
    """RGB uint8 picture of slice ``index`` and the integer zoom applied to it."""
    zoom = max(1, -(-MIN_WIDTH // volume.shape[2]))  # ceil
    gray = _windowed(volume, manifest, index)
    rgb = np.repeat(_enlarge(gray, zoom)[..., None], 3, axis=2).astype(np.float32)
    if output.saliency is not None and not output.segments:
        heat = np.clip(_enlarge(output.saliency[index].astype(np.float32), zoom), 0, 1)
        alpha = (0.6 * heat)[..., None]
        rgb = rgb * (1 - alpha) + _heat_colours(heat) * alpha
    overlays = [(_enlarge(segment.mask[index].astype(bool), zoom),
                 np.array(manifest.segment(segment.name).color, dtype=np.float32)) for segment in output.segments]
    for mask, colour in overlays:  # all fills first, so no fill tints another segment's outline
        rgb[mask] = rgb[mask] * (1 - FILL_OPACITY) + colour * FILL_OPACITY
    for mask, colour in overlays:
        rgb[_outline(mask)] = colour
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    _draw_banner(picture, qc_failures, [f"{manifest.algorithm_name} {manifest.algorithm_version}",
                                        f"slice {index + 1}/{volume.shape[0]}" + (f" ({label})" if label else "")])
    return np.asarray(picture), zoom


def default_window(volume: Volume, manifest: Manifest) -> tuple[float, float] | None:
    """(center, width): the source's first VOI window, else a CT default; None for others."""
    center, width = volume.attributes.get("WindowCenter"), volume.attributes.get("WindowWidth")
    if center is not None and width is not None:
        center = center[0] if isinstance(center, list) else center
        width = width[0] if isinstance(width, list) else width
        if float(width) > 0:
            return float(center), float(width)
    if volume.modality == "CT":
        lungs = any("lung" in spec.type.meaning.lower() for spec in manifest.segments)
        return LUNG_WINDOW if lungs else SOFT_TISSUE_WINDOW
    return None


def _windowed(volume: Volume, manifest: Manifest, index: int) -> np.ndarray:
    values = volume.pixels[index]
    window = default_window(volume, manifest)
    if window is None:  # e.g. MR: stretch the 1st..99th percentile
        low, high = np.percentile(values, [1, 99])
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    return np.clip((values - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)


def _enlarge(image: np.ndarray, zoom: int) -> np.ndarray:
    return np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1) if zoom > 1 else image


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    """A blue-green-yellow-red ramp for values in 0..1."""
    red = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1) * 255.0


def _draw_banner(picture: Image.Image, qc_failures: Sequence[str], details: list[str]) -> None:
    """Black banner at the top: the yellow disclaimer, the failed quality checks in white on
    red, then ``details`` in white."""
    size = max(10, picture.width // 36)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        font = ImageFont.load_default()
    qc = qc_banner_lines(qc_failures, lambda text: font.getlength(text) <= picture.width - 12)
    rows = [(common.DISCLAIMER, YELLOW, None), *((line, WHITE, QC_RED) for line in qc),
            *((line, WHITE, None) for line in details)]
    draw = ImageDraw.Draw(picture)
    line_height = int(size * 1.3)
    draw.rectangle([0, 0, picture.width, line_height * len(rows) + 6], fill=(0, 0, 0))
    for number, (line, colour, background) in enumerate(rows):
        top = 3 + number * line_height
        if background:
            draw.rectangle([0, top, picture.width, top + line_height - 1], fill=background)
        draw.text((6, top), line, fill=colour, font=font)


def qc_banner_lines(qc_failures: Sequence[str], fits, max_lines: int = MAX_QC_LINES) -> list[str]:
    """"QC FAILED: <reason>" per failure, word-wrapped to lines for which ``fits(line)`` is true,
    at most two lines each (cut short with "..."); failures that do not fit in ``max_lines``
    become one "+N more" line."""
    lines: list[str] = []
    for shown, reason in enumerate(qc_failures):
        wrapped = _wrapped(f"{common.QC_FAILED}: {reason}", fits)
        if len(wrapped) > 2:
            wrapped = [wrapped[0], _shortened(" ".join(wrapped[1:]), fits)]
        more = len(qc_failures) - shown
        if len(lines) + len(wrapped) + (more > 1) > max_lines:
            lines.append(f"+{more} more failed quality checks (see the SR)")
            break
        lines += wrapped
    return lines


def _wrapped(text: str, fits) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and not fits(candidate):
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def _shortened(text: str, fits) -> str:
    while not fits(text) and len(text) > 3:
        text = text[:-4].rstrip() + "..."
    return text


def orientation_letters(direction: np.ndarray) -> str:
    """PatientOrientation letters for an LPS direction, strongest first (e.g. "L", "PF")."""
    letters = []
    for axis in np.argsort(-np.abs(direction)):
        if abs(direction[axis]) > 1e-3:
            letters.append(("LR", "PA", "HF")[axis][0 if direction[axis] > 0 else 1])
    return "".join(letters[:3])


def _dominant_letter(direction: np.ndarray) -> str:
    return orientation_letters(direction)[0]


def _source_reference(frame) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = frame.sop_class_uid
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = frame.frame_number
    return item
