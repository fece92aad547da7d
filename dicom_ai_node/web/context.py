"""What the web app needs from the running node, handed over by Node.start (or by a test)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_ai_node.config import Config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.deliver.destinations import DestinationStore
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.router import RuleStore
from dicom_ai_node.web.login_limits import LoginLimiter

if TYPE_CHECKING:
    from dicom_ai_node.receive.scp import StorageSCP


@dataclass
class WebContext:
    config: Config
    database: Database
    rules: RuleStore
    models: ModelRegistry
    destinations: DestinationStore
    secret: bytes  # signs CSRF tokens
    submit_job: Callable[[int], None] = lambda job_id: None  # hand a re-queued job to the executor
    kick_outbox: Callable[[], None] = lambda: None  # send re-queued deliveries now
    ready: Callable[[], dict[str, bool]] = field(default=lambda: {"database": True})
    login_limits: LoginLimiter = field(default_factory=LoginLimiter)  # failed logins per user and address
    # the node's StorageSCP: STOW-RS (web/stow.py) stores through its checks and index writer
    receiver: StorageSCP | None = None


def load_secret(path: Path) -> bytes:
    """The session secret: read it, or create it (mode 0600) on first start."""
    if path.is_file():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret)
    return secret
