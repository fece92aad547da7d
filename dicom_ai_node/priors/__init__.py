"""Priors (issue 12 §3): an earlier study of the patient, queried and retrieved from a rule's
``source`` for a job, so the model can compare.

- ``choose.py``: which study and series of the C-FIND answers is the prior (pure);
- ``dimse.py``: C-FIND (Study Root, study then series level) and C-MOVE to the node's own AE,
  pynetdicom as SCU, every answer count and wait bounded;
- ``fetcher.py``: runs a job's fetch in its own small thread pool (never in a job worker),
  records each query, retrieve and outcome in ``prior_fetch``, waits until the moved
  instances are indexed, then queues the job (with or without its prior).
"""
