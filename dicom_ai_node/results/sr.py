"""TID 1500 Measurement Report (Comprehensive 3D SR) for a model's measurements and findings.

Layout (one group = one TID 1410/1411/1501 "Measurement Group"):
- one volumetric ROI group per SEG segment: references the segment, holds the measurements
  the model took on it;
- one image-level group per qualitative finding: the coded value plus its probability (%);
- one image-level group for measurements not tied to a segment (or when there is no SEG).
Image-level groups reference the source images. The report is UNVERIFIED and goes into the
source study.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from dicom_ai_node.results.seg import tracking_uid
from model_zoo.base import Measurement, ModelOutput
from model_zoo.manifest import Manifest

PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
PROCEDURE_BY_MODALITY = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}


def build_measurement_report(
    sources: Sequence[Dataset],
    volume: Volume,
    output: ModelOutput,
    manifest: Manifest,
    uid_seed: str,
    series_number: int,
    segmentation: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one job. Pass the SEG built for the same job as ``segmentation``, if any.

    ``sources`` may be headers without pixel data. Segment numbers in ``segmentation`` are
    those :func:`~dicom_ai_node.results.seg.build_segmentation` gave (order of output.segments).
    """
    source_images = common.sources_in_volume_order(sources, volume)
    algorithm = common.algorithm_sr(manifest)
    groups: list = []
    image_level_measurements = [m for m in output.measurements if m.segment is None or segmentation is None]

    if segmentation is not None:
        for number, segment in enumerate(output.segments, start=1):
            spec = manifest.segment(segment.name)
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(uid_seed, segment.name), identifier=spec.label[:64]),
                referenced_segment=_referenced_segment(segmentation, number, source_images),
                finding_type=spec.type.to_highdicom(),
                finding_category=spec.category.to_highdicom(),
                algorithm_id=algorithm,
                measurements=[_measurement(m, manifest, algorithm)
                              for m in output.measurements if m.segment == segment.name],
            ))

    image_references = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in source_images]
    for finding in output.findings:
        spec = manifest.finding(finding.name)
        if finding.value not in spec.values:
            raise ValueError(f"finding {finding.name!r}: value {finding.value!r} is not declared in the manifest")
        if not 0.0 <= finding.probability <= 1.0:
            raise ValueError(f"finding {finding.name!r}: probability {finding.probability} is not in 0..1")
        probability = hd.sr.Measurement(
            name=codes.DCM.Probability, value=round(100.0 * finding.probability, 3), unit=PERCENT,
            algorithm_id=algorithm)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=common.new_uid(uid_seed, "tracking", "finding", finding.name), identifier=finding.name[:64]),
            finding_type=spec.concept.to_highdicom(),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                spec.concept.to_highdicom(), spec.values[finding.value].to_highdicom())],
            measurements=[probability],
            source_images=image_references,
        ))

    if image_level_measurements:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=common.new_uid(uid_seed, "tracking", "image-measurements"),
                identifier=f"{manifest.algorithm_name} measurements"[:64]),
            algorithm_id=algorithm,
            measurements=[_measurement(m, manifest, algorithm) for m in image_level_measurements],
            source_images=image_references,
        ))

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(manifest),
        procedure_reported=PROCEDURE_BY_MODALITY.get(volume.modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    evidence = [*source_images, *([segmentation] if segmentation is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=common.new_uid(uid_seed, "sr", "series"),
        series_number=series_number,
        sop_instance_uid=common.new_uid(uid_seed, "sr", "instance"),
        instance_number=1,
        manufacturer=common.NODE_MANUFACTURER,
        is_complete=True,
        is_verified=False,
        series_description=common.series_description(manifest, "SR"),
        manufacturer_model_name=manifest.algorithm_name[:64],
        software_versions=common.node_software_versions(manifest),
    )
    common.add_contributing_equipment(sr, manifest)
    return sr


def _referenced_segment(segmentation: Dataset, number: int, source_images: list[Dataset]):
    # Built by hand: ReferencedSegment.from_segmentation (highdicom 0.28) fails when the SEG keeps
    # SegmentIdentificationSequence in the shared functional groups (a single segment).
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=number,
        source_images=[hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID)
                       for ds in source_images],
    )


def _measurement(measurement: Measurement, manifest: Manifest, algorithm) -> hd.sr.Measurement:
    spec = manifest.measurement(measurement.name)
    return hd.sr.Measurement(
        name=spec.concept.to_highdicom(),
        value=float(measurement.value),
        unit=spec.unit.to_highdicom(),
        algorithm_id=algorithm,
    )


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
