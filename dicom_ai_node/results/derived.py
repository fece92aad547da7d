"""A derived image series (e.g. a denoised CT) on exactly the source frames' geometry.

Plain pydicom: each source header is copied (patient, study, frame of reference, image plane,
CT image modules) and given new UIDs, derivation references and re-encoded pixels. Only
single-frame sources are supported; an enhanced multi-frame source would need an enhanced
derived object.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from model_zoo.base import ModelOutput
from model_zoo.manifest import Manifest

# Source attributes that describe the source's own pixels, instance or private data.
_DROPPED = ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
            "PixelPaddingRangeLimit", "ReferencedImageSequence", "SourceImageSequence",
            "DerivationCodeSequence", "IconImageSequence", "LossyImageCompression",
            "LossyImageCompressionRatio", "LossyImageCompressionMethod", "RequestAttributesSequence")


def build_derived_series(
    sources: Sequence[Dataset],
    volume: Volume,
    output: ModelOutput,
    manifest: Manifest,
    uid_seed: str,
    series_number: int,
    derivation_description: str = "",
) -> list[Dataset]:
    """One new instance per source image, in volume order, holding ``output.derived_pixels``.

    ``sources`` may be headers without pixel data. Pixels are stored with each source's
    RescaleSlope/Intercept, rounded and clipped to the source's stored range (BitsStored,
    PixelRepresentation).
    """
    if output.derived_pixels is None:
        raise ValueError("the model output has no derived_pixels")
    if output.derived_pixels.shape != volume.shape:
        raise ValueError(f"derived_pixels has shape {output.derived_pixels.shape}, the volume {volume.shape}")
    if any(frame.frame_number is not None for frame in volume.source_frames):
        raise ValueError("derived series from multi-frame sources are not supported")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    series_uid = common.new_uid(uid_seed, "derived", "series")
    description = derivation_description or f"Processed by {manifest.algorithm_name} {manifest.algorithm_version}"

    results = []
    for index, frame in enumerate(volume.source_frames):
        source = by_uid[frame.sop_instance_uid]
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for keyword in (*_DROPPED, "PixelData"):
            if keyword in ds:
                del ds[keyword]
        ds.SOPInstanceUID = common.new_uid(uid_seed, "derived", frame.sop_instance_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = common.series_description(manifest, "derived")
        ds.ImageType = ["DERIVED", "SECONDARY", *list(source.get("ImageType", ["", "", "AXIAL"]))[2:3]]
        ds.DerivationDescription = description[:1024]
        ds.SourceImageSequence = [_reference(source)]
        ds.BurnedInAnnotation = "NO"
        # The source's equipment stays (the scanner acquired it); the node and model are added.
        ds.ContributingEquipmentSequence = [*source.get("ContributingEquipmentSequence", []),
                                            common.processing_algorithm_equipment(manifest)]
        ds.add_new("PixelData", "OW", _encode(output.derived_pixels[index], ds).tobytes())
        ds.file_meta = _file_meta(ds)
        results.append(ds)
    return results


def _encode(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Real-world values -> stored values with the dataset's rescale, inside its stored range."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    bits = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    stored = np.clip(np.round((values.astype(np.float64) - intercept) / slope), low, high)
    return stored.astype(np.int16 if signed else np.uint16)


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()  # DCM 121322 "Source image for image processing operation"
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
