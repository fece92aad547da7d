"""The Storage SCP.

Each C-STORE is written durably (temporary file, fsync, rename) and indexed in the database
*before* the success status goes back to the sender, so a success means the instance is
safe. The bytes are stored exactly as received (no decode/re-encode). An instance that
cannot be stored gets a failure status with an ErrorComment, and the log says why.

The network side is the node's own lean Upper Layer loop (association.py): every data set
streams from the socket to its file, and an association costs one thread and no polling.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy import update

from dicom_ai_node.config import NodeConfig, TlsConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Study, utcnow
from dicom_ai_node.index import ReceivedInstance
from dicom_ai_node.notify import ignore
from dicom_ai_node.receive import upper_layer as ul
from dicom_ai_node.receive.allow_list import is_allowed
from dicom_ai_node.receive.association import Association
from dicom_ai_node.receive.commands import Command
from dicom_ai_node.receive.incoming import IncomingInstance
from dicom_ai_node.receive.index_writer import IndexWriter
from dicom_ai_node.receive.listener import Connection, ConnectionLimits, Listener
from dicom_ai_node.storage import DiskFullError, Storage, StorageError, is_storable_uid

log = logging.getLogger(__name__)

# Storage service status codes (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

MAXIMUM_ASSOCIATIONS = 32


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only peers with a signed certificate
    return context


class StorageSCP:
    network_timeout = 60.0  # seconds of silence before an established association is dropped

    def __init__(self, config: NodeConfig, database: Database, storage: Storage, notify=ignore):
        self.config = config
        self.notify = notify  # Notifier.emit: "association_refused", "disk_high"
        self.database = database
        self.storage = storage
        self.ssl_context: ssl.SSLContext | None = None
        self._listener: Listener | None = None
        self._index: IndexWriter | None = None
        self._known_series: set[str] = set()  # series whose study/series rows are committed

    def start(self, shared_port: bool = False) -> None:
        """Open the listener. ``shared_port``: several receiver processes listen on the same
        port (SO_REUSEPORT) and the kernel spreads associations across them."""
        self.ssl_context = server_ssl_context(self.config.tls) if self.config.tls else None
        self.open_index()
        limits = ConnectionLimits(association_timeout_s=self.config.association_timeout_s,
                                  max_pending=self.config.max_pending_connections,
                                  max_pending_per_address=self.config.max_pending_per_address,
                                  max_associations=MAXIMUM_ASSOCIATIONS)
        self._listener = Listener(self.config.host, self.config.port, self._serve,
                                  ssl_context=self.ssl_context, shared_port=shared_port, limits=limits)
        self._listener.start()
        log.info("DICOM listener %s on %s:%d%s", self.config.ae_title, self.config.host,
                 self.port, " (TLS)" if self.ssl_context else "")

    def open_index(self) -> None:
        """The index writer, without a listener too: a process of role ``web`` stores the
        instances of a prior's WADO-RS retrieve (priors/dicomweb.py) through store_instance."""
        if self._index is None:
            self._index = IndexWriter(self.database)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._index is not None:
            self._index.stop()
            self._index = None

    @property
    def can_store(self) -> bool:
        """store_instance works: the index writer is open (with or without a listener)."""
        return self._index is not None

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def port(self) -> int:
        return self._listener.address[1] if self._listener else self.config.port

    # -- association level -------------------------------------------------------------

    def _serve(self, connection: Connection) -> None:
        Association(connection, self).run()

    @property
    def association_timeout_s(self) -> float:
        return self.config.association_timeout_s

    def check_association(self, request: ul.AssociationRequest, connection: Connection,
                          accepted_contexts: int) -> tuple[int, int, int] | None:
        """None to accept (the connection then counts as an association), else the
        A-ASSOCIATE-RJ (result, source, reason). ``accepted_contexts``: how many of the
        proposed presentation contexts negotiation accepted."""
        address = connection.host
        if not is_allowed(self.config.allowed_callers, self.config.allow_any_caller,
                          request.calling_ae_title, address):
            log.warning("rejected association from AE %r at %s: not on the allow-list",
                        request.calling_ae_title, address)
            self.notify("association_refused", calling_ae=request.calling_ae_title, address=address,
                        called_ae=request.called_ae_title, reason="calling AE not on the allow-list")
            return ul.REJECT_CALLING_AE_NOT_RECOGNISED
        if not self.config.allow_any_called_ae and request.called_ae_title != self.config.ae_title.strip():
            log.warning("rejected association from AE %r at %s: called AE title %r is not this "
                        "node's %r (allow_any_called_ae = true accepts any)", request.calling_ae_title,
                        address, request.called_ae_title, self.config.ae_title)
            return ul.REJECT_CALLED_AE_NOT_RECOGNISED
        if not accepted_contexts:  # none proposed, or none this node serves
            log.warning("rejected association from AE %r at %s: no acceptable presentation context "
                        "(%d proposed)", request.calling_ae_title, address, request.proposed_contexts)
            return ul.REJECT_NO_REASON
        if not request.protocol_version_ok:
            return ul.REJECT_PROTOCOL_VERSION
        if not connection.associate():
            log.warning("rejected association from AE %r at %s: %d associations open already",
                        request.calling_ae_title, address, MAXIMUM_ASSOCIATIONS)
            return ul.REJECT_LOCAL_LIMIT_EXCEEDED
        return None

    def association_released(self, association: Association) -> None:
        """A normal release is a completion signal (see completion.py): record it."""
        self.studies_released(association.studies)

    def studies_released(self, studies: set[str]) -> None:
        """The sender is done with these studies (an association released, a STOW-RS request
        answered): completion may come after release_grace_s instead of the quiet period."""
        if studies:
            with self.database.session() as session:
                session.execute(update(Study).where(Study.study_instance_uid.in_(studies))
                                .values(released_at=utcnow()))

    # -- C-STORE -----------------------------------------------------------------------

    def store(self, instance: IncomingInstance, request: Command, transfer_syntax: str,
              calling_ae: str) -> tuple[int, str | None, str | None]:
        """Store and index one received data set: (status, error comment, StudyInstanceUID)."""
        return self.store_instance(instance, transfer_syntax, Expected(
            request.affected_sop_instance_uid, request.affected_sop_class_uid, "C-STORE request's Affected"),
            sender=calling_ae, calling_ae=calling_ae)

    def store_instance(self, instance: IncomingInstance, transfer_syntax: str, expected: Expected, *,
                       sender: str, calling_ae: str | None, via: str = "C-STORE"
                       ) -> tuple[int, str | None, str | None]:
        """The checks, the durable write and the index row shared by C-STORE and STOW-RS
        (web/stow.py): (status, error comment, StudyInstanceUID). ``sender`` names the peer in
        logs and notifications; ``calling_ae`` goes into the index row."""
        try:
            study_uid = self._store(instance, transfer_syntax, expected, calling_ae)
        except _Refused as refusal:
            log.warning("refused %s from %s: %s", via, sender, refusal.reason)
            return refusal.status, refusal.reason[:64], None
        except DiskFullError as error:
            log.error("refused %s from %s: %s", via, sender, error)
            self.notify("disk_high", reason=str(error), calling_ae=sender, status="A700")
            return OUT_OF_RESOURCES, "Out of resources: disk full on the AI node", None
        except StorageError as error:
            log.error("refused %s from %s: %s", via, sender, error)
            return OUT_OF_RESOURCES, "Cannot write the instance on the AI node", None
        except Exception:  # the node must never crash on one bad instance
            log.exception("unexpected error storing an instance from %s", sender)
            return PROCESSING_FAILURE, "Unexpected error on the AI node; see its log", None
        return SUCCESS, None, study_uid

    def _store(self, instance: IncomingInstance, transfer_syntax: str, expected: Expected,
               calling_ae: str | None) -> str:
        if instance.error is not None:
            raise instance.error
        try:
            header: Dataset | None = instance.scan_header(transfer_syntax)
            if header is None or header.get("SeriesInstanceUID") not in self._known_series:
                header = instance.read_header(transfer_syntax)  # all of it, for the series row
            study_uid = _uid(header, "StudyInstanceUID")
            series_uid = _uid(header, "SeriesInstanceUID")
            sop_uid = _uid(header, "SOPInstanceUID")
            sop_class = _uid(header, "SOPClassUID")
        except _Refused:
            raise
        except Exception as error:
            raise _Refused(CANNOT_UNDERSTAND, f"cannot decode the dataset: {error}") from None
        if sop_uid != expected.sop_instance_uid:
            raise _Refused(DATASET_DOES_NOT_MATCH, "SOPInstanceUID in the dataset differs from the "
                                                   f"{expected.source} SOP Instance UID")
        if sop_class != expected.sop_class_uid:
            raise _Refused(DATASET_DOES_NOT_MATCH, "SOPClassUID in the dataset differs from the "
                                                   f"{expected.source} SOP Class UID")
        if expected.study_uid is not None and study_uid != expected.study_uid:
            raise _Refused(DATASET_DOES_NOT_MATCH, "StudyInstanceUID differs from the study of the request")
        path = self.storage.instance_path(study_uid, series_uid, sop_uid)
        replaced = self.storage.commit_incoming(instance.path, path)
        item = ReceivedInstance(study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                sop_class_uid=sop_class, transfer_syntax_uid=transfer_syntax,
                                path=path, size_bytes=instance.file_size, calling_ae_title=calling_ae,
                                header=header)
        try:
            is_new = self._index.record(item, series_known=series_uid in self._known_series)
        except BaseException:
            # never a stored file without its row; a resend keeps its file (its old row points to it)
            if not replaced:
                self.storage.remove(path)
            raise
        if len(self._known_series) > 100_000:
            self._known_series.clear()  # bounded; forgetting only costs two cheap inserts
        self._known_series.add(series_uid)
        log.debug("stored %s (%d bytes, %s) from %s", sop_uid, instance.file_size,
                  "new" if is_new else "resent", calling_ae)
        return study_uid


@dataclass(frozen=True)
class Expected:
    """What the data set must say it is: the C-STORE request's Affected SOP Instance/Class UID,
    or a STOW-RS part's file meta (and the study of the request's URL, when it names one)."""

    sop_instance_uid: str
    sop_class_uid: str
    source: str  # for the refusal: "... differs from the <source> SOP Instance UID"
    study_uid: str | None = None


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _uid(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    value = str(value).strip().rstrip("\x00") if value is not None else ""
    if not value:
        raise _Refused(DATASET_DOES_NOT_MATCH, f"{keyword} is missing or empty")
    if not is_storable_uid(value):  # what is not a valid UID is stored (results cannot use it: jobs/fitness.py)
        raise _Refused(DATASET_DOES_NOT_MATCH, f"{keyword} is not a valid UID")
    return value
