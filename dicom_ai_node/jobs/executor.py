"""Where jobs run. The embedded default is a local thread pool; a distributed executor
(Celery workers on GPU machines) implements the same two methods."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

log = logging.getLogger(__name__)


class Executor(Protocol):
    def submit(self, job_id: int) -> None: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs jobs in this process. Torch releases the GIL in its kernels, so threads suffice."""

    def __init__(self, run_job: Callable[[int], None], workers: int):
        self._run_job = run_job
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")

    def submit(self, job_id: int) -> None:
        self._pool.submit(self._run_logged, job_id)

    def _run_logged(self, job_id: int) -> None:
        try:
            self._run_job(job_id)
        except Exception:  # the runner records failures on the job; this is a last resort
            log.exception("job %d crashed outside its own error handling", job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
