"""Model output -> DICOM result objects, one encoder per kind (see dicom_ai_node/results)."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from dicom_ai_node.imaging.volume import Volume
from dicom_ai_node.results import common
from dicom_ai_node.results.key_images import build_key_images
from dicom_ai_node.results.seg import build_segmentation
from dicom_ai_node.results.sr import build_measurement_report, longitudinal_tracking_uid
from model_zoo.base import ModelOutput
from model_zoo.manifest import Manifest

# Result series numbers: high, so results sort after the acquired series in a viewer.
SERIES_NUMBER = {"seg": 9001, "sr": 9002, "key_image": 9003, "derived": 9004}


def derivation_description(manifest: Manifest) -> str:
    """What was done to make a derived series: [model.options] derivation_description, else the
    model's description, naming the algorithm either way (DerivationDescription, ST)."""
    text = str(manifest.extra.get("derivation_description") or "").strip()
    if not text:
        text = f"Processed by {manifest.algorithm_name} {manifest.algorithm_version}"
        if manifest.description:
            text += f": {manifest.description}"
    return text[:1024]


def encode_results(sources: list[Dataset], volume: Volume, output: ModelOutput,
                   manifest: Manifest, uid_seed: str,
                   qc_failures: Sequence[str] = (), prior=None,
                   input_repairs: Sequence[str] = ()) -> list[tuple[str, Dataset]]:
    """All result objects of one job as (kind, dataset); UIDs derive from ``uid_seed``, so
    encoding the same job again (after a crash) gives the same objects.

    ``qc_failures``: the quality checks this result failed, one sentence each, when it is sent
    flagged (rule policy ``qc_fail = "send_flagged"``); the SR and the key images then say so,
    and every series description starts with "QC FAILED".

    ``prior``: the job's PriorInput (priors/inputs.py) when its rule asks for priors: segments
    then carry tracking UIDs that stay the same across the patient's studies, and the SR and key
    images show the prior (or say why there is none).

    ``input_repairs``: what the fitness check repaired in the source before inference
    (jobs/fitness.py), one sentence each: the SR lists them, the key images mention them."""
    results: list[tuple[str, Dataset]] = []
    tracking_uids = None
    if prior is not None:
        patient_id = str(sources[0].get("PatientID", "") or "")
        tracking_uids = {s.name: longitudinal_tracking_uid(patient_id, manifest.name, s.name) for s in output.segments}
    segmentation = None
    if output.segments:
        segmentation = build_segmentation(sources, volume, output, manifest, uid_seed,
                                          SERIES_NUMBER["seg"], tracking_uids=tracking_uids)
        results.append(("seg", segmentation))
    if output.derived_pixels is not None:
        from dicom_ai_node.results.derived import build_derived_series

        for image in build_derived_series(sources, volume, output, manifest, uid_seed,
                                          SERIES_NUMBER["derived"],
                                          derivation_description=derivation_description(manifest)):
            results.append(("derived", image))
    if output.segments or output.measurements or output.findings:
        report = build_measurement_report(sources, volume, output, manifest, uid_seed,
                                          SERIES_NUMBER["sr"], segmentation=segmentation,
                                          qc_failures=qc_failures, tracking_uids=tracking_uids, prior=prior,
                                          input_repairs=input_repairs)
        results.append(("sr", report))
    if output.segments or output.saliency is not None:
        for image in build_key_images(sources, volume, output, manifest, uid_seed,
                                      SERIES_NUMBER["key_image"], qc_failures=qc_failures, prior=prior):
            if input_repairs:
                image.ImageComments = (f"{image.ImageComments}; input repaired before processing "
                                       f"({len(input_repairs)} repairs, listed in the SR)")[:10240]
            results.append(("key_image", image))
    if qc_failures:  # the SEG and derived encoders do not know about QC: flag where viewers list series
        for kind, dataset in results:
            if kind in ("seg", "derived"):
                dataset.SeriesDescription = f"{common.QC_FAILED} {dataset.SeriesDescription}"[:64]
    return results
