"""Shared test settings: where the real test data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DICOM_AI_NODE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not found at {SHARED_DATA} (../shared/data)"
)
from tests.peers import orthanc, orthanc_factory  # noqa: F401,E402  (real Orthanc/dcmtk fixtures)
