"""Typed configuration read from config.toml.

Every value is checked at start-up; a wrong config is refused with the file, the key and what
is wrong (``ConfigError``), so a node never starts half-configured. Relative paths are taken
relative to the config file's folder. Environment variables override the file, for
containers: DICOM_AI_NODE_DATABASE_URL, DICOM_AI_NODE_STORAGE_DIR and (executor "celery")
DICOM_AI_NODE_BROKER_URL.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dicom_ai_node.routing.rules import QC_FAIL_POLICIES


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class AllowedCaller:
    ae_title: str
    host: str | None = None  # None: any host


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # when set, peers must present a certificate signed by it


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "AI_NODE"
    host: str = "127.0.0.1"
    port: int = 11112
    storage_dir: Path = Path("var/storage")
    log_level: str = "INFO"
    log_phi: bool = False  # patient names/IDs stay out of logs unless a site turns this on
    min_free_disk_mb: int = 200
    complete_on_release: bool = True  # a study may complete soon after its association ends
    release_grace_s: float = 1.0
    allow_any_caller: bool = False
    allow_any_called_ae: bool = False  # False: only associations addressed to ae_title
    association_timeout_s: float = 30.0  # ARTIM: a connection must be associated within this
    max_pending_connections: int = 128  # connections not yet associated, in all ...
    max_pending_per_address: int = 16  # ... and from one address; the excess is closed at once
    receivers: int = 1  # listener processes sharing the port (SO_REUSEPORT); >1 uses more cores
    allowed_callers: tuple[AllowedCaller, ...] = ()
    tls: TlsConfig | None = None


DESTINATION_KINDS = ("dimse", "dicomweb")
DICOMWEB_AUTH = ("none", "basic", "bearer")


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    ae_title: str | None = None  # dimse: ae_title, host and port required
    host: str | None = None
    port: int | None = None
    calling_ae_title: str | None = None  # default: the node's AE title
    max_attempts: int = 5
    backoff_s: float = 2.0  # first retry after this, doubling each time
    timeout_s: float = 30.0
    tls: TlsConfig | None = None
    kind: str = "dimse"  # "dimse" (C-STORE; as a priors source C-FIND/C-MOVE) or "dicomweb" (STOW-RS; QIDO-RS/WADO-RS)
    # dicomweb: the base URL (no credentials, query or fragment in it), auth "none" | "basic" |
    # "bearer"; the password or token is read at each send from secret_file or the environment
    # variable secret_env, never stored in the database, so a rotated secret needs no restart
    url: str | None = None
    auth: str = "none"
    username: str | None = None
    secret_file: Path | None = None
    secret_env: str | None = None
    verify_tls: bool = True  # https: check the server's certificate (against ca_file when set)
    ca_file: Path | None = None


@dataclass(frozen=True)
class WebConfig:
    """The admin page and REST API, served inside `dicom-ai-node serve`."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default: put a TLS reverse proxy in front to open it up
    port: int = 8080
    session_secret_file: Path | None = None  # default: <storage_dir>/web-secret.key, made at start
    session_hours: float = 12.0


@dataclass(frozen=True)
class DicomwebConfig:
    """[dicomweb]: STOW-RS in (web/stow.py), on the admin web server, for users with an API token."""

    stow_enabled: bool = False  # POST /dicom-web/studies[/{study}]
    max_part_mb: int = 1024  # one instance (a part); a bigger one fails with A700, the rest go on
    max_request_mb: int = 16384  # one request; a bigger one is refused with 413
    request_timeout_s: float = 3600.0  # the whole upload; a slower one is cut off (408)


@dataclass(frozen=True)
class CeleryConfig:
    """[workers] with executor = "celery": jobs go to worker processes through a broker."""

    broker_url: str  # e.g. amqp://user:password@rabbitmq:5672// (env DICOM_AI_NODE_BROKER_URL)
    # the longest a job may run: the task's time limit, and what the broker's ack (visibility)
    # timeout must exceed; RabbitMQ's consumer_timeout is 30 min by default
    job_timeout_s: float = 1500.0
    requeue_after_s: float = 300.0  # a job still queued this long after it was sent is sent again


# what [[notify]] targets can ask for (dicom_ai_node/notify)
NOTIFY_EVENTS = ("job_failed", "delivery_failed", "result_held", "disk_high", "association_refused")


@dataclass(frozen=True)
class NotifyConfig:
    """One [[notify]] target: a webhook (JSON POST, HMAC-SHA256 signed) or an e-mail (SMTP)."""

    name: str
    kind: str  # "webhook" | "email"
    events: tuple[str, ...]
    include_phi: bool = False  # patient name/ID in the message only when a site sets this
    timeout_s: float = 10.0  # each network step
    # webhook
    url: str = ""
    secret: str = field(default="", repr=False)  # HMAC key; empty: unsigned
    retries: int = 3  # attempts after the first
    backoff_s: float = 2.0  # first retry after this, doubling
    # email
    smtp_host: str = ""
    smtp_port: int = 587
    starttls: bool = True
    user: str = ""
    password: str = field(default="", repr=False)
    from_addr: str = ""
    to: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: when stored files and their index rows are deleted (dicom_ai_node/retention.py).
    Days count from when a study settled: its last instance received, its last job finished and
    its last delivery sent or given up."""

    enabled: bool = True
    instances_days: float = 30.0  # received instances
    results_days: float = 90.0  # result objects the node wrote (and their delivery rows)
    failed_days: float = 180.0  # both, for a study with a failed job or a failed delivery
    high_watermark_percent: float = 90.0  # disk use above this: clean up early, oldest first ...
    low_watermark_percent: float = 80.0  # ... until below this


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeConfig
    database_url: str
    quiet_period_s: float
    workers: int
    executor: str  # "local" (a thread pool in the node) or "celery" (worker processes)
    model_paths: tuple[Path, ...]
    destinations: tuple[DestinationConfig, ...]
    rules: list = field(default_factory=list)  # raw [[rules]] tables, parsed by dicom_ai_node.routing
    web: WebConfig = field(default_factory=WebConfig)
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)  # [dicomweb]
    # [qc] on_fail: what happens to a result that fails its model's quality checks when the
    # routing rule has no qc_fail of its own (hold | send_flagged | drop)
    qc_on_fail: str = "hold"
    celery: CeleryConfig | None = None  # set when executor = "celery"
    notify: tuple[NotifyConfig, ...] = ()  # [[notify]] targets
    retention: RetentionConfig = field(default_factory=RetentionConfig)  # [retention]

    def destination(self, name: str) -> DestinationConfig:
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)


class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str):
        raise ConfigError(f"{self.path}: {key}: {problem}")

    def get(self, table: dict, key: str, where: str, kind, default=..., check=None, problem=""):
        name = f"{where}.{key}" if where else key
        if key not in table:
            if default is ...:
                self.fail(name, "is required")
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            self.fail(name, f"must be {_kind_name(kind)}, got {value!r}")
        if check is not None and not check(value):
            self.fail(name, f"{problem}, got {value!r}")
        return value

    def unknown_keys(self, table: dict, allowed: set[str], where: str):
        extra = sorted(set(table) - allowed)
        if extra:
            self.fail(f"{where}.{extra[0]}" if where else extra[0],
                      f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else (self.path.parent / path)

    def tls(self, table: dict, where: str) -> TlsConfig | None:
        raw = self.get(table, "tls", where, dict, default=None)
        if raw is None or not raw.get("enabled", True):
            return None
        self.unknown_keys(raw, {"enabled", "cert_file", "key_file", "ca_file"}, f"{where}.tls")
        files = {}
        for key in ("cert_file", "key_file", "ca_file"):
            value = self.get(raw, key, f"{where}.tls", str, default=None if key == "ca_file" else ...)
            if value is not None:
                files[key] = self.resolve(value)
                if not files[key].is_file():
                    self.fail(f"{where}.tls.{key}", f"file not found: {files[key]}")
        return TlsConfig(**files)


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a table", list: "a list"}
    return names.get(kind, str(kind))


def _ae_title_ok(value: str) -> bool:
    return 0 < len(value.strip()) <= 16 and value.isascii() and "\\" not in value


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    read = _Reader(path)
    read.unknown_keys(tree, {"node", "database", "completion", "workers", "models",
                             "destinations", "rules", "web", "qc", "notify", "retention", "dicomweb"}, "")

    raw = read.get(tree, "node", "", dict, default={})
    read.unknown_keys(raw, {"ae_title", "host", "port", "storage_dir", "log_level", "log_phi",
                            "min_free_disk_mb", "complete_on_release", "release_grace_s",
                            "allow_any_caller", "allowed_callers", "tls", "receivers",
                            "allow_any_called_ae", "association_timeout_s", "max_pending_connections",
                            "max_pending_per_address"}, "node")
    callers = []
    for i, item in enumerate(read.get(raw, "allowed_callers", "node", list, default=[])):
        where = f"node.allowed_callers[{i}]"
        if not isinstance(item, dict):
            read.fail(where, "must be a table like { ae_title = \"CT01\", host = \"10.0.0.5\" }")
        read.unknown_keys(item, {"ae_title", "host"}, where)
        callers.append(AllowedCaller(
            ae_title=read.get(item, "ae_title", where, str, check=_ae_title_ok,
                              problem="must be 1..16 ASCII characters"),
            host=read.get(item, "host", where, str, default=None)))
    levels = {"DEBUG", "INFO", "WARNING", "ERROR"}
    node = NodeConfig(
        ae_title=read.get(raw, "ae_title", "node", str, "AI_NODE", _ae_title_ok,
                          "must be 1..16 ASCII characters"),
        host=read.get(raw, "host", "node", str, "127.0.0.1"),
        port=read.get(raw, "port", "node", int, 11112, lambda p: 0 < p < 65536,
                      "must be a TCP port 1..65535"),
        storage_dir=read.resolve(read.get(raw, "storage_dir", "node", str, "var/storage")),
        log_level=read.get(raw, "log_level", "node", str, "INFO", lambda v: v.upper() in levels,
                           f"must be one of {sorted(levels)}").upper(),
        log_phi=read.get(raw, "log_phi", "node", bool, False),
        min_free_disk_mb=read.get(raw, "min_free_disk_mb", "node", int, 200, lambda v: v >= 0,
                                  "must be >= 0"),
        complete_on_release=read.get(raw, "complete_on_release", "node", bool, True),
        release_grace_s=read.get(raw, "release_grace_s", "node", float, 1.0, lambda v: v >= 0,
                                 "must be >= 0"),
        allow_any_caller=read.get(raw, "allow_any_caller", "node", bool, False),
        allow_any_called_ae=read.get(raw, "allow_any_called_ae", "node", bool, False),
        association_timeout_s=read.get(raw, "association_timeout_s", "node", float, 30.0,
                                       lambda v: 0 < v <= 3600, "must be > 0 and <= 3600"),
        max_pending_connections=read.get(raw, "max_pending_connections", "node", int, 128,
                                         lambda v: v >= 1, "must be >= 1"),
        max_pending_per_address=read.get(raw, "max_pending_per_address", "node", int, 16,
                                         lambda v: v >= 1, "must be >= 1"),
        receivers=read.get(raw, "receivers", "node", int, 1, lambda v: 1 <= v <= 16, "must be 1..16"),
        allowed_callers=tuple(callers),
        tls=read.tls(raw, "node"),
    )
    if not node.allow_any_caller and not node.allowed_callers:
        read.fail("node.allowed_callers", "is empty: no scanner could send; list the calling AE "
                  "titles or set allow_any_caller = true")

    raw = read.get(tree, "database", "", dict, default={})
    read.unknown_keys(raw, {"url"}, "database")
    database_url = read.get(raw, "url", "database", str, "sqlite:///var/node.db")
    if database_url.startswith("sqlite:///") and not database_url.startswith("sqlite:////"):
        # relative SQLite paths are relative to the config file, like every other path
        database_url = "sqlite:///" + str(read.resolve(database_url[len("sqlite:///"):]))
    if not (database_url.startswith("sqlite") or database_url.startswith("postgresql")):
        read.fail("database.url", f"must be a sqlite:/// or postgresql:// URL, got {database_url!r}")

    raw = read.get(tree, "completion", "", dict, default={})
    read.unknown_keys(raw, {"quiet_period_s"}, "completion")
    quiet = read.get(raw, "quiet_period_s", "completion", float, 5.0, lambda v: 0 <= v <= 86400,
                     "must be between 0 and 86400 seconds")

    raw = read.get(tree, "workers", "", dict, default={})
    read.unknown_keys(raw, {"count", "executor", "broker_url", "job_timeout_s", "requeue_after_s"}, "workers")
    workers = read.get(raw, "count", "workers", int, 1, lambda v: 1 <= v <= 64, "must be 1..64")
    executor = read.get(raw, "executor", "workers", str, "local", lambda v: v in ("local", "celery"),
                        "must be 'local' or 'celery'")
    celery = None
    if executor == "celery":
        broker_url = os.environ.get("DICOM_AI_NODE_BROKER_URL") or read.get(
            raw, "broker_url", "workers", str, check=lambda v: "://" in v,
            problem="must be a broker URL such as amqp://user:password@host:5672//")
        celery = CeleryConfig(
            broker_url=broker_url,
            job_timeout_s=read.get(raw, "job_timeout_s", "workers", float, 1500.0, lambda v: 10 <= v <= 7 * 86400,
                                   "must be between 10 seconds and 7 days"),
            requeue_after_s=read.get(raw, "requeue_after_s", "workers", float, 300.0, lambda v: v > 0,
                                     "must be > 0"))

    raw = read.get(tree, "models", "", dict, default={})
    read.unknown_keys(raw, {"paths"}, "models")
    model_paths = []
    for i, value in enumerate(read.get(raw, "paths", "models", list, default=[])):
        if not isinstance(value, str):
            read.fail(f"models.paths[{i}]", f"must be a string, got {value!r}")
        folder = read.resolve(value)
        if not folder.is_dir():
            read.fail(f"models.paths[{i}]", f"folder not found: {folder}")
        model_paths.append(folder)

    destinations = [_destination(read, item, f"destinations[{i}]")
                    for i, item in enumerate(read.get(tree, "destinations", "", list, default=[]))]
    names = [d.name for d in destinations]
    for name in names:
        if names.count(name) > 1:
            read.fail("destinations", f"duplicate destination name {name!r}")

    rules = read.get(tree, "rules", "", list, default=[])

    raw = read.get(tree, "web", "", dict, default={})
    read.unknown_keys(raw, {"enabled", "host", "port", "session_secret_file", "session_hours"}, "web")
    secret_file = read.get(raw, "session_secret_file", "web", str, default=None)
    web = WebConfig(
        enabled=read.get(raw, "enabled", "web", bool, True),
        host=read.get(raw, "host", "web", str, "127.0.0.1"),
        port=read.get(raw, "port", "web", int, 8080, lambda p: 0 < p < 65536,
                      "must be a TCP port 1..65535"),
        session_secret_file=read.resolve(secret_file) if secret_file else None,
        session_hours=read.get(raw, "session_hours", "web", float, 12.0, lambda v: v > 0,
                               "must be > 0"),
    )

    raw = read.get(tree, "dicomweb", "", dict, default={})
    read.unknown_keys(raw, {"stow_enabled", "max_part_mb", "max_request_mb", "request_timeout_s"}, "dicomweb")
    dicomweb = DicomwebConfig(
        stow_enabled=read.get(raw, "stow_enabled", "dicomweb", bool, False),
        max_part_mb=read.get(raw, "max_part_mb", "dicomweb", int, 1024, lambda v: v >= 1, "must be >= 1"),
        max_request_mb=read.get(raw, "max_request_mb", "dicomweb", int, 16384, lambda v: v >= 1, "must be >= 1"),
        request_timeout_s=read.get(raw, "request_timeout_s", "dicomweb", float, 3600.0, lambda v: v > 0,
                                   "must be > 0"))

    raw = read.get(tree, "qc", "", dict, default={})
    read.unknown_keys(raw, {"on_fail"}, "qc")
    qc_on_fail = read.get(raw, "on_fail", "qc", str, "hold", lambda v: v in QC_FAIL_POLICIES,
                          f"must be one of {', '.join(QC_FAIL_POLICIES)}")

    notify = _notify_targets(read, read.get(tree, "notify", "", list, default=[]))

    raw = read.get(tree, "retention", "", dict, default={})
    read.unknown_keys(raw, {"enabled", "instances_days", "results_days", "failed_days",
                            "high_watermark_percent", "low_watermark_percent"}, "retention")
    days = {key: read.get(raw, key, "retention", float, getattr(RetentionConfig, key), lambda v: v >= 1,
                          "must be at least 1 day") for key in ("instances_days", "results_days", "failed_days")}
    marks = {key: read.get(raw, key, "retention", float, getattr(RetentionConfig, key), lambda v: 0 < v <= 100,
                           "must be a percentage above 0 and at most 100")
             for key in ("high_watermark_percent", "low_watermark_percent")}
    if marks["low_watermark_percent"] >= marks["high_watermark_percent"]:
        read.fail("retention.low_watermark_percent", "must be below high_watermark_percent")
    retention = RetentionConfig(enabled=read.get(raw, "enabled", "retention", bool, True), **days, **marks)

    storage_override = os.environ.get("DICOM_AI_NODE_STORAGE_DIR")
    if storage_override:
        node = NodeConfig(**{**node.__dict__, "storage_dir": Path(storage_override)})
    database_url = os.environ.get("DICOM_AI_NODE_DATABASE_URL", database_url)

    return Config(path=path, node=node, database_url=database_url, quiet_period_s=quiet,
                  workers=workers, executor=executor, model_paths=tuple(model_paths),
                  destinations=tuple(destinations), rules=rules, web=web, qc_on_fail=qc_on_fail,
                  celery=celery, notify=notify, retention=retention, dicomweb=dicomweb)


DESTINATION_COMMON = {"name", "kind", "max_attempts", "backoff_s", "timeout_s"}


def _destination(read: _Reader, item, where: str) -> DestinationConfig:
    if not isinstance(item, dict):
        read.fail(where, "must be a table ([[destinations]])")
    kind = read.get(item, "kind", where, str, "dimse", lambda v: v in DESTINATION_KINDS,
                    f"must be one of {', '.join(DESTINATION_KINDS)}")
    common = dict(
        name=read.get(item, "name", where, str, check=lambda v: v.strip() != "", problem="must not be empty"),
        kind=kind,
        max_attempts=read.get(item, "max_attempts", where, int, 5, lambda v: v >= 1, "must be >= 1"),
        backoff_s=read.get(item, "backoff_s", where, float, 2.0, lambda v: v >= 0, "must be >= 0"),
        timeout_s=read.get(item, "timeout_s", where, float, 30.0, lambda v: v > 0, "must be > 0"))
    if kind == "dimse":
        read.unknown_keys(item, DESTINATION_COMMON | {"ae_title", "host", "port", "calling_ae_title", "tls"}, where)
        return DestinationConfig(
            **common,
            ae_title=read.get(item, "ae_title", where, str, check=_ae_title_ok,
                              problem="must be 1..16 ASCII characters"),
            host=read.get(item, "host", where, str),
            port=read.get(item, "port", where, int, check=lambda p: 0 < p < 65536,
                          problem="must be a TCP port 1..65535"),
            calling_ae_title=read.get(item, "calling_ae_title", where, str, None, _ae_title_ok,
                                      "must be 1..16 ASCII characters"),
            tls=read.tls(item, where))
    read.unknown_keys(item, DESTINATION_COMMON | {"url", "auth", "username", "password_file", "password_env",
                                                  "token_file", "token_env", "verify_tls"}, where)
    url = read.get(item, "url", where, str, check=dicomweb_url_problem_free,
                   problem="must be an http:// or https:// base URL without user:password@, query or fragment "
                           "(credentials go in password_file/token_file)").rstrip("/")
    auth = read.get(item, "auth", where, str, "none", lambda v: v in DICOMWEB_AUTH,
                    f"must be one of {', '.join(DICOMWEB_AUTH)}")
    secret_keys = {"basic": ("password_file", "password_env"), "bearer": ("token_file", "token_env"),
                   "none": ()}[auth]
    for key in {"username", "password_file", "password_env", "token_file", "token_env"} - set(secret_keys):
        if key in item and not (key == "username" and auth == "basic"):
            read.fail(f"{where}.{key}", f"does not go with auth = {auth!r}")
    username = secret_file = secret_env = None
    if auth != "none":
        if auth == "basic":
            username = read.get(item, "username", where, str, check=lambda v: v != "" and ":" not in v,
                                problem="must be a non-empty user name without ':'")
        given = [key for key in secret_keys if key in item]
        if len(given) != 1:
            read.fail(f"{where}.{secret_keys[0]}", f"auth = {auth!r} needs exactly one of "
                      f"{' or '.join(secret_keys)} (the secret itself never goes in config.toml)")
        if given[0].endswith("_file"):
            secret_file = read.resolve(read.get(item, given[0], where, str))
            if not secret_file.is_file():
                read.fail(f"{where}.{given[0]}", f"file not found: {secret_file}")
        else:
            secret_env = read.get(item, given[0], where, str, check=lambda v: v in os.environ,
                                  problem="names no environment variable that is set")
        if urlsplit(url).scheme == "http" and urlsplit(url).hostname not in ("127.0.0.1", "::1", "localhost"):
            read.fail(f"{where}.url", "sends credentials in clear over http://; use https:// "
                      "(plain http only to a loopback address)")
    verify = item.get("verify_tls", True)
    if not isinstance(verify, (bool, str)) or verify == "":
        read.fail(f"{where}.verify_tls", f"must be true, false or a CA certificate file, got {verify!r}")
    ca_file = None
    if isinstance(verify, str):  # a CA file: trust only the certificates it signed
        ca_file = read.resolve(verify)
        if not ca_file.is_file():
            read.fail(f"{where}.verify_tls", f"file not found: {ca_file}")
    return DestinationConfig(**common, url=url, auth=auth, username=username, secret_file=secret_file,
                             secret_env=secret_env, verify_tls=verify is not False, ca_file=ca_file)


def dicomweb_url_problem_free(value: str) -> bool:
    """A DICOMweb base URL the node may store, show and log: http(s), a host, and nothing secret
    (no user:password@, no query string that might carry a token)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and not parts.query and not parts.fragment and value.isascii() and value.isprintable()
            and " " not in value and len(value) <= 2048)


def _url_ok(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _notify_targets(read: _Reader, items: list) -> tuple[NotifyConfig, ...]:
    targets = []
    for i, item in enumerate(items):
        where = f"notify[{i}]"
        if not isinstance(item, dict):
            read.fail(where, "must be a table ([[notify]])")
        kind = read.get(item, "kind", where, str, check=lambda v: v in ("webhook", "email"),
                        problem="must be 'webhook' or 'email'")
        common = {"kind", "name", "events", "include_phi", "timeout_s"}
        if kind == "webhook":
            read.unknown_keys(item, common | {"url", "secret", "retries", "backoff_s"}, where)
        else:
            read.unknown_keys(item, common | {"smtp_host", "smtp_port", "starttls", "user", "password",
                                              "from", "to"}, where)
        events = read.get(item, "events", where, list, check=lambda v: len(v) > 0,
                          problem=f"must list at least one of {', '.join(NOTIFY_EVENTS)}")
        for event in events:
            if event not in NOTIFY_EVENTS:
                read.fail(f"{where}.events", f"unknown event {event!r} (known: {', '.join(NOTIFY_EVENTS)})")
        values = {
            "name": read.get(item, "name", where, str, f"{kind}-{i + 1}", lambda v: v.strip() != "",
                             "must not be empty"),
            "kind": kind, "events": tuple(dict.fromkeys(events)),
            "include_phi": read.get(item, "include_phi", where, bool, False),
            "timeout_s": read.get(item, "timeout_s", where, float, 10.0, lambda v: 0 < v <= 300,
                                  "must be > 0 and <= 300")}
        if kind == "webhook":
            values.update(
                url=read.get(item, "url", where, str, check=_url_ok,
                             problem="must be an http:// or https:// URL with a host"),
                secret=read.get(item, "secret", where, str, ""),
                retries=read.get(item, "retries", where, int, 3, lambda v: 0 <= v <= 10, "must be 0..10"),
                backoff_s=read.get(item, "backoff_s", where, float, 2.0, lambda v: 0 <= v <= 600,
                                   "must be 0..600"))
        else:
            to = read.get(item, "to", where, list, check=lambda v: len(v) > 0,
                          problem="must list at least one address")
            for address in to:
                if not isinstance(address, str) or "@" not in address:
                    read.fail(f"{where}.to", f"not an e-mail address: {address!r}")
            values.update(
                smtp_host=read.get(item, "smtp_host", where, str, check=lambda v: v.strip() != "",
                                   problem="must not be empty"),
                smtp_port=read.get(item, "smtp_port", where, int, 587, lambda p: 0 < p < 65536,
                                   "must be a TCP port 1..65535"),
                starttls=read.get(item, "starttls", where, bool, True),
                user=read.get(item, "user", where, str, ""),
                password=read.get(item, "password", where, str, ""),
                from_addr=read.get(item, "from", where, str, check=lambda v: "@" in v,
                                   problem="must be an e-mail address"),
                to=tuple(to))
        targets.append(NotifyConfig(**values))
    names = [t.name for t in targets]
    for name in names:
        if names.count(name) > 1:
            read.fail("notify", f"duplicate target name {name!r}")
    return tuple(targets)
