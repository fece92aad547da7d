"""The Celery application shared by the node (which sends jobs) and the workers (which run them).

A message carries only the job id: the database stays the source of truth, and the task
claims the job there (runner.claim, a conditional UPDATE), so a duplicate message finds the
job taken and does nothing, and a lost one is sent again by the node's sweep
(jobs/executor.py, CeleryExecutor.sweep).

Delivery: a message is acknowledged only after the job ran (``acks_late``), and a worker
process that dies mid-job hands its message back (``task_reject_on_worker_lost``): the broker
gives it to another worker. Each worker process holds one message at a time (prefetch 1), so a
long job never keeps others waiting behind it on a busy worker.

Queues by device class: a model's manifest says ``device = "gpu" | "cpu" | "any"`` and its
jobs go to the queue of that name. A GPU worker consumes ``gpu,any``, a CPU worker ``cpu,any``
(the defaults of ``dicom-ai-node worker`` on such a host): a "gpu" model never lands on a CPU
host, a "cpu" model never takes a GPU, and "any" goes to whichever worker is free first.
"""

from __future__ import annotations

from celery import Celery

from dicom_ai_node.config import CeleryConfig

TASK_NAME = "dicom_ai_node.run_job"
QUEUES = ("gpu", "cpu", "any")
ACK_MARGIN_S = 60  # beyond the job's soft time limit: the hard limit, then the broker's timeout


def queue_for(device: str) -> str:
    """The queue a job of a model with this manifest ``device`` is sent to."""
    if device not in QUEUES:
        raise ValueError(f"unknown device class {device!r} (expected one of {', '.join(QUEUES)})")
    return device


def make_app(config: CeleryConfig) -> Celery:
    app = Celery("dicom_ai_node", broker=config.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # a worker that loses the broker connection stops its acks_late jobs: the broker
        # redelivers their messages, so the job never runs twice at once
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # the job's own limit: SoftTimeLimitExceeded inside the runner, which records the job
        # failed; the hard limit (process killed) is the last resort
        task_soft_time_limit=config.job_timeout_s,
        task_time_limit=config.job_timeout_s + ACK_MARGIN_S,
        # brokers with a visibility timeout (Redis, SQS) must not hand out a running job again;
        # RabbitMQ's equivalent is the server's consumer_timeout (README)
        broker_transport_options={"visibility_timeout": int(config.job_timeout_s + 2 * ACK_MARGIN_S),
                                  "confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # the outcome is the job row
        task_default_queue="any",
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
