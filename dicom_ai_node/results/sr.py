"""TID 1500 Measurement Report (Comprehensive 3D SR) for a model's measurements and findings.

Every finding (one tracking UID) is drawn on a source image, so viewers can show it:
- per SEG segment: the volumetric group (TID 1411: references the segment, holds the model's
  measurements on it), preceded by a "tracked outline" per region of the segment on its key
  slice (e.g. both lungs): a TID 1501 group whose Area is INFERRED FROM the region's closed
  POLYLINE on the source image. The largest region's outline shares the segment's tracking UID;
- the measurements not tied to a segment: a planar ROI group (TID 1410) outlining
  ``ModelOutput.measurement_region`` on the key slice, preceded by its tracked outline;
- per finding: a TID 1501 group with the coded value, whose probability is INFERRED FROM the
  point where the model looked most (saliency maximum on the key slice).
When there is nothing to outline or point at (empty segment, no saliency, no measurement
region) the group's first measurement refers to the whole of a representative slice instead.
Failed quality checks of a result sent flagged are TID 1500 "Qualitative Evaluations".

Why this shape: OHIF (3.12) draws a finding only if it has an image SCOORD, and throws (a blank
SR viewport) for a tracking UID without one; it merges groups that share a tracking UID and
takes the tracking identifier of the first. It turns a group into a tracked, editable
measurement ("hydrates" it) only if the tracking identifier names a Cornerstone tool and the
group's first NUM has the SCOORD as its only child, with one SELECTED FROM image under it; the
first Comment becomes the measurement's label, and for a freehand outline the first NUM's value
its area. So a tracked outline names the PlanarFreehandROI tool and starts with the Area, a
finding names the ArrowAnnotate tool (a point, no area), both come first and carry the
readable label as a Comment, and no NUM has other children (OHIF drops a NUM with children it
cannot draw). docs/viewer-check.md has the details. The report is UNVERIFIED and goes into the
source study.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage as ndi

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from dicom_ai_node.results.seg import tracking_uid
from model_zoo.base import Measurement, ModelOutput, PriorResult
from model_zoo.manifest import Manifest

PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
SQUARE_MM = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
MAX_OUTLINE_POINTS = 200  # OHIF draws every point; a few hundred keep the SR small and fast
MAX_PARTS, MIN_PART = 4, 0.1  # a segment's regions outlined on its key slice: at most 4, >= 10 % of the largest
# OHIF hydrates a group whose tracking identifier names a Cornerstone tool
OHIF_FREEHAND_ROI = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"  # an outline and its area
OHIF_ARROW = "Cornerstone3DTools@^0.1.0:ArrowAnnotate"  # a point and its label
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
PRIVATE_SCHEME = "99DAINODE"  # the node's own codes where DICOM has none (as in the lung manifest)
COMPARED_WITH_PRIOR = hd.sr.CodedConcept("PRIOR", PRIVATE_SCHEME, "Comparison with prior study")
INPUT_REPAIRED = hd.sr.CodedConcept("INPUTFIX", PRIVATE_SCHEME, "Input repaired before processing")
MAX_REPAIRS_LISTED = 10
# namespace of the tracking UIDs that stay the same across a patient's studies
LONGITUDINAL_NAMESPACE = uuid.UUID("6f1c9a52-3a43-4c1e-9b0e-2f7f3c1d8a11")
PROCEDURE_BY_MODALITY = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}


@dataclass
class Anchor:
    """Where a group is drawn: a closed outline or a point on one source image."""
    graphic_type: hd.sr.GraphicTypeValues
    points: np.ndarray  # (column, row) image coordinates
    source: hd.sr.SourceImageForRegion
    area_mm2: float  # of the outlined region; 0 for a point or the whole-slice anchor of an empty mask
    traced: bool  # the outline of a region or the point of a saliency maximum (else the whole slice)

    def coordinates(self) -> hd.sr.CoordinatesForMeasurement:
        return hd.sr.CoordinatesForMeasurement(self.graphic_type, self.points, self.source)

    def region(self) -> hd.sr.ImageRegion:
        return hd.sr.ImageRegion(self.graphic_type, self.points, self.source)


def build_measurement_report(
    sources: Sequence[Dataset],
    volume: Volume,
    output: ModelOutput,
    manifest: Manifest,
    uid_seed: str,
    series_number: int,
    segmentation: Dataset | None = None,
    qc_failures: Sequence[str] = (),
    tracking_uids: dict[str, str] | None = None,
    prior=None,
    input_repairs: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR for one job. Pass the SEG built for the same job as ``segmentation``, if any.

    ``sources`` may be headers without pixel data. Segment numbers in ``segmentation`` are
    those :func:`~dicom_ai_node.results.seg.build_segmentation` gave (order of output.segments).
    ``qc_failures``: the quality checks a result sent flagged failed, one sentence each.
    ``tracking_uids``: segment name -> tracking UID (as given to the SEG), else the job's own.
    ``prior``: the job's PriorInput when its rule asks for priors: with ``output.prior``, each
    segment also gets a group of the prior's measurements (same tracking UID and identifier,
    drawn on the prior's image at the same level, Time Point Context: the prior's date) and the
    change since the prior in the current group; the prior's images are Pertinent Other
    Evidence. Without a prior, the report says "ran without prior: <reason>".
    ``input_repairs``: what the node repaired in the source before inference (one sentence
    each, jobs/fitness.py), listed as Qualitative Evaluations so a reader knows.
    """
    source_images = common.sources_in_volume_order(sources, volume)
    algorithm = common.algorithm_sr(manifest)
    qc_mark = f" ({common.QC_FAILED})" if qc_failures else ""  # on every label a viewer shows
    groups: list = []
    image_level_measurements = [m for m in output.measurements if m.segment is None or segmentation is None]

    def image_references() -> list:  # only for image-level groups: 400 items cost ~0.2 s
        return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in source_images]

    if segmentation is not None:
        for number, segment in enumerate(output.segments, start=1):
            spec = manifest.segment(segment.name)
            uid = tracking_uid(uid_seed, segment.name, tracking_uids)
            earlier = _prior_of(output.prior, prior, segment.name)
            # One outline per region (both lungs, not only the larger one); the first, the
            # largest, carries the segment's tracking UID and so its volumetric measurements.
            anchors = _anchors(segment.mask, volume, output.key_slices, parts=MAX_PARTS)
            for part, anchor in enumerate(anchors, start=1):
                label = spec.label if len(anchors) == 1 else f"{spec.label} ({part}/{len(anchors)})"
                groups.append(_outline_group(
                    uid if part == 1 else common.new_uid(uid_seed, "tracking", segment.name, "part", part),
                    label + qc_mark, anchor, algorithm,
                    finding_type=spec.type.to_highdicom(), finding_category=spec.category.to_highdicom()))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=spec.label[:64]),
                referenced_segment=_referenced_segment(segmentation, number, source_images),
                finding_type=spec.type.to_highdicom(),
                finding_category=spec.category.to_highdicom(),
                algorithm_id=algorithm,
                measurements=_with_changes([m for m in output.measurements if m.segment == segment.name],
                                           earlier[0] if earlier else [], manifest),
                time_point_context=_time_point(volume, "current") if prior is not None else None,
            ))
            if earlier:
                groups.append(_prior_group(uid, spec, earlier, prior, manifest, algorithm))

    for finding in output.findings:
        spec = manifest.finding(finding.name)
        if finding.value not in spec.values:
            raise ValueError(f"finding {finding.name!r}: value {finding.value!r} is not declared in the manifest")
        if not 0.0 <= finding.probability <= 1.0:
            raise ValueError(f"finding {finding.name!r}: probability {finding.probability} is not in 0..1")
        value = spec.values[finding.value].to_highdicom()
        anchor = _saliency_peak(output.saliency, volume, output.key_slices)
        # with the probability: OHIF shows only the label of a tracked arrow
        label = f"{spec.concept.meaning}: {value.meaning} ({100 * finding.probability:.0f} %){qc_mark}"
        probability = hd.sr.Measurement(name=codes.DCM.Probability, value=round(100.0 * finding.probability, 3),
                                        unit=PERCENT)
        groups.append(_anchored_group(
            common.new_uid(uid_seed, "tracking", "finding", finding.name),
            OHIF_ARROW if anchor.traced else label, label, anchor, [probability], algorithm,
            finding_type=spec.concept.to_highdicom(),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(spec.concept.to_highdicom(), value)],
            source_images=None if anchor.traced else image_references()))

    if image_level_measurements:
        uid = common.new_uid(uid_seed, "tracking", "image-measurements")
        measurements = [_measurement(m, manifest) for m in image_level_measurements]
        (anchor,) = _anchors(output.measurement_region, volume, output.key_slices)
        if anchor.traced:
            label = "Measurement region"
            groups.append(_outline_group(uid, label + qc_mark, anchor, algorithm))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=label),
                referenced_region=anchor.region(), algorithm_id=algorithm, measurements=measurements))
        else:
            label = f"Image measurements{qc_mark}"
            groups.append(_anchored_group(uid, label, label, anchor, measurements, algorithm,
                                          source_images=image_references()))

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(manifest),
        procedure_reported=PROCEDURE_BY_MODALITY.get(volume.modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    evaluations = [*([_prior_statement(prior, output.prior)] if prior is not None else []),
                   *_qc_findings(qc_failures), *_repair_statements(input_repairs)]
    if evaluations:  # TID 1500 row 12: one Qualitative Evaluations container
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(evaluations)
        report[0].ContentSequence.append(container)
    prior_images = (common.sources_in_volume_order(prior.sources, prior.volume)
                    if prior is not None and prior.volume is not None and output.prior is not None else [])
    evidence = [*source_images, *([segmentation] if segmentation is not None else []), *prior_images]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=common.new_uid(uid_seed, "sr", "series"),
        series_number=series_number,
        sop_instance_uid=common.new_uid(uid_seed, "sr", "instance"),
        instance_number=1,
        manufacturer=common.NODE_MANUFACTURER,
        # complete: every measurement is there, flagged or not; unverified: nobody signed it
        is_complete=True,
        is_verified=False,
        series_description=common.series_description(manifest, "SR", qc_failed=bool(qc_failures)),
        manufacturer_model_name=manifest.algorithm_name[:64],
        software_versions=common.node_software_versions(manifest),
    )
    common.add_contributing_equipment(sr, manifest)
    return sr


def _referenced_segment(segmentation: Dataset, number: int, source_images: list[Dataset]):
    # Built by hand: ReferencedSegment.from_segmentation (highdicom 0.28) fails when the SEG keeps
    # SegmentIdentificationSequence in the shared functional groups (a single segment).
    # TID 1411 names the segmented series once ("Source series for segmentation") rather than
    # each of its images: the SEG itself lists every source image, and 400 image references
    # here cost a second of encoding and make the SR much larger.
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID),
    )


def _outline_group(uid: str, label: str, anchor: Anchor, algorithm,
                   **items) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with the Area of the region outlined by ``anchor`` (OHIF tracks it as a
    freehand outline); 0 mm2 on a whole slice for an empty mask (display only)."""
    area = hd.sr.Measurement(name=codes.SCT.Area, value=round(anchor.area_mm2, 3), unit=SQUARE_MM)
    return _anchored_group(uid, OHIF_FREEHAND_ROI if anchor.traced else label, label, anchor, [area], algorithm,
                           **items)


def _anchored_group(uid: str, identifier: str, label: str | None, anchor: Anchor,
                    measurements: list[hd.sr.Measurement], algorithm, **items
                    ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group drawn on ``anchor``: its first measurement is INFERRED FROM it (and has no
    other child); ``label`` is the group's Comment, the label OHIF shows (None: no Comment)."""
    first, *others = measurements
    first = hd.sr.Measurement(name=first.name, value=first.value, unit=first.unit,
                              referenced_coordinates=[anchor.coordinates()])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        algorithm_id=algorithm, measurements=[first, *others], **items)
    if label is not None:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=label, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _anchors(mask: np.ndarray | None, volume: Volume, key_slices: Sequence[int], parts: int = 1) -> list[Anchor]:
    """Outlines of the largest regions of ``mask`` on its key slice (see segment_key_slice), largest
    first: at most ``parts``, each at least MIN_PART of the largest. For an empty or missing mask,
    the whole of the model's first key slice (else the middle one)."""
    index = None if mask is None else segment_key_slice(mask, key_slices)
    if index is None:
        return [_whole_slice(volume, key_slices)]
    regions = regions_by_size(mask[index])[:parts]
    regions = [r for r in regions if r.sum() >= MIN_PART * regions[0].sum()]
    pixel_mm2 = volume.spacing[1] * volume.spacing[2]
    return [Anchor(hd.sr.GraphicTypeValues.POLYLINE, region_outline(region), _source(volume, index),
                   float(region.sum()) * pixel_mm2, traced=True) for region in regions]


def _saliency_peak(saliency: np.ndarray | None, volume: Volume, key_slices: Sequence[int]) -> Anchor:
    """The centre of the pixel where the saliency is highest, on the key slice where most of it
    is above half its maximum; the whole slice without saliency."""
    peak = 0.0 if saliency is None else float(saliency.max())
    index = None if peak <= 0 else segment_key_slice(saliency >= 0.5 * peak, key_slices)
    if index is None:
        return _whole_slice(volume, key_slices)
    row, column = np.unravel_index(int(np.argmax(saliency[index])), saliency.shape[1:])
    return Anchor(hd.sr.GraphicTypeValues.POINT, np.array([[column + 0.5, row + 0.5]]), _source(volume, index),
                  0.0, traced=True)


def _whole_slice(volume: Volume, key_slices: Sequence[int]) -> Anchor:
    """The whole of the model's first key slice, else of the middle slice."""
    index = next((i for i in key_slices if 0 <= i < volume.shape[0]), volume.shape[0] // 2)
    rows, columns = volume.shape[1:]
    whole = np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=float)
    return Anchor(hd.sr.GraphicTypeValues.POLYLINE, whole, _source(volume, index), 0.0, traced=False)


def _source(volume: Volume, index: int) -> hd.sr.SourceImageForRegion:
    frame = volume.source_frames[index]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number is not None else None,
    )


def _qc_findings(qc_failures: Sequence[str]) -> list[hd.sr.TextContentItem]:
    """TID 1500 row 14 (not in highdicom 0.28): one "Quality Finding" TEXT per failed check."""
    return [hd.sr.TextContentItem(name=codes.DCM.QualityFinding, value=f"{common.QC_FAILED}: {reason}",
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for reason in qc_failures]


def _repair_statements(input_repairs: Sequence[str]) -> list[hd.sr.TextContentItem]:
    """One TEXT per repair the fitness check made to the input (at most MAX_REPAIRS_LISTED)."""
    shown = list(input_repairs[:MAX_REPAIRS_LISTED])
    if len(input_repairs) > MAX_REPAIRS_LISTED:
        shown.append(f"and {len(input_repairs) - MAX_REPAIRS_LISTED} more repairs (see the node's job page)")
    return [hd.sr.TextContentItem(name=INPUT_REPAIRED, value=text[:1024],
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for text in shown]


def segment_key_slice(mask: np.ndarray, key_slices: Sequence[int] = ()) -> int | None:
    """The slice to outline a segment on: of the model's key slices that contain the segment,
    the one where it is largest; else the slice where it is largest; None if it is empty."""
    areas = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1).sum(axis=1)
    candidates = [i for i in dict.fromkeys(key_slices) if 0 <= i < len(areas) and areas[i] > 0]
    if not candidates:
        candidates = [int(i) for i in np.flatnonzero(areas)]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (areas[i], -i))


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a 2D mask (the first in raster order on a tie)."""
    return regions_by_size(mask)[0] if np.any(mask) else np.zeros(np.shape(mask), dtype=bool)


def regions_by_size(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a 2D mask, largest first (raster order on a tie)."""
    labels, count = ndi.label(np.asarray(mask, dtype=bool))  # labels are numbered in raster order
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return [labels == int(i) + 1 for i in np.argsort(-sizes, kind="stable")]


# Directions in image coordinates (x = column, y = row, y pointing down), clockwise order.
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)
_CLOCKWISE = [_RIGHT, _DOWN, _LEFT, _UP]


def region_outline(region: np.ndarray, max_points: int = MAX_OUTLINE_POINTS) -> np.ndarray:
    """Closed outer outline of one 4-connected region, as (column, row) image coordinates.

    DICOM image coordinates: (0, 0) is the top left corner of the top left pixel, so every
    vertex is a pixel corner on the region's boundary (between pixels inside and outside).
    The crack-following trace encloses exactly the region's pixels (holes included); straight
    runs are merged and, above ``max_points``, the outline is simplified (Douglas-Peucker, on
    its own vertices). The first point is repeated at the end.
    """
    if not region.any():
        raise ValueError("the region is empty")
    padded = np.pad(region, 1)
    edges: set[tuple[int, int, int, int]] = set()  # (x, y, dx, dy): boundary edge, region on its right
    for r, c in zip(*np.nonzero(region)):
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:
            edges.add((c, r, *_RIGHT))
        if not padded[pr, pc + 1]:
            edges.add((c + 1, r, *_DOWN))
        if not padded[pr + 1, pc]:
            edges.add((c + 1, r + 1, *_LEFT))
        if not padded[pr, pc - 1]:
            edges.add((c, r + 1, *_UP))
    r0, c0 = (int(v[0]) for v in np.nonzero(region))  # raster-first pixel: its top edge is outer
    start = (c0, r0, *_RIGHT)
    points, edge = [], start
    while True:
        x, y, dx, dy = edge
        points.append((x, y))
        nx, ny = x + dx, y + dy
        turn = _CLOCKWISE.index((dx, dy))
        for step in (1, 0, 3):  # right turn first: diagonal neighbours are not connected
            ndx, ndy = _CLOCKWISE[(turn + step) % 4]
            if (nx, ny, ndx, ndy) in edges:
                edge = (nx, ny, ndx, ndy)
                break
        else:  # pragma: no cover - a closed boundary always continues
            raise RuntimeError("outline trace lost the boundary")
        if edge == start:
            break
    corners = [p for i, p in enumerate(points)
               if _direction(points[i - 1], p) != _direction(p, points[(i + 1) % len(points)])]
    outline = np.array(corners, dtype=float)
    if len(outline) > max_points:
        outline = _simplified(outline, max_points)
    return np.vstack([outline, outline[:1]])


def _direction(a, b) -> tuple[int, int]:
    return (int(np.sign(b[0] - a[0])), int(np.sign(b[1] - a[1])))


def _simplified(ring: np.ndarray, max_points: int) -> np.ndarray:
    """Douglas-Peucker on a closed ring, tolerance doubled until at most ``max_points`` remain."""
    far = int(np.argmax(np.linalg.norm(ring - ring[0], axis=1)))  # split the ring at two far points
    halves = [np.vstack([ring[:far + 1]]), np.vstack([ring[far:], ring[:1]])]
    tolerance = 0.5
    while True:
        keep = [_douglas_peucker(half, tolerance) for half in halves]
        ring_out = np.vstack([keep[0][:-1], keep[1][:-1]])
        if len(ring_out) <= max_points:
            return ring_out
        tolerance *= 2


def _douglas_peucker(line: np.ndarray, tolerance: float) -> np.ndarray:
    keep = np.zeros(len(line), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(line) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = line[first], line[last]
        segment = b - a
        length = np.hypot(*segment)
        offsets = line[first + 1:last] - a
        if length == 0:
            distances = np.hypot(offsets[:, 0], offsets[:, 1])
        else:
            distances = np.abs(segment[0] * offsets[:, 1] - segment[1] * offsets[:, 0]) / length
        worst = int(np.argmax(distances))
        if distances[worst] > tolerance:
            split = first + 1 + worst
            keep[split] = True
            stack += [(first, split), (split, last)]
    return line[keep]


def _measurement(measurement: Measurement, manifest: Manifest) -> hd.sr.Measurement:
    # No per-NUM algorithm identification: the group names the algorithm, and OHIF drops a
    # NUM whose children are not a SCOORD.
    spec = manifest.measurement(measurement.name)
    return hd.sr.Measurement(name=spec.concept.to_highdicom(), value=float(measurement.value),
                             unit=spec.unit.to_highdicom())


def _observation_context(manifest: Manifest) -> hd.sr.ObservationContext:
    """The model is the observer (a device), identified the same way in every report."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=common.new_uid("device-observer", manifest.name, manifest.version),
        name=manifest.algorithm_name[:64],
        manufacturer_name=manifest.manufacturer[:64],
        model_name=f"{manifest.algorithm_name} {manifest.algorithm_version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def longitudinal_tracking_uid(patient_id: str, model_name: str, what: str) -> str:
    """A tracking UID that is the same in every report of this patient's ``what`` (e.g. the
    lung segment) by this model, so a viewer links a follow-up's measurement to the prior's:
    2.25 and a name-based UUID (SHA-1 of patient ID, model and finding; no patient data in it
    that could be read back)."""
    return f"2.25.{uuid.uuid5(LONGITUDINAL_NAMESPACE, f'{patient_id}|{model_name}|{what}').int}"


def _prior_of(result: PriorResult | None, prior, segment_name: str):
    """(prior measurements on the segment, prior mask) when the model compared, else None."""
    if result is None or prior is None or prior.volume is None:
        return None
    masks = [s.mask for s in result.segments if s.name == segment_name]
    measured = [m for m in result.measurements if m.segment == segment_name]
    return (measured, masks[0] if masks else None, result.key_slice) if measured else None


def _with_changes(current: list[Measurement], earlier: list[Measurement],
                  manifest: Manifest) -> list[hd.sr.Measurement]:
    """The segment's measurements, each followed by its change since the prior when the prior
    has it (private concept naming the measured quantity: DICOM has no code for "change since
    prior" of each). Side by side because OHIF's SR viewport lists only a group's first lines:
    "Volume", then "Change since prior: Volume"."""
    before = {m.name: m.value for m in earlier}
    items = []
    for m in current:
        items.append(_measurement(m, manifest))
        if m.name not in before:
            continue
        spec = manifest.measurement(m.name)
        concept = hd.sr.CodedConcept(f"CHG-{spec.concept.value}"[:16], PRIVATE_SCHEME,
                                     f"Change since prior: {spec.concept.meaning}"[:64])
        items.append(hd.sr.Measurement(name=concept, value=round(float(m.value) - float(before[m.name]), 6),
                                       unit=spec.unit.to_highdicom()))
    return items


def _time_point(volume: Volume, which: str, study_date: str | None = None) -> hd.sr.TimePointContext:
    # no Time Point Order (optional in TID 1502): OHIF lists it among the measurements, as "2.00 1"
    date = study_date or str(volume.attributes.get("StudyDate") or "")
    return hd.sr.TimePointContext(time_point=f"{which} {date}".strip()[:64])


def _prior_group(uid: str, spec, earlier, prior, manifest: Manifest, algorithm
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The prior's measurements of the segment: same tracking UID and identifier as the current
    group, the first drawn (outline) on the prior's image at the level of the current key slice."""
    measured, mask, key_slice = earlier
    key = [key_slice] if key_slice is not None else []
    (anchor,) = _anchors(mask, prior.volume, key) if mask is not None else [_whole_slice(prior.volume, [])]
    # No label (Comment): OHIF merges the groups of one tracking UID and would show "Lungs
    # (prior DATE)" above this study's values; the Time Point Context says which study it is.
    group = _anchored_group(uid, spec.label[:64], None, anchor, [_measurement(m, manifest) for m in measured],
                            algorithm, finding_type=spec.type.to_highdicom(),
                            finding_category=spec.category.to_highdicom(),
                            time_point_context=_time_point(prior.volume, "prior", prior.study_date))
    return group


def _prior_statement(prior, result: PriorResult | None) -> hd.sr.TextContentItem:
    """For TID 1500 Qualitative Evaluations: whether the report compares with a prior, and which."""
    if prior.volume is not None and result is not None:
        text = (f"compared with prior study {prior.study_instance_uid} ({prior.study_date or 'date unknown'}), "
                f"series {prior.series_instance_uid}")
    elif prior.volume is not None:
        text = "ran without prior: the model does not compare studies"
    else:
        text = prior.note or "ran without prior"
    return hd.sr.TextContentItem(name=COMPARED_WITH_PRIOR, value=text[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
