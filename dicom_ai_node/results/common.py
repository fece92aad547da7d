"""What every result object shares: deterministic UIDs, the algorithm's identity, equipment.

Every UID a result carries derives from the job's ``uid_seed``, so re-encoding the same job
(e.g. after a crash) yields the same UIDs and the PACS replaces instead of duplicating; only a
retraction (jobs/retraction.py) moves the seed on.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom._standard_utils import get_anatomic_region_map  # (code, paired) per BodyPartExamined
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_ai_node import __version__
from dicom_ai_node.imaging.volume import Volume
from model_zoo.manifest import Manifest

NODE_MANUFACTURER = "dicom-ai-node"
NODE_VERSION = __version__
PROCESSING_ALGORITHM = ("1630", "99IHE", "Processing Algorithm")  # IHE AIR purpose of reference
DISCLAIMER = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
QC_FAILED = "QC FAILED"  # marks a result sent although it failed its model's quality checks


def job_uid_seed(job_id: int, input_fingerprint: str, model_name: str, model_version: str,
                 retractions: int = 0) -> str:
    """The seed of every UID a job's results carry. A run after its results were retracted
    (``retractions`` > 0) gets new UIDs: the PACS rejected the old ones for good (IHE IOCM)."""
    seed = f"dicom-ai-node job {job_id} {input_fingerprint} {model_name} {model_version}"
    return f"{seed} after retraction {retractions}" if retractions else seed


def new_uid(uid_seed: str, *parts: object) -> str:
    """A UID that depends only on the seed and ``parts`` (e.g. ("seg", "series"))."""
    return generate_uid(entropy_srcs=[uid_seed, *(str(part) for part in parts)])


def series_description(manifest: Manifest, kind: str, qc_failed: bool = False) -> str:
    """e.g. "AI: Lung CT segmentation 1.0.0 SEG", cut to the 64 characters of LO; a result that
    failed its quality checks starts with "QC FAILED" (viewers show only the start)."""
    text = f"AI: {manifest.algorithm_name} {manifest.algorithm_version} {kind}"
    return (f"{QC_FAILED} {text}" if qc_failed else text)[:64]


def algorithm_identification(manifest: Manifest) -> hd.AlgorithmIdentificationSequence:
    """For SEG segment descriptions (Segment Algorithm Identification)."""
    return hd.AlgorithmIdentificationSequence(
        name=manifest.algorithm_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=manifest.algorithm_version[:64],
        source=manifest.manufacturer[:64],
    )


def algorithm_sr(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification, for SR measurements and groups."""
    return hd.sr.AlgorithmIdentification(
        name=manifest.algorithm_name[:64],
        version=manifest.algorithm_version[:64],
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=manifest.manufacturer[:64],
    )


def processing_algorithm_equipment(manifest: Manifest) -> Dataset:
    """A ContributingEquipmentSequence item naming the model (IHE AIR, 99IHE 1630).

    Plain pydicom because highdicom.ContributingEquipment accepts only DCM purposes.
    """
    code_value, scheme, meaning = PROCESSING_ALGORITHM
    purpose = Dataset()
    purpose.CodeValue = code_value
    purpose.CodingSchemeDesignator = scheme
    purpose.CodeMeaning = meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = manifest.manufacturer[:64]
    item.ManufacturerModelName = manifest.algorithm_name[:64]
    item.SoftwareVersions = manifest.algorithm_version[:64]
    item.ContributionDescription = f"{manifest.name} {manifest.version} ({NODE_MANUFACTURER} {NODE_VERSION})"[:1024]
    return item


def add_contributing_equipment(result: Dataset, manifest: Manifest) -> None:
    """Append the algorithm item, keeping what highdicom (or the caller) already listed."""
    items = list(result.get("ContributingEquipmentSequence", []))
    result.ContributingEquipmentSequence = [*items, processing_algorithm_equipment(manifest)]


def node_software_versions(manifest: Manifest) -> list[str]:
    """SoftwareVersions of a result object: the node's version, then the model's."""
    return [NODE_VERSION, manifest.algorithm_version[:64]]


def copy_clinical_context(result: Dataset, source: Dataset) -> None:
    """Laterality and BodyPartExamined from the source, where present (dciodvfy wants them)."""
    for keyword in ("Laterality", "BodyPartExamined"):
        value = source.get(keyword)
        if value:
            setattr(result, keyword, value)


def add_unknown_laterality(image: Dataset) -> None:
    """General Series Laterality is Type 2C in an image that is not a SEG: required when the body
    part is a paired structure (a lung, a kidney; highdicom's table of the standard's body parts
    says which), or when nobody knows (no body part). Sent empty ("unknown") then; left out for
    an unpaired body part, where an empty one is an error."""
    if "Laterality" in image:
        return
    body_part = str(image.get("BodyPartExamined", "") or "").strip().upper()
    known = get_anatomic_region_map().get(body_part)
    if not body_part or (known is not None and known[1]):
        image.Laterality = None


def sources_in_volume_order(sources: Sequence[Dataset], volume: Volume) -> list[Dataset]:
    """One dataset per distinct source instance, in the order the volume first uses them."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    ordered: dict[str, Dataset] = {}
    for frame in volume.source_frames:
        if frame.sop_instance_uid not in by_uid:
            raise ValueError(f"source instance {frame.sop_instance_uid} of the volume was not passed in sources")
        ordered.setdefault(frame.sop_instance_uid, by_uid[frame.sop_instance_uid])
    return list(ordered.values())
