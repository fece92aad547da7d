"""The Storage SCP.

Each C-STORE is written durably (temporary file, fsync, rename) and indexed in the database
*before* the success status goes back to the sender, so a success means the instance is
safe. The bytes are stored exactly as received (no decode/re-encode). An instance that
cannot be stored gets a failure status with an ErrorComment, and the log says why.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import update

from dicom_ai_node.config import NodeConfig, TlsConfig
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Study, utcnow
from dicom_ai_node.index import ReceivedInstance
from dicom_ai_node.receive.index_writer import IndexWriter
from dicom_ai_node.receive.allow_list import is_allowed
from dicom_ai_node.storage import DiskFullError, Storage, StorageError, is_valid_uid

log = logging.getLogger(__name__)

# Storage service status codes (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only peers with a signed certificate
    return context


class StorageSCP:
    def __init__(self, config: NodeConfig, database: Database, storage: Storage):
        self.config = config
        self.database = database
        self.storage = storage
        self._server = None
        self._index = None  # IndexWriter, started with the listener
        self._studies_by_association: dict[int, set[str]] = {}
        self._known_series: set[str] = set()  # series whose study/series rows are committed

    def start(self, shared_port: bool = False) -> None:
        """Open the listener. ``shared_port``: several receiver processes listen on the same
        port (SO_REUSEPORT) and the kernel spreads associations across them."""
        # Accept every storage SOP class, private and future ones included, in whatever
        # transfer syntax the sender proposes: the node stores bytes as received.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        ae.maximum_associations = 32
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        handlers = [
            (evt.EVT_REQUESTED, self._check_caller),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._forget_association),
            (evt.EVT_CONN_CLOSE, self._forget_association),
        ]
        ssl_context = server_ssl_context(self.config.tls) if self.config.tls else None
        self._index = IndexWriter(self.database)
        # what AE.start_server(block=False) does, with a server class that may share the port
        self._server = ae.make_server((self.config.host, self.config.port), evt_handlers=handlers,
                                      ssl_context=ssl_context,
                                      server_class=_SharedPortServer if shared_port else ThreadedAssociationServer)
        ae._servers.append(self._server)  # as start_server does: the server's shutdown() expects it
        threading.Thread(target=self._server.serve_forever, name="dicom-listener", daemon=True).start()
        log.info("DICOM listener %s on %s:%d%s", self.config.ae_title, self.config.host,
                 self.config.port, " (TLS)" if ssl_context else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._index is not None:
            self._index.stop()
            self._index = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.port

    # -- association level -------------------------------------------------------------

    def _check_caller(self, event) -> None:
        requestor = event.assoc.requestor
        # requestor.ae_title is filled in only after this event; the A-ASSOCIATE-RQ has it now
        calling_ae = requestor.primitive.calling_ae_title
        if not is_allowed(self.config.allowed_callers, self.config.allow_any_caller,
                          calling_ae, requestor.address):
            log.warning("rejected association from AE %r at %s: not on the allow-list",
                        calling_ae, requestor.address)
            # permanent rejection, service user, "calling AE title not recognised"
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # as pynetdicom does after its own rejections: lets the RJ go out

    def _handle_echo(self, event) -> int:
        return SUCCESS

    def _handle_released(self, event) -> None:
        """A normal release is a completion signal (see completion.py): record it."""
        studies = self._studies_by_association.pop(id(event.assoc), set())
        if studies:
            with self.database.session() as session:
                session.execute(update(Study).where(Study.study_instance_uid.in_(studies))
                                .values(released_at=utcnow()))

    def _forget_association(self, event) -> None:
        self._studies_by_association.pop(id(event.assoc), None)

    # -- C-STORE -----------------------------------------------------------------------

    def _handle_store(self, event):
        calling_ae = event.assoc.requestor.ae_title
        try:
            received = self._store(event, calling_ae)
        except _Refused as refusal:
            log.warning("refused C-STORE from %s: %s", calling_ae, refusal.reason)
            return _failure(refusal.status, refusal.reason)
        except DiskFullError as error:
            log.error("refused C-STORE from %s: %s", calling_ae, error)
            return _failure(OUT_OF_RESOURCES, "Out of resources: disk full on the AI node")
        except StorageError as error:
            log.error("refused C-STORE from %s: %s", calling_ae, error)
            return _failure(OUT_OF_RESOURCES, "Cannot write the instance on the AI node")
        except Exception:  # the node must never crash on one bad instance
            log.exception("unexpected error storing an instance from %s", calling_ae)
            return _failure(PROCESSING_FAILURE, "Unexpected error on the AI node; see its log")
        self._studies_by_association.setdefault(id(event.assoc), set()).add(received)
        return SUCCESS

    def _store(self, event, calling_ae: str) -> str:
        """Store and index one instance; returns its StudyInstanceUID."""
        request = event.request
        transfer_syntax = event.context.transfer_syntax
        try:
            header: Dataset = event.dataset
            study_uid = _uid(header, "StudyInstanceUID")
            series_uid = _uid(header, "SeriesInstanceUID")
            sop_uid = _uid(header, "SOPInstanceUID")
            sop_class = _uid(header, "SOPClassUID")
        except _Refused:
            raise
        except Exception as error:
            raise _Refused(CANNOT_UNDERSTAND, f"cannot decode the dataset: {error}") from None
        if sop_uid != request.AffectedSOPInstanceUID:
            raise _Refused(DATASET_DOES_NOT_MATCH, "SOPInstanceUID in the dataset differs from the "
                                                   "C-STORE request's Affected SOP Instance UID")
        if sop_class != request.AffectedSOPClassUID:
            raise _Refused(DATASET_DOES_NOT_MATCH, "SOPClassUID in the dataset differs from the "
                                                   "C-STORE request's Affected SOP Class UID")
        path = self.storage.instance_path(study_uid, series_uid, sop_uid)
        data = event.encoded_dataset(include_meta=True)
        size = self.storage.write_atomic(path, data)
        item = ReceivedInstance(study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                sop_class_uid=sop_class, transfer_syntax_uid=str(transfer_syntax),
                                path=path, size_bytes=size, calling_ae_title=calling_ae,
                                header=header)
        is_new = self._index.record(item, series_known=series_uid in self._known_series)
        if len(self._known_series) > 100_000:
            self._known_series.clear()  # bounded; forgetting only costs two cheap inserts
        self._known_series.add(series_uid)
        log.debug("stored %s (%d bytes, %s) from %s", sop_uid, size, "new" if is_new else "resent",
                  calling_ae)
        return study_uid


class _SharedPortServer(ThreadedAssociationServer):
    """A listener that shares its port with the node's other receiver processes."""

    def server_bind(self) -> None:
        # pynetdicom's server_bind sets SO_REUSEADDR only; the port sharing needs SO_REUSEPORT
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


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
    if not is_valid_uid(value):
        raise _Refused(DATASET_DOES_NOT_MATCH, f"{keyword} is not a valid UID")
    return value


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]  # LO: at most 64 characters
    return response
