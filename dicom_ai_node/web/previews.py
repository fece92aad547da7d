"""Key images for the browser: a stored Secondary Capture result rendered as PNG.

The file is found from its database row only, and only when the stored path is the one
``Storage.result_path`` builds from the row's job and SOP Instance UID (which checks the UID):
a request names a row id, never a path, and a row with an odd path is refused, not followed.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from pydicom import dcmread

from dicom_ai_node.db.models import ResultObject
from dicom_ai_node.storage import Storage

KEY_IMAGE = "key_image"


class NoPreview(LookupError):
    """The result is not a key image this node wrote, or its file is gone; the message says which."""


def key_image_path(storage: Storage, result: ResultObject) -> Path:
    if result.kind != KEY_IMAGE:
        raise NoPreview(f"result {result.id} is a {result.kind}, not a key image")
    try:
        expected = storage.result_path(result.job_id, result.sop_instance_uid)
    except ValueError as error:
        raise NoPreview(f"result {result.id}: {error}") from None
    if result.path != expected:
        raise NoPreview(f"result {result.id} is not stored where the node keeps its results")
    path = storage.absolute(expected)
    if not path.is_file():
        raise NoPreview(f"the file of result {result.id} is gone")
    return path


def key_image_png(path: Path) -> bytes:
    """The node's key images are 8-bit RGB (results/key_images.py): the pixels as they are."""
    dataset = dcmread(path)
    if dataset.get("PhotometricInterpretation") != "RGB" or dataset.get("BitsAllocated") != 8:
        raise NoPreview(f"{path.name} is not an 8-bit RGB image")
    buffer = io.BytesIO()
    Image.fromarray(dataset.pixel_array).save(buffer, "PNG")  # (rows, columns, 3) uint8: RGB
    return buffer.getvalue()
