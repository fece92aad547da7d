"""The rejection note that takes delivered results back (IHE IOCM): a Key Object Selection
Document titled (113001, DCM, "Rejected for Quality Reasons") from CID 7011.

IOCM asks of a rejection note: the same patient and study as the rejected instances, its own
series, every rejected instance referenced in the content and in the Current Requested
Procedure Evidence Sequence (what an Image Manager reads to hide or delete them). The admin's
reason goes into the Key Object Description (TID 2010, TEXT), without patient data.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_ai_node.results import common

REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
SERIES_NUMBER = 9005  # after the result series (encode.SERIES_NUMBER)
MAX_REASON = 1024  # the description is a TEXT content item; kept short for viewers


def build_rejection_kos(retracted: Sequence[Dataset], reason: str, uid_seed: str) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS referencing every dataset of ``retracted`` (all of one study), UIDs from ``uid_seed``.

    ``retracted`` are the result objects as written (headers suffice: no pixel data is read)."""
    if not retracted:
        raise ValueError("a rejection note needs at least one instance to reject")
    studies = {str(ds.StudyInstanceUID) for ds in retracted}
    if len(studies) != 1:
        raise ValueError(f"a rejection note covers one study; got {len(studies)}")
    reason = reason.strip()
    if not reason:
        raise ValueError("a rejection note needs a reason")
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=list(retracted),
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=common.new_uid(uid_seed, "kos", "device"), name=common.NODE_MANUFACTURER,
                manufacturer_name=common.NODE_MANUFACTURER)),
        description=reason[:MAX_REASON],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(retracted),
        content=content,
        series_instance_uid=common.new_uid(uid_seed, "kos", "series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=common.new_uid(uid_seed, "kos", "instance"),
        instance_number=1,
        manufacturer=common.NODE_MANUFACTURER,
    )
    kos.SeriesDescription = "AI: results rejected for quality reasons"
    return kos
