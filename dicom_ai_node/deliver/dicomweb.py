"""STOW-RS: send result files to a DICOMweb destination (PS3.18 §10.5), and a QIDO-RS check.

A batch goes in requests of at most MAX_INSTANCES files or MAX_REQUEST_BYTES (a larger file goes
alone), each a multipart/related body streamed from the files in CHUNK pieces, never whole in
memory. Every network step waits at most the destination's timeout_s and the batch stops at its
deadline, which ends before the outbox's lease. The answer's Failed SOP Sequence says which
instances the server refused and why; the error text says whether a retry can help.

httpx, not dicomweb-client: its store_instances takes pydicom data sets and builds the whole
body in memory. Redirects are not followed, so credentials only go to the configured URL. The
password or token is read at each send (a rotated secret needs no restart) and never logged.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import httpx
from pydicom.filereader import read_file_meta_info

from dicom_ai_node.config import DestinationConfig
from dicom_ai_node.deliver.dimse import SendResult

MAX_INSTANCES = 50  # per STOW-RS request
MAX_REQUEST_BYTES = 64 * 2**20
CHUNK = 2**20  # bytes read from a file at a time
MAX_ANSWER_BYTES = 4 * 2**20  # a STOW-RS answer lists UIDs; anything longer is not read
MAX_SECRET_BYTES = 64 * 2**10
# the server refused the request itself: the same request will be refused again until the
# destination or the node's config changes (other 4xx, 5xx and network errors are retried)
PERMANENT = {400: "the server cannot read the request", 401: "check the user name and password or token",
             403: "the credentials are not allowed to store", 404: "check the URL",
             405: "check the URL", 413: "the request is too large for the server",
             415: "the server does not take application/dicom"}
FAILURE_REASONS = {0x0110: "processing failure", 0x0112: "no such object instance",
                   0x0122: "SOP class not supported", 0x0124: "not authorized", 0xA700: "out of resources",
                   0xA900: "data set does not match SOP class", 0xC000: "cannot understand",
                   0xC122: "transfer syntax not supported"}
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"


class SecretError(ValueError):
    """The password or token cannot be read; the message says where it was looked for."""


class DeadlinePassed(Exception):
    """A deadline passed while a request was sent or its answer read."""


def send_files(destination: DestinationConfig, _calling_ae: str, paths: list[Path]) -> list[SendResult]:
    """One SendResult per path, in order. ``_calling_ae`` is unused (the DIMSE sender's signature)."""
    deadline = time.monotonic() + destination.timeout_s * (len(paths) + 1)  # the lease is (n + 2) steps
    try:
        client = open_client(destination)
    except SecretError as error:
        return [SendResult(path, False, f"{error} (retried)") for path in paths]
    results: list[SendResult] = []
    with client:
        for group in _requests(paths):
            if time.monotonic() >= deadline:
                results += [SendResult(path, False, "batch deadline passed before it was sent (retried)")
                            for path in group]
                continue
            results += _store(client, destination, group, deadline)
    return results


def check(destination: DestinationConfig) -> tuple[bool, str]:
    """QIDO-RS ``GET {url}/studies?limit=1``: the page's connection test. The answer (patient
    data) is never read."""
    try:
        with open_client(destination) as client, client.stream(
                "GET", f"{destination.url}/studies", params={"limit": "1"},
                headers={"Accept": "application/dicom+json"}) as answer:
            status = answer.status_code
    except SecretError as error:
        return False, str(error)
    except httpx.HTTPError as error:
        return False, f"cannot reach {destination.url}: {type(error).__name__}: {error}"
    if status in (200, 204):
        return True, f"QIDO-RS answered HTTP {status}"
    return False, f"QIDO-RS {destination.url}/studies: {status_text(status)}" + (
        f" ({PERMANENT[status]})" if status in PERMANENT else "")


def open_client(destination: DestinationConfig) -> httpx.Client:
    """An httpx client for the destination: its auth (the secret read now; SecretError when it
    cannot be), TLS verification, timeout_s per network step, no redirects, no proxy."""
    auth = _auth(destination)
    verify: bool | ssl.SSLContext = destination.verify_tls
    if destination.verify_tls and destination.ca_file:
        verify = ssl.create_default_context(cafile=destination.ca_file)
    return httpx.Client(timeout=destination.timeout_s, verify=verify, auth=auth, follow_redirects=False,
                        trust_env=False)  # no proxy from the environment sees the credentials


def _auth(destination: DestinationConfig) -> httpx.Auth | None:
    if destination.auth == "none":
        return None
    secret = read_secret(destination)
    if destination.auth == "basic":
        return httpx.BasicAuth(destination.username or "", secret)
    if not secret.isascii():
        raise SecretError(f"the token of destination {destination.name!r} is not ASCII")
    return _Bearer(secret)


class _Bearer(httpx.Auth):
    def __init__(self, token: str):
        self._header = f"Bearer {token}"

    def auth_flow(self, request):
        request.headers["Authorization"] = self._header
        yield request


def read_secret(destination: DestinationConfig) -> str:
    """The password or token: one line from ``secret_file`` (a trailing newline dropped) or the
    environment variable ``secret_env``. SecretError when missing, empty, or not one line."""
    what = "password" if destination.auth == "basic" else "token"
    if destination.secret_file is not None:
        where = f"file {destination.secret_file}"
        try:
            with open(destination.secret_file, "rb") as file:
                raw = file.read(MAX_SECRET_BYTES + 1)
        except OSError as error:
            raise SecretError(f"cannot read the {what} from {where}: {error.strerror}") from None
        if len(raw) > MAX_SECRET_BYTES:
            raise SecretError(f"the {what} {where} is over {MAX_SECRET_BYTES} bytes: not a {what}")
        try:
            secret = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"the {what} {where} is not UTF-8 text") from None
    else:
        where = f"environment variable {destination.secret_env}"
        secret = os.environ.get(destination.secret_env or "")
        if secret is None:
            raise SecretError(f"cannot read the {what}: {where} is not set")
    secret = secret.removesuffix("\n").removesuffix("\r")
    if not secret or not secret.isprintable():
        raise SecretError(f"the {what} in {where} must be one non-empty line")
    return secret


def _requests(paths: list[Path]) -> Iterator[list[Path]]:
    group: list[Path] = []
    size = 0
    for path in paths:
        length = path.stat().st_size
        if group and (len(group) >= MAX_INSTANCES or size + length > MAX_REQUEST_BYTES):
            yield group
            group, size = [], 0
        group.append(path)
        size += length
    if group:
        yield group


def _store(client: httpx.Client, destination: DestinationConfig, paths: list[Path],
           deadline: float) -> list[SendResult]:
    uids = [str(read_file_meta_info(path).MediaStorageSOPInstanceUID) for path in paths]
    boundary = secrets.token_hex(16)
    heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in paths]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + path.stat().st_size + 2 for head, path in zip(heads, paths)) + len(tail)

    def body() -> Iterator[bytes]:
        for head, path in zip(heads, paths):
            yield head
            with open(path, "rb") as file:
                while chunk := file.read(CHUNK):
                    if time.monotonic() >= deadline:
                        raise DeadlinePassed
                    yield chunk
            yield b"\r\n"
        yield tail

    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json", "Content-Length": str(length)}
    try:
        with client.stream("POST", f"{destination.url}/studies", content=body(), headers=headers) as answer:
            status = answer.status_code
            text = read_answer(answer, deadline)
    except DeadlinePassed:
        return _all(paths, False, "batch deadline passed while sending (retried)")
    except httpx.HTTPError as error:
        if isinstance(error.__cause__, DeadlinePassed) or isinstance(error.__context__, DeadlinePassed):
            return _all(paths, False, "batch deadline passed while sending (retried)")
        return _all(paths, False, f"cannot reach {destination.url}: {type(error).__name__}: {error} (retried)")
    where = f"STOW-RS to {destination.url}"
    # a server may list what it stored and what it refused whatever the status (Orthanc answers
    # 400 with the failed instances and stores the others): each instance by the answer first
    referenced, failed = _parse_answer(text)
    if status in PERMANENT:
        otherwise = (f"{where} refused: {status_text(status)}, {PERMANENT[status]}; will not succeed "
                     "on retry until the destination or its config changes")
    elif 300 <= status < 400:
        otherwise = (f"{where}: {status_text(status)}, a redirect, not followed (credentials go only "
                     "to the configured URL); set url to where it points")
    elif 200 <= status < 300 and status != 202:
        otherwise = None  # stored, whether or not the answer lists it
    elif status in (202, 409):
        otherwise = f"{where}: {status_text(status)}, the instance is not in the answer's Referenced SOP Sequence; retried"
    else:
        otherwise = f"{where} failed: {status_text(status)}{' (server error)' if status >= 500 else ''}; retried"
    results = []
    for path, uid in zip(paths, uids):
        if uid in failed:
            results.append(SendResult(path, False, f"{where}: the server refused the instance "
                                                   f"({_reason_text(failed[uid])}; HTTP {status})"))
        elif uid in referenced or otherwise is None:
            results.append(SendResult(path, True, f"stored (STOW-RS, HTTP {status})"))
        else:
            results.append(SendResult(path, False, otherwise))
    return results


def _reason_text(reason: int | None) -> str:
    if reason is None:
        return "no failure reason given; retried"
    text = f"failure reason 0x{reason:04X}"
    if reason in FAILURE_REASONS:
        text += f", {FAILURE_REASONS[reason]}"
    # only a lack of resources may pass; the same bytes are refused again otherwise
    return text + ("; retried" if reason == 0xA700 or reason == 0x0110 else "; will not succeed on retry")


def read_answer(answer: httpx.Response, deadline: float) -> str | None:
    """The answer's text, or None when it is longer than MAX_ANSWER_BYTES (not read further);
    DeadlinePassed when the deadline (time.monotonic()) passes while it is read."""
    data = bytearray()
    for chunk in answer.iter_bytes():
        if len(data) + len(chunk) > MAX_ANSWER_BYTES:
            return None
        if time.monotonic() >= deadline:
            raise DeadlinePassed
        data += chunk
    return data.decode("utf-8", errors="replace")


def _parse_answer(text: str | None) -> tuple[set[str], dict[str, int | None]]:
    """SOP Instance UIDs of the Referenced SOP Sequence, and of the Failed SOP Sequence with their
    Failure Reason. An answer that is not DICOM JSON lists nothing."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return set(), {}
    if isinstance(data, list):  # some servers wrap the one data set in a list
        data = data[0] if data else {}
    if not isinstance(data, dict):
        return set(), {}
    referenced = {uid for item in _items(data, REFERENCED_SOP_SEQUENCE)
                  if (uid := _value(item, REFERENCED_SOP_INSTANCE_UID)) is not None}
    failed: dict[str, int | None] = {}
    for item in _items(data, FAILED_SOP_SEQUENCE):
        uid, reason = _value(item, REFERENCED_SOP_INSTANCE_UID), _value(item, FAILURE_REASON)
        if uid is not None:
            failed[str(uid)] = reason if isinstance(reason, int) else None
    return {str(uid) for uid in referenced}, failed


def _items(data: dict, tag: str) -> list[dict]:
    element = data.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []


def _value(item: dict, tag: str):
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _all(paths: list[Path], ok: bool, message: str) -> list[SendResult]:
    return [SendResult(path, ok, message) for path in paths]
