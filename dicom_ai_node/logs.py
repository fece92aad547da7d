"""Logging set-up, with patient data kept out of the log by default.

The node's own messages never carry patient data (they name UIDs, AE titles and counts).
The DICOM libraries' warnings can quote header values (a person name that does not parse, an
odd date), so unless the site sets ``[node] log_phi = true`` every quoted value in messages
from pydicom, highdicom, pynetdicom and Python warnings is replaced by '<redacted>'.
"""

from __future__ import annotations

import logging
import re

_QUOTED = re.compile(r"""'[^']*'|"[^"]*\"""")
_LIBRARIES = ("pydicom", "highdicom", "pynetdicom", "py.warnings")


class RedactQuotedValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = _QUOTED.sub("'<redacted>'", message), None
        return True


def configure(level: str, log_phi: bool, process_label: str = "") -> None:
    logging.basicConfig(level=level,
                        format=f"%(asctime)s %(levelname)s {process_label}%(name)s: %(message)s")
    logging.captureWarnings(True)  # library warnings go through the filters below, not stderr
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for noisy in ("alembic", "highdicom", "apscheduler"):  # per-step chatter, never useful to an admin
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # httpx logs every request's URL at INFO: a QIDO-RS search's holds the PatientID (priors/dicomweb.py)
    for per_request in ("httpx", "httpcore"):
        logging.getLogger(per_request).setLevel(logging.WARNING)
    if not log_phi:
        for name in _LIBRARIES:
            logging.getLogger(name).addFilter(RedactQuotedValues())
