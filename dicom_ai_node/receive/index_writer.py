"""Group commit for the index.

Each C-STORE handler hands its row to one writer thread and waits. The writer takes every
row waiting at that moment and commits them in one transaction, so N concurrent
associations cost one commit (one fsync) instead of N, and no instance is acknowledged
before its row is durable. With one association it costs a thread hand-off, nothing more.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from dicom_ai_node.db.engine import Database
from dicom_ai_node.index import ReceivedInstance, record_instance
from dicom_ai_node.storage import DiskFullError

log = logging.getLogger(__name__)

MAX_BATCH = 64


@dataclass
class _Pending:
    item: ReceivedInstance
    series_known: bool
    done: threading.Event = field(default_factory=threading.Event)
    is_new: bool = False
    error: BaseException | None = None


class IndexWriter:
    def __init__(self, database: Database):
        self.database = database
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def record(self, item: ReceivedInstance, series_known: bool) -> bool:
        """Index one instance durably; returns True when it is new. Blocks until committed."""
        pending = _Pending(item, series_known)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.is_new

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self.database.session() as session:
                for pending in batch:
                    pending.is_new = record_instance(session, pending.item, series_known=pending.series_known)
        except Exception:  # noqa: BLE001 - handed to the receiver waiting for its row
            if len(batch) == 1:
                batch[0].error = _current_error()
            else:
                # one bad row must not fail its neighbours: commit them one by one
                for pending in batch:
                    self._commit([pending])
                return
        for pending in batch:
            pending.done.set()


def _current_error() -> BaseException:
    """The error being handled; a full disk under the database becomes DiskFullError, so the
    sender gets "out of resources" (A700) rather than a processing failure."""
    import sys

    error = sys.exc_info()[1]
    text = str(error)
    if "database or disk is full" in text or "No space left on device" in text:
        full = DiskFullError("disk full while writing the index")
        full.__cause__ = error
        return full
    return error
