"""A synthetic series (tests/synthetic.py) as the node leaves it: its files in storage with
their study, series and instance rows (as the receiver writes them), and a queued job for it
(as the router makes one)."""

from __future__ import annotations

import shutil

from pydicom import dcmread

from dicom_ai_node.db.models import Instance, Job, Series, Study
from dicom_ai_node.router import input_fingerprint
from dicom_ai_node.storage import Storage

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def store_series(session, storage: Storage, series) -> None:
    session.add(Study(study_instance_uid=series.study_instance_uid, state="complete"))
    session.add(Series(series_instance_uid=series.series_instance_uid,
                       study_instance_uid=series.study_instance_uid, modality="CT"))
    session.flush()
    for path in series.paths:
        sop_uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        relative = storage.instance_path(series.study_instance_uid, series.series_instance_uid, sop_uid)
        storage.absolute(relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, storage.absolute(relative))
        session.add(Instance(sop_instance_uid=sop_uid, series_instance_uid=series.series_instance_uid,
                             sop_class_uid=CT_IMAGE_STORAGE, transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
                             path=relative, size_bytes=1))


def queue_job(session, series, model_name: str, rule_name: str, **fields) -> int:
    """A queued job on all of the series' instances; ``fields``: destinations, qc_policy, ..."""
    job = Job(study_instance_uid=series.study_instance_uid, series_instance_uid=series.series_instance_uid,
              model_name=model_name, rule_name=rule_name,
              input_fingerprint=input_fingerprint(series.sop_instance_uids), input_count=len(series.paths), **fields)
    session.add(job)
    session.flush()
    return job.id
