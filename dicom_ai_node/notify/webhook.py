"""A webhook: the message as a JSON POST, signed with HMAC-SHA256 over the exact body in
SIGNATURE_HEADER ("sha256=<hex>"), retried with doubling backoff a bounded number of times."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading

import httpx

from dicom_ai_node.config import NotifyConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dicom-Ai-Node-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(target: NotifyConfig, body: bytes, stop: threading.Event) -> bool:
    """Send ``body``; True once a 2xx came back. Gives up after target.retries retries, at
    once on a 4xx other than 408/429, or when ``stop`` is set. The URL (it may hold a token)
    and the secret never reach the log: the target is named by its name."""
    headers = {"Content-Type": "application/json"}
    if target.secret:
        headers[SIGNATURE_HEADER] = signature(target.secret, body)
    for attempt in range(target.retries + 1):
        if attempt and stop.wait(target.backoff_s * 2 ** (attempt - 1)):
            break  # the node is stopping
        try:
            answer = httpx.post(target.url, content=body, headers=headers, timeout=target.timeout_s)
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        else:
            if answer.is_success:
                return True
            problem = f"HTTP {answer.status_code}"
            if answer.status_code < 500 and answer.status_code not in (408, 429):
                log.error("notification to %s refused (%s); not retried", target.name, problem)
                return False
        log.warning("notification to %s failed (attempt %d of %d): %s", target.name, attempt + 1,
                    target.retries + 1, problem)
    log.error("notification to %s given up after %d attempts", target.name, attempt + 1)
    return False
