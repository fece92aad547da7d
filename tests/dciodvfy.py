"""Run dicom3tools' dciodvfy on a file and collect its errors (warnings are ignored)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

DCIODVFY = Path("/usr/bin/dciodvfy")


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Lines of dciodvfy output that start with 'Error'; skips the test when dciodvfy is absent."""
    if not DCIODVFY.exists():
        pytest.skip(f"dciodvfy not installed at {DCIODVFY} (apt install dicom3tools)")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
