"""The node: wires receive -> completion -> routing -> jobs -> delivery around one database.

Start order matters for "nothing is lost": the schema is migrated and interrupted jobs are
re-queued *before* the DICOM port opens; completion needs no re-arming (its facts are rows).

A process runs one role (``serve --role``): "all" (the embedded default), "receiver" (the
DICOM listener only) or "web" (the admin page and API). Completion and routing, the outbox,
the job sweeps and retention run in whichever "all" or "web" process holds the leader lease
(cluster.py), so they run once however many processes share the database.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_ai_node import cluster
from dicom_ai_node.completion import CHECK_INTERVAL_S, CompletionWatcher
from dicom_ai_node.config import Config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import DisabledModel
from dicom_ai_node.deliver.destinations import DestinationStore
from dicom_ai_node.deliver.outbox import Outbox
from dicom_ai_node.jobs.executor import CeleryExecutor, LocalExecutor
from dicom_ai_node.jobs.runner import JobRunner, recover_unfinished
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.notify import Notifier, patients_in
from dicom_ai_node.priors.fetcher import RESUME_INTERVAL_S as PRIOR_RESUME_S
from dicom_ai_node.priors.fetcher import PriorFetcher
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.results.warm_up import warm_up
from dicom_ai_node.retention import CHECK_INTERVAL_S as RETENTION_CHECK_S
from dicom_ai_node.retention import Retention
from dicom_ai_node.router import Router, RuleStore
from dicom_ai_node.routing import RuleError, check_rules
from dicom_ai_node.storage import Storage

log = logging.getLogger(__name__)

OUTBOX_INTERVAL_S = 1.0


class StartupError(RuntimeError):
    """The node refuses to start; the message says what to fix."""


class Node:
    def __init__(self, config: Config, role: str = "all"):
        if role not in cluster.ROLES:
            raise ValueError(f"role must be one of {', '.join(cluster.ROLES)}")
        self.config = config
        self.role = role
        self.receives = role in ("all", "receiver")
        self.leads = role in ("all", "web")  # may hold the leader lease and run jobs
        self.name = cluster.process_name(role, config.node.port if self.receives else config.web.port)
        self.database = Database(config.database_url)
        self.storage = Storage(config.node.storage_dir, config.node.min_free_disk_mb * 2**20,
                               incoming_name=self.name.replace("/", "-").replace(":", "-"))
        self.process = cluster.ProcessRecord(self.database, self.name, role)
        self.leader = cluster.Leader(self.database, self.name)
        self.models = ModelRegistry(config.model_paths)
        self.models.is_disabled = self._model_disabled
        self.rules = RuleStore(self.database)
        self.destinations = DestinationStore(self.database)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.notifier = Notifier(config.notify, config.node.ae_title, patient_of=patients_in(self.database))
        self.outbox = Outbox(config, self.database, self.storage, lookup=self.destinations.get,
                             notify=self.notifier.emit)
        self.runner = JobRunner(self.database, self.storage, self.models, on_results=self._kick_outbox,
                                default_qc_fail=config.qc_on_fail, notify=self.notifier.emit,
                                process_name=self.name)
        if config.celery is not None:  # jobs run in Celery workers (dicom-ai-node worker)
            self.executor = CeleryExecutor(config.celery, self.database, self._model_device)
        else:
            self.executor = LocalExecutor(self.runner.run, config.workers)
        self.scp = StorageSCP(config.node, self.database, self.storage, notify=self.notifier.emit)
        # priors a rule asks for: fetched in their own threads, then the job is submitted; a
        # WADO-RS retrieve stores through this process's StorageSCP (its index writer, no listener needed)
        self.priors = PriorFetcher(self.database, self.destinations.get, config.node.ae_title, self.executor.submit,
                                   receiver=self.scp, is_paused=self.destinations.paused)
        self.router = Router(self.database, self.rules, self.executor.submit, fetch_priors=self.priors.submit)
        release_grace_s = config.node.release_grace_s if config.node.complete_on_release else None
        self.completion = CompletionWatcher(self.database, config.quiet_period_s, release_grace_s,
                                            self.router.quiet_enough, self.router.route)
        self.web = None  # the admin page and API (dicom_ai_node/web), started last
        self._receivers: list[subprocess.Popen] = []  # extra listener processes

    def start(self) -> None:
        if self.leads:
            threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        self.database.wait_until_reachable()
        self.database.upgrade()  # every role: the first to start migrates (an advisory lock on PostgreSQL)
        self.process.beat()
        self.destinations.seed_from_config(self.config.destinations)
        self._load_rules()
        self.notifier.start()
        self.scheduler.start()
        self.scheduler.add_job(self.process.beat, "interval", seconds=cluster.HEARTBEAT_S, id="heartbeat",
                               max_instances=1, coalesce=True)
        self._open_store()
        if self.leads:
            self._start_duties()
        if self.receives:
            self._start_listening()
        if self.config.web.enabled and self.role != "receiver":
            self._start_web()

    def _start_duties(self) -> None:
        """Jobs in this process's executor, and the once-per-node duties behind the leader lease."""
        self.leader.renew()
        self.scheduler.add_job(self.leader.renew, "interval", seconds=cluster.HEARTBEAT_S, id="leader",
                               max_instances=1, coalesce=True)
        if isinstance(self.executor, CeleryExecutor):
            # running jobs belong to the workers (a dead worker's message is redelivered);
            # queued ones are sent again, their messages may be lost, and swept from now on
            self.executor.submit_queued()
            self._add_duty(self.executor.sweep, self.executor.sweep_interval_s, "job-sweep")
        else:
            for job_id in recover_unfinished(self.database, self.name):  # a claim decides who runs each
                self.executor.submit(job_id)
        self._add_duty(self._take_back_orphaned_jobs, cluster.HEARTBEAT_S, "orphaned-jobs")
        self._add_duty(self.outbox.process_due, OUTBOX_INTERVAL_S, "outbox")
        self._add_duty(self.completion.check, CHECK_INTERVAL_S, "completion")
        # prior fetches: a stop interrupted, or whose process died (lease passed): run again
        self._add_duty(self.priors.resume, PRIOR_RESUME_S, "prior-fetches")
        # retention ([retention]): a full run daily, and at once when the disk is above the high watermark
        self.retention = Retention(self.config.retention, self.database, self.storage)
        self._add_duty(self.retention.scheduled, RETENTION_CHECK_S, "retention")

    def _add_duty(self, duty, seconds: float, name: str) -> None:
        def if_leading():
            if self.leader.held():
                return duty()
        self.scheduler.add_job(if_leading, "interval", seconds=seconds, id=name, max_instances=1, coalesce=True)

    def _take_back_orphaned_jobs(self) -> None:
        for job_id in cluster.take_back_orphaned_jobs(self.database, self.name, at_start=False):
            self.executor.submit(job_id)

    def _open_store(self) -> None:
        """This process's incoming folder emptied and its index writer opened, before anything
        stores: the listener, STOW-RS, or a prior's WADO-RS retrieve (role web too)."""
        leftovers = self.storage.clear_incoming()
        if leftovers:
            log.warning("removed %d half-received instances left by an earlier stop (none was "
                        "acknowledged; their senders resend them)", leftovers)
        self.scp.open_index()

    def _start_listening(self) -> None:
        shared_port = self.config.node.receivers > 1
        self.scp.start(shared_port=shared_port)
        if shared_port:
            self._start_receivers()
            self.scheduler.add_job(self._start_receivers, "interval", seconds=5, id="receivers",
                                   max_instances=1, coalesce=True)

    def _start_receivers(self) -> None:
        """Keep receivers-1 extra listener processes running (restarted if one dies)."""
        alive = []
        for process in self._receivers:
            if process.poll() is None:
                alive.append(process)
            else:
                log.error("receiver process %d exited with %s; starting another", process.pid,
                          process.returncode)
        while len(alive) < self.config.node.receivers - 1:
            alive.append(subprocess.Popen([sys.executable, "-m", "dicom_ai_node.receive.worker",
                                           "--config", str(self.config.path), "--port", str(self.config.node.port),
                                           "--incoming", self.storage.incoming.name]))
        self._receivers = alive

    def _stop_receivers(self) -> None:
        for process in self._receivers:
            process.terminate()
        for process in self._receivers:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        self._receivers = []

    def _start_web(self) -> None:
        from dicom_ai_node.web.context import WebContext, load_secret
        from dicom_ai_node.web.server import WebServer

        web = self.config.web
        secret = load_secret(web.session_secret_file or self.config.node.storage_dir / "web-secret.key")
        context = WebContext(config=self.config, database=self.database, rules=self.rules, models=self.models,
                             destinations=self.destinations, secret=secret, submit_job=self.executor.submit,
                             kick_outbox=self._kick_outbox, ready=self._ready,
                             receiver=self.scp)  # STOW-RS stores through it (role web too: its index writer is open)
        self.web = WebServer(context)
        self.web.start()

    def _ready(self) -> dict[str, bool]:
        ready = {"scheduler": self.scheduler.running}
        if self.receives:
            ready["dicom_listener"] = self.scp.running
        return ready

    def _model_device(self, name: str) -> str:
        manifest = self.models.manifests.get(name)
        return manifest.device if manifest is not None else "any"  # the worker fails the job

    def _model_disabled(self, name: str) -> bool:
        with self.database.session() as session:
            return session.get(DisabledModel, name) is not None

    def _load_rules(self) -> None:
        try:
            self.rules.seed_from_config(self.config.rules)
            with self.database.session() as session:
                version, rule_set = self.rules.active(session)
        except RuleError as error:
            raise StartupError(f"{self.config.path}: [[rules]]: {error}") from None
        problems = check_rules(rule_set, self.models.names, self.destinations.names())
        if problems:
            raise StartupError(f"rule set version {version} refers to things this node lacks:\n  "
                               + "\n  ".join(problems))
        log.info("rule set version %d active: %d rules", version, len(rule_set.rules))

    def _kick_outbox(self) -> None:
        # send results now instead of waiting for the next outbox tick (the leader's outbox finds
        # them within OUTBOX_INTERVAL_S anyway; the lease keeps two senders apart)
        if self.leader.held():
            self.scheduler.add_job(self.outbox.process_due, misfire_grace_time=None)

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.scheduler.shutdown(wait=False)  # first: its supervisor would restart receivers
        self._stop_receivers()
        self.scp.stop()
        self.priors.shutdown()
        self.executor.shutdown()
        self.leader.release()
        self.process.remove()
        self.notifier.stop()
        self.database.dispose()
