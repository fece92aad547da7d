"""DICOM SEG (binary) from a model's segment masks, on exactly the source frames' geometry."""

from __future__ import annotations

import copy
import socket
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from model_zoo.base import ModelOutput
from model_zoo.manifest import Manifest


def tracking_uid(uid_seed: str, segment_name: str, tracking_uids: dict[str, str] | None = None) -> str:
    """The UID that tracks one segment across SEG and SR of the same job; ``tracking_uids``
    (segment name -> UID) overrides it, e.g. with one that stays the same across a patient's
    studies (results/sr.py longitudinal_tracking_uid)."""
    return (tracking_uids or {}).get(segment_name) or common.new_uid(uid_seed, "tracking", segment_name)


def build_segmentation(
    sources: Sequence[Dataset],
    volume: Volume,
    output: ModelOutput,
    manifest: Manifest,
    uid_seed: str,
    series_number: int,
    tracking_uids: dict[str, str] | None = None,
) -> hd.seg.Segmentation:
    """One BINARY segment per ``output.segments`` entry, coded from the manifest.

    ``sources`` are the source instances (headers without pixel data are enough): any number of
    single-frame images, or one multi-frame image. Frames are matched to ``volume`` slices via
    ``volume.source_frames``, so the stored mask equals the model's mask voxel for voxel.
    Empty frames are kept (OHIF needs one frame per source image).
    """
    if not output.segments:
        raise ValueError("the model output has no segments to encode")
    source_images = [_with_shared_geometry(ds) for ds in common.sources_in_volume_order(sources, volume)]
    masks = np.stack([_checked_mask(segment.mask, volume, segment.name) for segment in output.segments], axis=-1)
    pixel_array = _in_source_frame_order(masks, volume, source_images)

    descriptions = []
    for number, segment in enumerate(output.segments, start=1):
        spec = manifest.segment(segment.name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label[:64],
            segmented_property_category=spec.category.to_highdicom(),
            segmented_property_type=spec.type.to_highdicom(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=common.algorithm_identification(manifest),
            tracking_uid=tracking_uid(uid_seed, segment.name, tracking_uids),
            tracking_id=spec.label[:64],
            display_color=hd.color.CIELabColor.from_rgb(*spec.color),
        ))

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=common.new_uid(uid_seed, "seg", "series"),
        series_number=series_number,
        sop_instance_uid=common.new_uid(uid_seed, "seg", "instance"),
        instance_number=1,
        manufacturer=common.NODE_MANUFACTURER,
        manufacturer_model_name=manifest.algorithm_name[:64],
        software_versions=common.node_software_versions(manifest),
        device_serial_number=socket.gethostname()[:64] or "unknown",
        content_label="AI_SEG",
        content_description=f"{manifest.algorithm_name} segmentation"[:64],
        series_description=common.series_description(manifest, "SEG"),
        omit_empty_frames=False,
    )
    common.copy_clinical_context(seg, source_images[0])
    common.add_contributing_equipment(seg, manifest)
    return seg


def _checked_mask(mask: np.ndarray, volume: Volume, name: str) -> np.ndarray:
    if mask.shape != volume.shape:
        raise ValueError(f"mask of segment {name!r} has shape {mask.shape}, the volume {volume.shape}")
    return np.asarray(mask, dtype=bool)  # no copy when it is boolean already


def _in_source_frame_order(masks: np.ndarray, volume: Volume, source_images: list[Dataset]) -> np.ndarray:
    """Frames in the order highdicom pairs them with the sources.

    Single-frame sources: one frame per source image, in the order of ``source_images``
    (volume order). One multi-frame source: frame i of the array is source frame i + 1.
    """
    if len(source_images) == len(volume.source_frames):
        return masks
    if len(source_images) == 1:
        frame_count = int(source_images[0].get("NumberOfFrames", 1))
        numbers = [frame.frame_number for frame in volume.source_frames]
        if sorted(numbers) != list(range(1, frame_count + 1)):
            raise ValueError("the volume does not use every frame of its multi-frame source exactly once")
        ordered = np.zeros((frame_count, *masks.shape[1:]), dtype=masks.dtype)
        ordered[np.array(numbers) - 1] = masks
        return ordered
    raise ValueError("a SEG can reference single-frame images or one multi-frame image, not several multi-frame files")



def _with_shared_geometry(source: Dataset) -> Dataset:
    """A multi-frame header whose shared functional groups hold PixelMeasures/PlaneOrientation.

    highdicom 0.28 reads them only from the shared groups; some vendors (e.g. Siemens XA)
    put them per frame. The loader has checked they are the same for every frame.
    """
    if "PerFrameFunctionalGroupsSequence" not in source:
        return source
    shared = source.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in source else Dataset()
    first = source.PerFrameFunctionalGroupsSequence[0]
    missing = [k for k in ("PixelMeasuresSequence", "PlaneOrientationSequence") if k not in shared and k in first]
    if not missing:
        return source
    source = copy.deepcopy(source)
    if "SharedFunctionalGroupsSequence" not in source:
        source.SharedFunctionalGroupsSequence = [Dataset()]
    for keyword in missing:
        setattr(source.SharedFunctionalGroupsSequence[0], keyword, copy.deepcopy(first[keyword].value))
    return source
