"""Files on disk: where an instance or a result lives, and how it is written durably.

Paths are built only from UIDs that passed ``check_uid`` (digits and dots, at most 64
characters), so a hostile UID such as "../../etc" can never pick a path.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class StorageError(OSError):
    """An instance could not be stored; the message says why (sent to the log and the sender)."""


class DiskFullError(StorageError):
    pass


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def check_uid(value: object, name: str) -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise ValueError(f"{name} {shown} is not a valid UID (digits and dots, at most 64 characters)")
    return value  # type: ignore[return-value]


class Storage:
    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of a received instance, relative to the root."""
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def result_path(self, job_id: int, sop_uid: str) -> str:
        check_uid(sop_uid, "SOPInstanceUID")
        return f"results/job-{int(job_id)}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise DiskFullError(f"not enough disk space in {self.root}: {free // 2**20} MiB free, "
                                f"{self.min_free_bytes // 2**20} MiB must stay free")

    def write_atomic(self, relative: str, chunks: list[bytes] | bytes) -> int:
        """Write to a temporary file, fsync, rename into place, fsync the folder.

        Readers never see a half-written file, and a file that exists survived the write.
        Returns the number of bytes written.
        """
        data = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks
        size = sum(len(chunk) for chunk in data)
        self.check_free_space(size)
        target = self.absolute(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        # unique per thread and target, so concurrent writers never share a temporary file
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                for chunk in data:
                    handle.write(chunk)
                handle.flush()
                os.fdatasync(handle.fileno())  # data and size; the rename is made durable below
            os.replace(temporary, target)
        except OSError as error:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            if error.errno == 28:  # ENOSPC
                raise DiskFullError(f"disk full while writing {relative}") from error
            raise StorageError(f"cannot write {relative}: {error.strerror or error}") from error
        _fsync_folder(target.parent)
        return size


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
