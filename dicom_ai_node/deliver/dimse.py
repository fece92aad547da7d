"""C-STORE SCU: send files to a DICOM destination on one association.

Only the presentation contexts the files need are proposed (one per SOP class, with the
transfer syntaxes the files are in), so strict PACS that refuse unexpected contexts accept us.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_ai_node.config import DestinationConfig

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # DICOM allows at most 128 presentation contexts per association


@dataclass(frozen=True)
class SendResult:
    path: Path
    ok: bool
    message: str


def client_ssl_context(destination: DestinationConfig) -> ssl.SSLContext | None:
    if destination.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls.ca_file)
    context.check_hostname = False  # PACS certificates rarely name the host; the CA pins trust
    context.load_cert_chain(destination.tls.cert_file, destination.tls.key_file)
    return context


def _new_ae(destination: DestinationConfig, calling_ae: str) -> AE:
    ae = AE(ae_title=destination.calling_ae_title or calling_ae)
    ae.acse_timeout = destination.timeout_s
    ae.dimse_timeout = destination.timeout_s
    ae.network_timeout = destination.timeout_s
    return ae


def _associate(ae: AE, destination: DestinationConfig):
    context = client_ssl_context(destination)
    tls_args = (context, None) if context else None
    return ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                        tls_args=tls_args)


def echo(destination: DestinationConfig, calling_ae: str) -> tuple[bool, str]:
    ae = _new_ae(destination, calling_ae)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        return False, _why_not_established(assoc, destination)
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0x0000
        return ok, "echo succeeded" if ok else "echo failed"
    finally:
        assoc.release()


def send_files(destination: DestinationConfig, calling_ae: str, paths: list[Path]) -> list[SendResult]:
    metas = {}
    for path in paths:
        meta = read_file_meta_info(path)
        metas[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    syntaxes: dict[str, set[str]] = {}
    for sop_class, transfer_syntax in metas.values():
        syntaxes.setdefault(sop_class, set()).add(transfer_syntax)
    if len(syntaxes) > MAX_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes in one batch; at most {MAX_CONTEXTS}")
    ae = _new_ae(destination, calling_ae)
    for sop_class, transfer_syntaxes in sorted(syntaxes.items()):
        ae.add_requested_context(sop_class, sorted(transfer_syntaxes))
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        message = _why_not_established(assoc, destination)
        return [SendResult(path, False, message) for path in paths]
    results = []
    try:
        for path in paths:
            if not assoc.is_established:
                results.append(SendResult(path, False, "association to the destination was lost"))
                continue
            status = assoc.send_c_store(dcmread(path))
            results.append(_store_result(path, status))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_result(path: Path, status) -> SendResult:
    if not status:
        return SendResult(path, False, "no response from the destination (timeout or abort)")
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "")).strip()
    if code == 0x0000 or code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return SendResult(path, True, f"stored (status 0x{code:04X})")
    return SendResult(path, False, f"destination refused it: status 0x{code:04X}"
                                   + (f" ({comment})" if comment else ""))


def _why_not_established(assoc, destination: DestinationConfig) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        return f"association rejected by {where} (check the node's AE title is known to it)"
    # pynetdicom reports a refused TCP connection as an aborted association too
    return f"cannot connect to {where}, or it aborted the association"
