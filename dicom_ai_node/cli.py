"""dicom-ai-node command line: serve, and look inside (studies, rules, models, resend, held
results, users)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

DEFAULT_CONFIG = "config.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicom-ai-node", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: ./config.toml)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node (DICOM listener, workers, delivery)")
    serve.add_argument("--role", choices=["all", "receiver", "web"], default="all",
                       help="all (default): everything in one process; receiver: the DICOM listener only; "
                            "web: the admin page and API, jobs and the node's duties (completion, routing, "
                            "outbox: one process leads at a time)")
    serve.add_argument("--port", type=int, default=None, help="DICOM port instead of [node] port")

    worker = commands.add_parser("worker", help="run a Celery worker ([workers] executor = \"celery\")")
    worker.add_argument("--queues", default=None,
                        help="comma-separated device queues to take: gpu, cpu, any (default: gpu,any "
                             "on a host with a GPU, else cpu,any)")
    worker.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--torch-threads", type=int, default=None,
                        help="CPU threads of torch in each worker process (default: OMP_NUM_THREADS if set, "
                             "else this host's cores / --concurrency); with several workers on one host, "
                             "its cores / all their processes (docs/benchmarks.md: oversubscribed workers are slower)")

    rules = commands.add_parser("rules", help="routing rules").add_subparsers(dest="action", required=True)
    check = rules.add_parser("check", help="validate a rule file (TOML with [[rules]])")
    check.add_argument("file")
    rules.add_parser("show", help="print the active rule set")

    studies = commands.add_parser("studies", help="what the node received and did").add_subparsers(
        dest="action", required=True)
    listing = studies.add_parser("list", help="recent studies")
    listing.add_argument("--limit", type=int, default=50)
    show = studies.add_parser("show", help="one study: instances, decisions, jobs, results, deliveries")
    show.add_argument("study_uid")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    retract = commands.add_parser("retract", help="take delivered results back: a rejection KOS (IHE IOCM) goes "
                                  "to the destinations that have them; a retry then writes new UIDs (audited)")
    retract.add_argument("--job", type=int, required=True, action="append", help="job id (repeatable)")
    retract.add_argument("--reason", required=True, help="why (written into the KOS and the audit log)")

    resend = commands.add_parser("resend", help="queue results for delivery again")
    target = resend.add_mutually_exclusive_group(required=True)
    target.add_argument("--job", type=int, help="every result of this job")
    target.add_argument("--study", help="every result of this study")
    target.add_argument("--failed", action="store_true", help="every failed delivery")

    destinations = commands.add_parser("destinations", help="pause or resume delivery to a destination").add_subparsers(
        dest="action", required=True)
    destinations.add_parser("list", help="destinations, paused or not, with their pending and failed deliveries")
    for action, what in (("pause", "keep deliveries to it pending (audited)"),
                         ("resume", "send its pending deliveries again (audited)")):
        destinations.add_parser(action, help=what).add_argument("name")

    deliveries = commands.add_parser("deliveries", help="dead letters: deliveries that failed for good"
                                     ).add_subparsers(dest="action", required=True)
    failed = deliveries.add_parser("failed", help="list deliveries that failed for good, with the error")
    failed.add_argument("--destination", default=None)
    retry = deliveries.add_parser("retry", help="make failed deliveries pending again, attempts reset (audited)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="one delivery")
    which.add_argument("--all", action="store_true", help="every failed delivery (of --destination when given)")
    retry.add_argument("--destination", default=None)

    jobs = commands.add_parser("jobs", help="results held by the quality gate").add_subparsers(
        dest="action", required=True)
    jobs.add_parser("held", help="jobs whose results failed their quality checks and wait for review")
    for action, what in (("release", "send the held results after all"), ("reject", "never send the held results")):
        review = jobs.add_parser(action, help=what + " (audited)")
        review.add_argument("job", type=int)
        review.add_argument("--comment", default=None, help="why (kept in the audit log)")

    users = commands.add_parser("users", help="users of the admin page and API (changes are audited)"
                                ).add_subparsers(dest="action", required=True)
    users.add_parser("list", help="users, their roles and whether they are disabled")
    add_user = users.add_parser("add", help="create a user (asks for the password)")
    add_user.add_argument("name")
    add_user.add_argument("--role", choices=["admin", "viewer", "sender"], default="viewer")
    add_user.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    for action, what in (("disable", "refuse its logins, sessions and tokens"), ("enable", "let it log in again"),
                         ("delete", "delete it with its sessions and tokens")):
        users.add_parser(action, help=what).add_argument("name")
    set_role = users.add_parser("role", help="set a user's role")
    set_role.add_argument("name")
    set_role.add_argument("role", choices=["admin", "viewer", "sender"])
    password = users.add_parser("password", help="set a user's password (asks for it); its sessions end")
    password.add_argument("name")
    password.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    tokens = commands.add_parser("tokens", help="API tokens (Authorization: Bearer); changes are audited"
                                 ).add_subparsers(dest="action", required=True)
    for parent, action in ((users, "token"), (tokens, "create")):  # "users token" is the older spelling
        token = parent.add_parser(action, help="create an API token for a user (printed once)")
        token.add_argument("name")
        token.add_argument("--label", default=None, help="what the token is for")
        token.add_argument("--days", type=int, default=None, help="valid for (default 90, at most 365)")
    list_tokens = tokens.add_parser("list", help="tokens: id, prefix, user, label, created, last used, expiry")
    list_tokens.add_argument("--user", default=None, help="only this user's")
    tokens.add_parser("revoke", help="revoke a token by its id (tokens list): refused from now on").add_argument(
        "id", type=int)

    models = commands.add_parser("models", help="installed models").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="installed models")
    model_check = models.add_parser("check", help="validate a model folder or model.toml")
    model_check.add_argument("path")
    model_check.add_argument("--no-run", action="store_true",
                             help="only validate model.toml (default: also load the model and run it "
                                  "on a small synthetic volume)")

    retention = commands.add_parser("retention", help="delete old instances and results ([retention])"
                                    ).add_subparsers(dest="action", required=True)
    retention.add_parser("run", help="run retention now (audited); the node also runs it daily").add_argument(
        "--dry-run", action="store_true", help="only print what would be freed")

    processes = commands.add_parser("processes", help="the node's serve and worker processes, when each was last "
                                    "seen, and which one leads (completion, routing, outbox)")
    processes.add_argument("--check-here", metavar="ROLE", choices=["all", "receiver", "web", "worker"],
                           help="exit 0 only if a process of ROLE on this host was seen alive in the last "
                                "minute (a container health check)")

    commands.add_parser("db", help="database").add_subparsers(dest="action", required=True).add_parser(
        "upgrade", help="apply migrations")

    args = parser.parse_args(argv)
    handler = {"serve": _serve, "worker": _worker, "rules": _rules, "studies": _studies, "resend": _resend, "jobs": _jobs,
               "destinations": _destinations, "deliveries": _deliveries,
               "users": _users, "tokens": _tokens, "models": _models, "db": _db,
               "retention": _retention, "retract": _retract, "processes": _processes}[args.command]
    return handler(args)


def _config(args):
    from dicom_ai_node.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _database(args):
    from dicom_ai_node.db.engine import Database

    database = Database(_config(args).database_url)
    database.upgrade()
    return database


def _serve(args) -> int:
    from dicom_ai_node import logs
    from dicom_ai_node.node import Node, StartupError

    config = _config(args)
    if args.port is not None:
        if not 0 < args.port < 65536:
            print("--port must be a TCP port 1..65535", file=sys.stderr)
            return 2
        config = replace(config, node=replace(config.node, port=args.port))
    logs.configure(config.node.log_level, config.node.log_phi,
                   process_label="" if args.role == "all" else f"{args.role} ")
    node = Node(config, role=args.role)
    # handlers before start: the DICOM port opens early in start(), and a SIGTERM from then on
    # (a supervisor, a test that waits for the port) must stop the node cleanly, not kill it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        node.start()
    except (StartupError, OSError) as error:
        print(f"cannot start: {error}", file=sys.stderr)
        return 2
    if node.receives:
        logging.getLogger(__name__).info("node ready (%s): %s on port %d", args.role, config.node.ae_title,
                                         node.scp.port)
    else:
        logging.getLogger(__name__).info("node ready (%s): web on port %d", args.role, config.web.port)
    while not stop.wait(1.0):
        pass
    node.stop()
    return 0


def _worker(args) -> int:
    from dicom_ai_node import logs
    from dicom_ai_node.jobs.celery_worker import run_worker

    config = _config(args)
    logs.configure(config.node.log_level, config.node.log_phi)
    if args.concurrency < 1 or (args.torch_threads is not None and args.torch_threads < 1):
        print("--concurrency and --torch-threads must be at least 1", file=sys.stderr)
        return 2
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    return run_worker(config, queues, args.concurrency, args.torch_threads)


def _processes(args) -> int:
    import socket

    from sqlalchemy.exc import SQLAlchemyError

    from dicom_ai_node import cluster
    from dicom_ai_node.db.engine import Database
    from dicom_ai_node.db.models import LeaderLease, NodeProcess, as_utc, utcnow

    if args.check_here:  # read only (no migration from a health check), and any failure is "unhealthy"
        try:
            with Database(_config(args).database_url).session() as session:
                here = [process for process in cluster.live_processes(session)
                        if process.name.startswith(f"{socket.gethostname()}/{args.check_here}:")]
        except SQLAlchemyError as error:
            print(f"cannot read the processes: {type(error).__name__}", file=sys.stderr)
            return 1
        print(f"{len(here)} {args.check_here} process(es) alive on this host")
        return 0 if here else 1
    with _database(args).session() as session:
        alive = {process.name for process in cluster.live_processes(session)}
        leader = session.scalar(select(LeaderLease.holder))
        rows = session.scalars(select(NodeProcess).order_by(NodeProcess.role, NodeProcess.name)).all()
        for process in rows:
            seen = int((utcnow() - as_utc(process.last_seen_at)).total_seconds())
            details = f" device {process.device} queues {process.queues} x{process.concurrency}" if process.device else ""
            print(f"{process.name:40} {process.role:8} {'alive' if process.name in alive else 'GONE':5} "
                  f"seen {seen:>6} s ago{details}{'  (leader)' if process.name == leader else ''}")
    if not rows:
        print("no process has registered yet")
    return 0


def _retention(args) -> int:
    from dicom_ai_node.retention import Retention
    from dicom_ai_node.storage import Storage

    config = _config(args)
    storage = Storage(config.node.storage_dir, config.node.min_free_disk_mb * 2**20)
    report = Retention(config.retention, _database(args), storage).run(dry_run=args.dry_run, actor="cli")
    print(report.line() + f"; disk {report.disk_used_percent}% used"
          + ("; more is due, run it again" if report.files_left else ""))
    if not config.retention.enabled:
        print("note: [retention] enabled = false, so the node itself never runs it")
    return 0


def _rules(args) -> int:
    from dicom_ai_node.routing import RuleError, check_rules, load_rules_file

    if args.action == "show":
        from dicom_ai_node.db.models import RuleSetVersion

        database = _database(args)
        with database.session() as session:
            latest = session.scalars(select(RuleSetVersion).order_by(RuleSetVersion.version.desc())).first()
        if latest is None:
            print("no rule set stored yet (the node stores config.toml's rules when it starts)")
            return 0
        print(f"# version {latest.version} by {latest.author} at {latest.created_at:%Y-%m-%d %H:%M}")
        print(latest.text)
        return 0
    try:
        rule_set = load_rules_file(args.file)
    except RuleError as error:
        print(error, file=sys.stderr)
        return 1
    known_models = known_destinations = None
    if Path(args.config).is_file():
        from dicom_ai_node.models import ModelRegistry

        config = _config(args)
        known_models = ModelRegistry(config.model_paths).names
        known_destinations = {d.name for d in config.destinations}
    problems = check_rules(rule_set, known_models, known_destinations)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"{args.file}: {len(rule_set.rules)} rules, valid")
    return 0


def _studies(args) -> int:
    from dicom_ai_node import inspect

    database = _database(args)
    with database.session() as session:
        if args.action == "list":
            print(inspect.format_study_list(inspect.list_studies(session, args.limit)))
            return 0
        detail = inspect.study_detail(session, args.study_uid)
    if detail is None:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    print(json.dumps(detail, indent=2, default=str) if args.json else inspect.format_study(detail))
    return 0


def _resend(args) -> int:
    from dicom_ai_node.deliver.outbox import resend_deliveries

    database = _database(args)
    with database.session() as session:
        count = resend_deliveries(session, "cli", job_id=args.job, study_uid=args.study,
                                  failed=args.failed)
    print(f"{count} deliveries queued again; the running node sends them within a second")
    return 0 if count else 1


def _retract(args) -> int:
    from dicom_ai_node.jobs.retraction import retract_jobs
    from dicom_ai_node.storage import Storage

    config = _config(args)
    storage = Storage(config.node.storage_dir, config.node.min_free_disk_mb * 2**20)
    try:
        outcome = retract_jobs(_database(args), storage, args.job, "cli", args.reason)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    for job_id in outcome.retracted:
        print(f"job {job_id} retracted: its rejection note is queued; the running node sends it within a second")
    for job_id, why in outcome.refused.items():
        print(f"job {job_id} not retracted: {why}", file=sys.stderr)
    return 1 if outcome.refused else 0


def _destinations(args) -> int:
    from dicom_ai_node.deliver import destinations

    database = _database(args)
    if args.action == "list":
        with database.session() as session:
            counts = destinations.delivery_counts(session)
            for row in destinations.list_destinations(session):
                count = counts.get(row.name, {"pending": 0, "failed": 0})
                paused = f"paused by {row.paused_by} at {row.paused_at:%Y-%m-%d %H:%M}" if row.paused_at else "active"
                print(f"{row.name:24} {row.host}:{row.port:<6} {paused:40} pending {count['pending']}, "
                      f"failed {count['failed']}")
        return 0
    try:
        with database.session() as session:
            change = destinations.pause if args.action == "pause" else destinations.resume
            pending = change(session, args.name, "cli")
    except (LookupError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"destination {args.name} {args.action}d: {pending} deliveries wait for it"
          + ("; the running node sends them within a second" if args.action == "resume" else ""))
    return 0


def _deliveries(args) -> int:
    from dicom_ai_node.db.models import Delivery
    from dicom_ai_node.deliver.outbox import dead_letters, resend_deliveries

    database = _database(args)
    if args.action == "failed":
        with database.session() as session:
            letters = dead_letters(session, args.destination, limit=1000)
        for d in letters:
            print(f"delivery {d['id']} to {d['destination']}: job {d['job_id']} {d['kind']} of study "
                  f"{d['study_instance_uid']}, {d['attempts']} attempts\n      {d['error']}")
        if not letters:
            print("no failed deliveries")
        return 0
    with database.session() as session:
        if args.all:
            count = resend_deliveries(session, "cli", failed=True, destination=args.destination)
        elif getattr(session.get(Delivery, args.id), "state", None) != "failed":
            print(f"delivery {args.id} is not a failed delivery", file=sys.stderr)
            return 1
        else:
            count = resend_deliveries(session, "cli", delivery_ids=[args.id])
    print(f"{count} deliveries queued again; the running node sends them within a second")
    return 0 if count else 1


def _jobs(args) -> int:
    from dicom_ai_node.jobs import review

    database = _database(args)
    if args.action == "held":
        with database.session() as session:
            jobs = review.held_jobs(session)
            for job in jobs:
                print(f"job {job.id}: {job.model_name} on study {job.study_instance_uid}\n      {job.reason}")
        if not jobs:
            print("no results are held")
        return 0
    try:
        with database.session() as session:
            if args.action == "release":
                queued = review.release(session, args.job, "cli", args.comment)
                print(f"job {args.job} released: {queued} deliveries queued; the running node sends them "
                      "within a second")
            else:
                review.reject(session, args.job, "cli", args.comment)
                print(f"job {args.job} rejected: its results are never sent")
    except (LookupError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def _users(args) -> int:
    from dicom_ai_node.web import users

    database = _database(args)
    if args.action == "list":
        with database.session() as session:
            for user in users.list_users(session):
                print(f"{user.name:24} {user.role:8} {'disabled' if user.disabled else 'enabled'}")
        return 0
    if args.action == "token":
        return _tokens(args)
    password = None
    if args.action in ("add", "password"):
        password = _read_password(args)
        if password is None:
            return 1
    try:
        with database.session() as session:
            if args.action == "add":
                users.create_user(session, args.name, password, args.role, actor="cli")
                done = f"user {args.name} ({args.role}) created"
            elif args.action == "password":
                users.change_password(session, args.name, password, actor="cli")
                done = f"password of {args.name} changed; its login sessions ended"
            elif args.action in ("disable", "enable"):
                users.set_disabled(session, args.name, args.action == "disable", actor="cli")
                done = f"user {args.name} {args.action}d"
            elif args.action == "role":
                users.set_role(session, args.name, args.role, actor="cli")
                done = f"user {args.name} is now {args.role}"
            else:
                users.delete_user(session, args.name, actor="cli")
                done = f"user {args.name} deleted with its sessions and tokens"
    except users.UserError as error:
        print(error, file=sys.stderr)
        return 1
    print(done)
    return 0


def _read_password(args) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    import getpass

    password = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != password:
        print("the passwords differ", file=sys.stderr)
        return None
    return password


def _tokens(args) -> int:
    from dicom_ai_node.web import users

    database = _database(args)
    try:
        with database.session() as session:
            if args.action == "list":
                for t in users.list_tokens(session, args.user):
                    used = f"{t['last_used_at']:%Y-%m-%d %H:%M}" if t["last_used_at"] else "never"
                    state = "EXPIRED" if t["expired"] else "expires"
                    print(f"{t['id']:5} {t['prefix'] or '(older token)':14} {t['user']:16} "
                          f"created {t['created_at']:%Y-%m-%d %H:%M}  used {used:16} "
                          f"{state} {t['expires_at']:%Y-%m-%d %H:%M}  {t['label'] or ''}")
                return 0
            if args.action == "revoke":
                users.revoke_token(session, args.id, actor="cli")
                print(f"token {args.id} revoked")
                return 0
            token = users.create_token(session, args.name, args.label, actor="cli", days=args.days)
    except users.UserError as error:
        print(error, file=sys.stderr)
        return 1
    print(token)  # shown once: only its hash is stored
    return 0


def _models(args) -> int:
    from model_zoo.manifest import ManifestError, load_manifest

    if args.action == "check":
        try:
            manifest = load_manifest(args.path)
        except ManifestError as error:
            print(error, file=sys.stderr)
            return 1
        print(f"{manifest.path}: {manifest.name} {manifest.version} ({manifest.task}), manifest valid")
        if args.no_run:
            return 0
        return _model_smoke_test(manifest)
    from dicom_ai_node.models import ModelRegistry

    config_paths = _config(args).model_paths if Path(args.config).is_file() else ()
    registry = ModelRegistry(config_paths)
    for name in sorted(registry.manifests):
        manifest = registry.manifests[name]
        print(f"{name:24} {manifest.version:10} {manifest.task:15} {', '.join(manifest.input.modality):8} "
              f"{manifest.folder}")
    for problem in registry.problems:
        print(f"NOT INSTALLED: {problem}", file=sys.stderr)
    return 0


def _model_smoke_test(manifest) -> int:
    """Load the model and run it once on a small synthetic CT-like volume that fits [input]."""
    import time

    import numpy as np

    from dicom_ai_node.imaging.volume import SourceFrame, Volume
    from model_zoo import registry
    from model_zoo.base import ModelOutput

    low, high = manifest.input.spacing_mm
    spacing = tuple(float(min(max(s, low), high)) for s in (2.5, 1.5, 1.5))
    slices = max(manifest.input.min_slices, 16)
    shape = (slices, 64, 64)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    rng = np.random.default_rng(0)
    pixels = np.where(y ** 2 + x ** 2 < 0.7, 40.0, -1000.0) + rng.normal(0, 10, shape)
    pixels[(y ** 2 / 0.3 + (np.abs(x) - 0.35) ** 2 / 0.05) < 1] = -850.0
    frames = [SourceFrame(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", f"slice{i}.dcm") for i in range(slices)]
    volume = Volume(pixels=pixels.astype(np.float32), origin=np.zeros(3), row_direction=np.array([1.0, 0, 0]),
                    column_direction=np.array([0, 1.0, 0]), slice_direction=np.array([0, 0, 1.0]),
                    spacing=spacing, source_frames=frames, modality=manifest.input.modality[0],
                    attributes={"Modality": manifest.input.modality[0]})
    started = time.perf_counter()
    try:
        model = registry.load_model(manifest)
        loaded = time.perf_counter()
        output = model.predict(volume)
    except Exception as error:  # the point is to show the site what went wrong
        print(f"{manifest.path}: loading or running the model failed: {type(error).__name__}: {error}",
              file=sys.stderr)
        return 1
    problems = []
    if not isinstance(output, ModelOutput):
        problems.append(f"predict returned {type(output).__name__}, not ModelOutput")
    else:
        for segment in output.segments:
            if segment.mask.shape != volume.shape:
                problems.append(f"segment {segment.name!r}: mask shape {segment.mask.shape} != {volume.shape}")
        for kind, items in (("segment", output.segments), ("measurement", output.measurements),
                            ("finding", output.findings)):
            for item in items:
                try:
                    getattr(manifest, kind)(item.name)
                except Exception as error:
                    problems.append(str(error))
        if output.derived_pixels is not None and output.derived_pixels.shape != volume.shape:
            problems.append(f"derived_pixels shape {output.derived_pixels.shape} != {volume.shape}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    summary = (f"{len(output.segments)} segments, {len(output.measurements)} measurements, "
               f"{len(output.findings)} findings" + (", derived image" if output.derived_pixels is not None else ""))
    print(f"loaded in {loaded - started:.1f}s, ran on a {'x'.join(map(str, shape))} test volume in "
          f"{time.perf_counter() - loaded:.1f}s: {summary}")
    return 0


def _db(args) -> int:
    _database(args)
    print("database schema is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
