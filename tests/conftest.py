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


@pytest.fixture
def database(tmp_path):
    """An empty node database (SQLite, migrated) in the test's folder."""
    from dicom_ai_node.db.engine import Database

    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.upgrade()
    yield database
    database.dispose()


def shared_dicom_files(max_bytes: float = 50e6) -> list[Path]:
    """The files of ../shared/data with the DICM marker, up to ``max_bytes`` each, sorted;
    NIfTI, text and other files are left out."""
    files = []
    for path in sorted(SHARED_DATA.rglob("*")):
        if path.is_file() and 132 < path.stat().st_size <= max_bytes:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    files.append(path)
    return files


from tests.peers import orthanc, orthanc_factory  # noqa: F401,E402  (real Orthanc/dcmtk fixtures)
