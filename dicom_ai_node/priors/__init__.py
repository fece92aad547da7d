"""Priors (issue 12 §3): an earlier study of the patient, queried and retrieved from a rule's
``source`` for a job, so the model can compare.

- ``choose.py``: which study and series of the source's answers is the prior (pure);
- ``dimse.py``: C-FIND (Study Root, study then series level) and C-MOVE to the node's own AE,
  pynetdicom as SCU, every answer count and wait bounded (a source of kind ``dimse``);
- ``dicomweb.py``: QIDO-RS (studies, then series) and a WADO-RS retrieve streamed into the
  node's store, httpx as client, the same bounds (a source of kind ``dicomweb``);
- ``fetcher.py``: runs a job's fetch in its own small thread pool (never in a job worker),
  records each query, retrieve and outcome in ``prior_fetch``, waits until the retrieved
  instances are indexed, then queues the job (with or without its prior).
"""
