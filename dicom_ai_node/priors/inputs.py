"""What a job gets from its prior fetch: the prior's volume and headers, or why there is none."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from sqlalchemy import exists, select

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import PRIOR_FETCH_FINISHED, Instance, PriorFetch
from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.imaging.volume import Volume, VolumeError
from dicom_ai_node.storage import Storage
from model_zoo.registry import check_input

log = logging.getLogger(__name__)


@dataclass
class PriorInput:
    """The prior of a job; ``volume`` None means the job runs without it, ``note`` says why."""

    volume: Volume | None = None
    sources: list[Dataset] = field(default_factory=list)  # headers of the prior's instances
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_date: str | None = None
    note: str | None = None  # "ran without prior: <reason>"


def waiting_for_prior(job_id_column):
    """SQL: the job has a prior fetch that has not ended (it is not claimed until it has)."""
    return exists().where(PriorFetch.job_id == job_id_column, PriorFetch.state.not_in(PRIOR_FETCH_FINISHED))


def load_prior(database: Database, storage: Storage, job_id: int, manifest) -> PriorInput | None:
    """None when the job's rule asks for no prior."""
    with database.session() as session:
        fetch = session.scalar(select(PriorFetch).where(PriorFetch.job_id == job_id))
        if fetch is None:
            return None
        if fetch.state != "done":
            return PriorInput(note=f"ran without prior: {fetch.reason or fetch.state}")
        paths = [storage.absolute(path) for path in session.scalars(
            select(Instance.path).where(Instance.series_instance_uid == fetch.prior_series_instance_uid))]
        found = PriorInput(study_instance_uid=fetch.prior_study_instance_uid,
                           series_instance_uid=fetch.prior_series_instance_uid, study_date=fetch.prior_study_date)
    if not paths:
        found.note = "ran without prior: its instances are no longer on the node"
        return found
    try:
        headers = [read_header(path) for path in paths]
        volume = load_series(paths, headers)
    except (VolumeError, OSError) as error:
        found.note = f"ran without prior: the prior series cannot be used as a volume: {error}"
        return found
    reasons = check_input(manifest, volume.attributes, volume.shape[0], volume.spacing)
    if reasons:
        found.note = "ran without prior: the prior series does not fit the model: " + "; ".join(reasons)
        return found
    found.volume, found.sources = volume, headers
    return found
