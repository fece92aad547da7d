"""Delivery of result objects: outbox rows, DIMSE C-STORE SCU, retries with backoff."""
