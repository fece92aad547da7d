"""No patient data in the log by default: library messages that quote header values are redacted."""

from __future__ import annotations

import logging
import uuid

import pytest

from dicom_ai_node.logs import RedactQuotedValues


@pytest.fixture
def captured():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(f"pydicom.test.{uuid.uuid4().hex}")  # fresh: no filters from other tests
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, records
    logger.removeHandler(handler)


def test_quoted_values_are_redacted(captured):
    logger, records = captured
    logger.addFilter(RedactQuotedValues())
    logger.warning("Invalid value for VR PN: '%s' in %s", "Doe^John", "(0010,0010)")
    logger.warning('The string "Jane Roe" is unlikely to be a person name')
    messages = [record.getMessage() for record in records]
    assert "Doe^John" not in messages[0] and "'<redacted>'" in messages[0] and "(0010,0010)" in messages[0]
    assert "Jane Roe" not in messages[1]


def test_without_the_filter_values_stay(captured):
    logger, records = captured
    logger.warning("Invalid value for VR PN: '%s'", "Doe^John")
    assert "Doe^John" in records[0].getMessage()
