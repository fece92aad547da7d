"""One association, from A-ASSOCIATE-RQ to release or abort, in its own thread.

The loop reads one PDU at a time. Command fragments are collected (a command set is a few
hundred bytes); data set fragments are written to the instance's file as they arrive. When
the last fragment of a C-STORE's data set is in, the SCP stores and indexes the instance and
only then is the response sent: one instance in flight per association, as senders expect
(no asynchronous operations window is negotiated).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from dicom_ai_node.receive import upper_layer as ul
from dicom_ai_node.receive.commands import (
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    CommandError,
    decode_command,
    encode_response,
)
from dicom_ai_node.receive.incoming import IncomingInstance, file_meta
from dicom_ai_node.storage import is_storable_uid

if TYPE_CHECKING:
    from dicom_ai_node.receive.listener import Connection
    from dicom_ai_node.receive.scp import StorageSCP

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
MAX_COMMAND_BYTES = 64 * 1024
UNRECOGNISED_OPERATION = 0x0211
SOP_CLASS_NOT_SUPPORTED = 0x0122
INVALID_SOP_INSTANCE = 0x0117  # PS3.7 C.5.7: the UID violates the UID construction rules
VERIFICATION = "1.2.840.10008.1.1"
C_CANCEL_RQ = 0x0FFF


class Association:
    def __init__(self, connection: Connection, scp: StorageSCP):
        self._link = connection  # the listener's view: ARTIM deadline, association count
        self.connection: socket.socket = connection.socket
        self.address = connection.host
        self.scp = scp
        self.calling_ae_title = ""
        self.studies: set[str] = set()  # StudyInstanceUIDs stored on this association
        self.stored = 0  # instances acknowledged with success
        self.refused = 0  # instances answered with a failure status
        self._reader = None
        self._contexts: dict[int, ul.AcceptedContext] = {}
        self._buffer = memoryview(bytearray(READ_CHUNK))
        # the message being received
        self._command_bytes = bytearray()
        self._command: Command | None = None
        self._command_context: ul.AcceptedContext | None = None
        self._instance: IncomingInstance | None = None

    def run(self) -> None:
        try:
            self._run()
        except ul.ProtocolError as error:
            log.warning("aborting the association from %s at %s: %s", self.calling_ae_title or "?",
                        self.address, error)
            self._send_quietly(ul.abort(ul.ABORT_SOURCE_PROVIDER, error.reason))
        except (ConnectionError, TimeoutError, OSError) as error:
            if self._link.timed_out:
                return  # the listener closed it at the ARTIM deadline, and logged that
            log.warning("association from %s at %s ended without release: %s",
                        self.calling_ae_title or "?", self.address, error or type(error).__name__)
        except Exception:
            log.exception("unexpected error on the association from %s at %s",
                          self.calling_ae_title or "?", self.address)
            self._send_quietly(ul.abort(ul.ABORT_SOURCE_PROVIDER, ul.REASON_NOT_SPECIFIED))
        finally:
            if self._instance is not None:  # a data set cut off mid-way: never acknowledged
                self._instance.discard()
            self._close()

    # -- phases ------------------------------------------------------------------------

    def _run(self) -> None:
        # the listener closes the connection at the ARTIM deadline; this bounds each read too
        self.connection.settimeout(self.scp.association_timeout_s)
        if self.scp.ssl_context is not None:
            self.connection.do_handshake()
        self._reader = self.connection.makefile("rb", buffering=READ_CHUNK)
        if not self._associate():
            return
        self.connection.settimeout(self.scp.network_timeout)
        while True:
            header = ul.read_pdu_header(self._reader)
            if header is None:
                raise ConnectionError("the peer closed the connection")
            pdu_type, length = header
            if pdu_type == ul.P_DATA_TF:
                self._read_p_data(length)
            elif pdu_type == ul.RELEASE_RQ:
                if length != ul.RELEASE_PDU_LENGTH:  # never read a peer's length into memory
                    raise ul.ProtocolError(f"A-RELEASE-RQ of {length} bytes "
                                           f"({ul.RELEASE_PDU_LENGTH} expected)")
                ul.read_exact(self._reader, length)
                if self._command is not None or self._command_bytes:
                    log.warning("A-RELEASE-RQ from %s in the middle of a message", self.calling_ae_title)
                self.connection.sendall(ul.release_rp())
                self.scp.association_released(self)
                if self.stored or self.refused:
                    log.info("association from %s at %s released: %d instances stored, %d refused",
                             self.calling_ae_title, self.address, self.stored, self.refused)
                return
            elif pdu_type == ul.ABORT:
                ul.read_exact(self._reader, min(length, 64))
                log.warning("association from %s at %s aborted by the peer after %d instances "
                            "stored (an instance in transfer was not stored)", self.calling_ae_title,
                            self.address, self.stored)
                return
            elif pdu_type in ul.PDU_TYPES:
                raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", ul.REASON_UNEXPECTED_PDU)
            else:
                raise ul.ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ul.REASON_UNRECOGNISED_PDU)

    def _associate(self) -> bool:
        header = ul.read_pdu_header(self._reader)
        if header is None:
            return False  # a port check: connected and closed again
        pdu_type, length = header
        if pdu_type != ul.ASSOCIATE_RQ:
            raise ul.ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                                   ul.REASON_UNEXPECTED_PDU)
        if length > ul.MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
        body = ul.read_exact(self._reader, length)
        request = ul.decode_associate_rq(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body)
        self.calling_ae_title = request.calling_ae_title
        accept, self._contexts = ul.negotiate(request)
        rejection = self.scp.check_association(request, self._link, len(self._contexts))
        if rejection is not None:
            self.connection.sendall(ul.associate_rj(*rejection))
            return False
        self.connection.sendall(accept)
        log.debug("association from %s at %s accepted, %d presentation contexts", self.calling_ae_title,
                  self.address, len(self._contexts))
        return True

    # -- data transfer -----------------------------------------------------------------

    def _read_p_data(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            if remaining < ul.PDV_HEADER_SIZE:
                raise ul.ProtocolError("P-DATA-TF ends inside a PDV item header")
            value_length, context_id, is_command, is_last = ul.read_pdv_header(self._reader)
            remaining -= ul.PDV_HEADER_SIZE + value_length
            if remaining < 0:
                raise ul.ProtocolError("PDV item longer than its P-DATA-TF")
            context = self._contexts.get(context_id)
            if context is None:
                raise ul.ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
            if is_command:
                self._read_command_fragment(context, value_length, is_last)
            else:
                self._read_data_set_fragment(context, value_length, is_last)

    def _read_command_fragment(self, context: ul.AcceptedContext, length: int, is_last: bool) -> None:
        if self._command is not None:
            raise ul.ProtocolError("a new command before the previous command's data set ended",
                                   ul.REASON_UNEXPECTED_PDU)
        if len(self._command_bytes) + length > MAX_COMMAND_BYTES:
            raise ul.ProtocolError("command set larger than 64 KB")
        self._command_bytes += ul.read_exact(self._reader, length)
        if not is_last:
            return
        try:
            command = decode_command(bytes(self._command_bytes))
        except CommandError as error:
            raise ul.ProtocolError(f"unreadable command set: {error}") from None
        self._command_bytes = bytearray()
        if command.has_data_set:
            self._command, self._command_context = command, context
            if command.command_field == C_STORE_RQ and is_storable_uid(command.affected_sop_instance_uid):
                # a request without its SOP Class UID is refused once the data set is in (they differ);
                # one whose SOP Instance UID is no UID gets no file: its data set is read and dropped
                self._instance = IncomingInstance(self.scp.storage, file_meta(
                    command.affected_sop_class_uid, command.affected_sop_instance_uid,
                    context.transfer_syntax, self.calling_ae_title, ul.IMPLEMENTATION_CLASS_UID,
                    ul.IMPLEMENTATION_VERSION_NAME))
        elif command.command_field == C_CANCEL_RQ or command.command_field & 0x8000:
            # a cancel or a response: neither is answered (no operation of ours is pending)
            log.warning("ignored DIMSE command 0x%04X from %s", command.command_field, self.calling_ae_title)
        else:
            self._respond(context, command, *self._dispatch_without_data_set(context, command))

    def _read_data_set_fragment(self, context: ul.AcceptedContext, length: int, is_last: bool) -> None:
        if self._command is None:
            raise ul.ProtocolError("data set fragment without a command", ul.REASON_UNEXPECTED_PDU)
        if context.context_id != self._command_context.context_id:
            raise ul.ProtocolError("data set on another presentation context than its command")
        while length:
            size = self._reader.readinto(self._buffer[:min(length, READ_CHUNK)])
            if not size:
                raise ConnectionError("the peer closed the connection inside a data set")
            if self._instance is not None:
                self._instance.write(self._buffer[:size])
            length -= size
        if not is_last:
            return
        command, instance = self._command, self._instance
        self._command = self._command_context = self._instance = None
        if command.command_field != C_STORE_RQ:
            self._respond(context, command, UNRECOGNISED_OPERATION, "Only C-STORE and C-ECHO are served")
            return
        if instance is None:
            log.warning("refused C-STORE from %s: its Affected SOP Instance UID is not a valid UID",
                        self.calling_ae_title)
            self.refused += 1
            self._respond(context, command, INVALID_SOP_INSTANCE, "Affected SOP Instance UID is not a valid UID")
            return
        try:
            status, comment = self._store(context, command, instance)
        finally:
            instance.discard()  # the temporary file, when the SCP did not move it into place
        self._respond(context, command, status, comment)

    def _store(self, context, command: Command, instance: IncomingInstance) -> tuple[int, str | None]:
        if command.affected_sop_class_uid != context.abstract_syntax:
            log.warning("refused C-STORE from %s: SOP class %s on a context for %s", self.calling_ae_title,
                        command.affected_sop_class_uid, context.abstract_syntax)
            self.refused += 1
            return SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's"
        instance.finish()
        status, comment, study_uid = self.scp.store(instance, command, context.transfer_syntax,
                                                    self.calling_ae_title)
        if study_uid:
            self.studies.add(study_uid)
            self.stored += 1
        else:
            self.refused += 1
        return status, comment

    def _dispatch_without_data_set(self, context, command: Command) -> tuple[int, str | None]:
        if command.command_field == C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            return 0x0000, None
        if command.command_field == C_STORE_RQ:
            raise ul.ProtocolError("C-STORE-RQ without a data set")
        return UNRECOGNISED_OPERATION, "Only C-STORE and C-ECHO are served"

    def _respond(self, context, command: Command, status: int, comment: str | None = None) -> None:
        self.connection.sendall(ul.p_data_tf(context.context_id, encode_response(command, status, comment)))

    # -- ending ------------------------------------------------------------------------

    def _send_quietly(self, pdu: bytes) -> None:
        try:
            self.connection.sendall(pdu)
        except OSError:
            pass

    def _close(self) -> None:
        try:
            if self._reader is not None:
                self._reader.close()
            self.connection.close()
        except OSError:
            pass
