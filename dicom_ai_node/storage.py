"""Files on disk: where an instance or a result lives, and how it is written durably.

A path names a file by its UIDs only when they are digits and dots (at most 64 characters);
any other identifier a sender uses as a UID (a hexadecimal hash some anonymisers write, a UID
with a letter, even "../../etc") is stored all the same, as a PACS would, under the SHA-256 of
it ("h-..."), so no UID can ever pick a path. Such identifiers, and UIDs that break the
standard's other rules ("1.2.03"), are stored (``is_storable_uid``) but results cannot
reference them (``is_valid_uid``, checked before inference).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path

SPARE_INCOMING_FILES = 4

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1
_UID_SHAPED = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # names a file as it is: digits and dots only
_IDENTIFIER = re.compile(r"^[\x21-\x5b\x5d-\x7e]{1,64}$")  # printable ASCII, no space or backslash
INCOMING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")  # never "." or ".."


class StorageError(OSError):
    """An instance could not be stored; the message says why (sent to the log and the sender)."""


class DiskFullError(StorageError):
    pass


def is_valid_uid(value: object) -> bool:
    """A UID as the standard defines it (what a result may reference)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def is_storable_uid(value: object) -> bool:
    """An identifier the node can store an instance under: 1 to 64 printable ASCII characters
    without spaces or backslashes (a UID, or what a sloppy sender uses as one)."""
    return isinstance(value, str) and bool(_IDENTIFIER.match(value))


def check_uid(value: object, name: str) -> str:
    if not is_storable_uid(value):
        shown = repr(value)[:80]
        raise ValueError(f"{name} {shown} is not a valid UID (1 to 64 printable characters, no spaces)")
    return value  # type: ignore[return-value]


def path_component(uid: str) -> str:
    """The UID itself when it is digits and dots, else "h-" and the SHA-256 of it (40 hex
    digits): never a name the sender chose."""
    if _UID_SHAPED.match(uid):
        return uid
    return "h-" + hashlib.sha256(uid.encode("ascii")).hexdigest()[:40]


class Storage:
    def __init__(self, root: Path, min_free_bytes: int = 0, incoming_name: str | None = None):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)
        # instances being received, on the same file system; with storage shared by several
        # receiving processes each has its own folder (incoming_name), which it alone clears
        self.incoming = self.root / "incoming"
        if incoming_name is not None:
            if not INCOMING_NAME.fullmatch(incoming_name):
                raise ValueError(f"incoming folder name {incoming_name!r}: only letters, digits, '.', '_', '-'")
            self.incoming = self.incoming / incoming_name
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._incoming_counter = itertools.count()
        self._spares: queue.Queue | None = None  # created ahead by open_incoming's thread
        self._spares_lock = threading.Lock()

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of a received instance, relative to the root."""
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return f"instances/{path_component(study_uid)}/{path_component(series_uid)}/{path_component(sop_uid)}.dcm"

    def study_folder(self, study_uid: str) -> str:
        """The folder of a study's received instances, relative to the root."""
        check_uid(study_uid, "StudyInstanceUID")
        return f"instances/{path_component(study_uid)}"

    def result_path(self, job_id: int, sop_uid: str) -> str:
        check_uid(sop_uid, "SOPInstanceUID")
        return f"results/job-{int(job_id)}/{path_component(sop_uid)}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise DiskFullError(f"not enough disk space in {self.root}: {free // 2**20} MiB free, "
                                f"{self.min_free_bytes // 2**20} MiB must stay free")

    def clear_incoming(self) -> int:
        """Delete half-received instances left by a crash (never acknowledged to any sender).
        Call before any receiver starts. Returns how many were removed; the node's own empty
        spare files (see open_incoming) are removed too but not counted: a received instance
        has at least its file meta header."""
        removed = 0
        for leftover in self.incoming.glob("*.tmp"):
            try:
                received = leftover.stat().st_size > 0
                leftover.unlink()
            except FileNotFoundError:
                continue
            removed += received
        return removed

    def open_incoming(self) -> tuple[int, Path]:
        """A new, empty temporary file for an instance being received: (descriptor, path).

        Creating a file waits on the file system's journal (0.2-0.5 ms on this kind of
        machine), so a background thread keeps a few created ahead of the receivers."""
        with self._spares_lock:
            if self._spares is None:
                self._spares = queue.Queue(maxsize=SPARE_INCOMING_FILES)
                threading.Thread(target=self._make_spares, name="spare-files", daemon=True).start()
        try:
            return self._spares.get_nowait()
        except queue.Empty:
            return self._create_incoming()

    def _create_incoming(self) -> tuple[int, Path]:
        path = self.incoming / f"{os.getpid()}-{next(self._incoming_counter)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), path
        except OSError as error:
            raise storage_error(error, "a temporary file") from error

    def _make_spares(self) -> None:
        while True:
            try:
                spare = self._create_incoming()
            except StorageError:
                time.sleep(1.0)  # e.g. the disk is full; the receivers report it themselves
                continue
            self._spares.put(spare)  # blocks while enough are waiting

    def commit_incoming(self, temporary: Path, relative: str) -> bool:
        """Move a received (already fdatasync'ed) file into place and make the move durable.
        Returns True when it replaced a file already there (a resend): a caller whose index
        row then cannot be written removes a new file (``remove``), never a replaced one."""
        target = self.absolute(relative)
        try:
            _make_folder_durably(target.parent)
            replaced = target.exists()
            os.replace(temporary, target)
            _fsync_folder(target.parent)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise storage_error(error, relative) from error
        return replaced

    def remove(self, relative: str) -> None:
        """Delete a stored file (e.g. one whose index row could not be written)."""
        self.absolute(relative).unlink(missing_ok=True)

    def remove_empty_folders(self, relative: str) -> None:
        """Remove a folder under the root and its sub-folders where empty, deepest first; a
        folder with a file in it (e.g. an instance that just arrived) is left alone."""
        top = self.absolute(relative)
        if not top.is_dir():
            return
        folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for folder in [*folders, top]:
            try:
                folder.rmdir()
            except OSError:
                pass

    def disk_usage(self):
        """(total, used, free) bytes of the file system the storage lives on."""
        return shutil.disk_usage(self.root)

    def write_atomic(self, relative: str, chunks: list[bytes] | bytes) -> int:
        """Write to a temporary file, fsync, rename into place, fsync the folder.

        Readers never see a half-written file, and a file that exists survived the write.
        Returns the number of bytes written.
        """
        data = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks
        size = sum(len(chunk) for chunk in data)
        self.check_free_space(size)
        target = self.absolute(relative)
        # unique per thread and target, so concurrent writers never share a temporary file
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            _make_folder_durably(target.parent)
            with open(temporary, "wb") as handle:
                handle.writelines(data)
                handle.flush()
                os.fdatasync(handle.fileno())  # data and size; the rename is made durable below
            os.replace(temporary, target)
        except OSError as error:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise storage_error(error, relative) from error
        _fsync_folder(target.parent)
        return size


def storage_error(error: OSError, what: str) -> StorageError:
    if error.errno == 28:  # ENOSPC
        return DiskFullError(f"disk full while writing {what}")
    return StorageError(f"cannot write {what}: {error.strerror or error}")


def _make_folder_durably(folder: Path) -> None:
    """Create ``folder`` and any missing parents, fsyncing each parent whose entries changed,
    so a crash cannot lose the folder of an instance already acknowledged."""
    if folder.is_dir():
        return
    _make_folder_durably(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:  # another receiver created it meanwhile
        return
    _fsync_folder(folder.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
