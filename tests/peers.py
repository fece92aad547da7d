"""Real DICOM peers for integration tests: Orthanc as the PACS, dcmtk as the scanner.

Everything here runs on loopback (127.0.0.1) only, every wait is bounded, and every child
process is stopped by its own PID (SIGTERM, then SIGKILL after a timeout) and reaped.

Using the fixtures from a test module::

    from tests.peers import orthanc  # noqa: F401   (pytest finds the fixture by name)

or once for the whole suite, in tests/conftest.py::

    from tests.peers import orthanc, orthanc_factory  # noqa: F401

API summary
-----------
- ``free_port()``: a free TCP port on 127.0.0.1.
- ``OrthancPeer(node_aet, node_host, node_port)``: Orthanc 1.10 child process with its own temp
  storage, a DicomModalities entry ``"node"`` for our node, the DICOMweb plugin when it loads,
  HTTP basic auth when ``users`` are given.
  ``start()``/``stop()``/context manager; ``rest_get``, ``rest_post``, ``instances``, ``studies``,
  ``find_study``, ``study_series``, ``instance_file``, ``upload``, ``store_to_modality``,
  ``wait_for``, ``wait_for_instances``.
- ``StorescpPeer(aet, port, out_dir)``: dcmtk storescp writing what it receives to a folder.
- ``storescu(...)``, ``echoscu(...)``: dcmtk SCUs with ``TCP_NODELAY=1`` and bounded timeouts.
- ``parse_storescu_output(text)``: per-file outcome of a ``storescu -v`` run.
- ``skip_unless_tools(*names)``: a ``pytest.mark.skipif`` for absent binaries.
- ``write_tiny_ct(path, ...)``: a small valid CT image file (8x8, 16-bit, Explicit VR LE).
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import pytest

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
ORTHANC_BIN = os.environ.get("DICOM_AI_NODE_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

# Debian's dcmtk build leaves Nagle on; dcmtk receivers then stall ~50 ms per C-STORE response
# (see ../shared/notes/receive-baseline.md). Every dcmtk program (and Orthanc, built on dcmtk)
# gets TCP_NODELAY=1.
_DCMTK_ENV_EXTRA = {"TCP_NODELAY": "1"}


def _dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_DCMTK_ENV_EXTRA)
    return env


# --------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def skip_unless_tools(*names: str) -> pytest.MarkDecorator:
    """``pytest.mark.skipif`` that skips when any named binary is absent.

    A name may be a bare program (looked up on PATH) or an absolute path.
    """
    missing = [n for n in names if not (Path(n).is_file() if os.path.isabs(n) else shutil.which(n))]
    return pytest.mark.skipif(bool(missing), reason=f"binaries not installed: {', '.join(missing)}")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes.

    Raises ``TimeoutError`` naming ``what`` and the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - reported if we time out
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(lines[-n:])


def _stop_process(proc: subprocess.Popen | None, timeout: float = 10.0,
                  graceful: bool = True) -> None:
    """SIGTERM the process by PID, SIGKILL after ``timeout``, always reap.

    ``graceful=False`` sends SIGKILL straight away (for throw-away peers whose data is deleted).
    """
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
        pass


# Safety net: peers still running at interpreter exit are stopped by PID.
_LIVE: set[Any] = set()


@atexit.register
def _stop_leftovers() -> None:  # pragma: no cover - only runs when a test forgot stop()
    for peer in list(_LIVE):
        try:
            peer.stop()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------------
# Orthanc


class OrthancError(RuntimeError):
    pass


class OrthancPeer:
    """A private Orthanc 1.10 on loopback: the PACS of our integration tests.

    ``node_aet``/``node_host``/``node_port`` name our node; it is registered in
    DicomModalities as ``"node"`` so ``store_to_modality()`` (or a C-MOVE) can push to it.
    """

    def __init__(self, node_aet: str = "DICOM_AI_NODE", node_host: str = LOOPBACK,
                 node_port: int | None = None, *, aet: str = "ORTHANC",
                 dicom_port: int | None = None, http_port: int | None = None,
                 workdir: str | os.PathLike | None = None, dicomweb: bool = True,
                 extra_config: dict[str, Any] | None = None, start_timeout: float = 30.0,
                 users: dict[str, str] | None = None):
        self.node_aet = node_aet
        self.node_host = node_host
        self.node_port = node_port if node_port is not None else free_port()
        self.aet = aet
        self.host = LOOPBACK
        self._auto_ports = dicom_port is None and http_port is None
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="orthanc-peer-"))
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self.want_dicomweb = dicomweb
        self.dicomweb_loaded = False
        self.extra_config = extra_config or {}
        # HTTP basic auth on (REST and DICOMweb): user -> password; our own REST calls log in
        # as the first user
        self.users = users or {}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def config(self, dicomweb: bool) -> dict[str, Any]:
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # Orthanc then answers loopback only
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "OverwriteInstances": True,
            "DicomModalities": {"node": [self.node_aet, self.node_host, self.node_port]},
            "StableAge": 1,
            "SaveJobs": False,
            "HttpTimeout": 30,
            "DicomScuTimeout": 30,
            "ExecuteLuaEnabled": False,
            "Plugins": [],
        }
        if dicomweb:
            cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "Host": self.host, "Ssl": False}
        if self.users:
            cfg["AuthenticationEnabled"], cfg["RegisteredUsers"] = True, dict(self.users)
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> "OrthancPeer":
        if self.proc is not None:
            raise OrthancError("already started")
        if not Path(ORTHANC_BIN).is_file():
            raise OrthancError(f"Orthanc not installed at {ORTHANC_BIN}")
        use_dicomweb = self.want_dicomweb and DICOMWEB_PLUGIN.exists()
        for attempt in range(4):
            try:
                self._launch(use_dicomweb)
                break
            except OrthancError as exc:
                if attempt == 3:
                    raise
                if "already in use" in str(exc) and self._auto_ports:
                    # free_port() raced with another process: pick new ports and retry
                    self.dicom_port, self.http_port = free_port(), free_port()
                elif use_dicomweb:
                    # The plugin must never cost us the PACS: retry without it.
                    use_dicomweb = False
                else:
                    raise
        self.dicomweb_loaded = use_dicomweb and "dicom-web" in self.rest_get("/plugins")
        return self

    def _launch(self, dicomweb: bool) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(dicomweb), indent=2))
        with open(self.log_path, "ab") as log:
            log.write(f"---- starting Orthanc (dicomweb={dicomweb})\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [ORTHANC_BIN, f"--logfile={self.log_path}", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_dcmtk_env(), cwd=self.workdir, start_new_session=True,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                _LIVE.discard(self)
                raise OrthancError(f"Orthanc exited with {rc} during startup; log tail:\n"
                                   + _tail(self.log_path))
            try:
                self.rest_get("/system", timeout=1.0)
                if _port_open(self.host, self.dicom_port):
                    return
            except OrthancError as error:  # it answers, with an error (a 401): waiting won't help
                self.stop()
                raise OrthancError(f"Orthanc answered GET /system with an error: {error}") from None
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise OrthancError(f"Orthanc did not answer GET /system within "
                                   f"{self.start_timeout:.0f}s; log tail:\n" + _tail(self.log_path))
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Stop Orthanc by PID: SIGTERM, SIGKILL after ``timeout``; always reaped.

        A graceful Orthanc 1.10 shutdown takes ~3.4 s (HTTP server 2 s, DICOM server 1 s).
        ``graceful=False`` SIGKILLs at once (the index may then need recovery; fine for
        throw-away peers)."""
        proc, self.proc = self.proc, None
        _stop_process(proc, timeout, graceful)
        _LIVE.discard(self)

    def cleanup(self, graceful: bool | None = None) -> None:
        """Stop and delete the temp directory (only if this object created it).

        When the directory is ours (and so deleted), Orthanc is SIGKILLed by PID unless
        ``graceful=True``: nothing is kept, so the 3.4 s graceful shutdown buys nothing."""
        if graceful is None:
            graceful = not self._own_workdir
        self.stop(graceful=graceful)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "OrthancPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    # ---- REST

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str | None = None, timeout: float = 30.0,
                 accept: str | None = None) -> bytes:
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        req = urllib.request.Request(url, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if content_type:
            req.add_header("Content-Type", content_type)
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc

    def rest_get(self, path: str, timeout: float = 30.0) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return json.loads(self._request("GET", path, timeout=timeout))

    def rest_get_bytes(self, path: str, timeout: float = 30.0, accept: str | None = None) -> bytes:
        return self._request("GET", path, timeout=timeout, accept=accept)

    def rest_post(self, path: str, data: Any = None, timeout: float = 60.0) -> Any:
        """POST JSON (or raw bytes when ``data`` is bytes) and decode the JSON answer."""
        if isinstance(data, (bytes, bytearray)):
            raw = self._request("POST", path, bytes(data), "application/octet-stream", timeout)
        else:
            raw = self._request("POST", path, json.dumps(data).encode(), "application/json", timeout)
        return json.loads(raw) if raw.strip() else None

    def rest_delete(self, path: str, timeout: float = 30.0) -> None:
        self._request("DELETE", path, timeout=timeout)

    # ---- queries

    def instances(self) -> list[str]:
        """Orthanc IDs of all instances."""
        return self.rest_get("/instances")

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return self.rest_get("/studies")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags`` (keyword -> value)."""
        return self.rest_get(f"/instances/{orthanc_id}/simplified-tags")

    def sop_instance_uids(self) -> set[str]:
        """SOPInstanceUIDs of all stored instances."""
        found = self.rest_post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found}

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOPInstanceUID, or None."""
        ids = self.rest_post("/tools/find", {"Level": "Instance",
                                             "Query": {"SOPInstanceUID": sop_instance_uid}})
        return ids[0] if ids else None

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc ID of the study with this StudyInstanceUID, or None."""
        ids = self.rest_post("/tools/find", {"Level": "Study",
                                             "Query": {"StudyInstanceUID": study_uid}})
        return ids[0] if ids else None

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (by StudyInstanceUID) with their main tags.

        Each item: ``ID`` (Orthanc), ``SeriesInstanceUID``, ``Modality``, ``SeriesDescription``,
        ``SeriesNumber``, ``SOPClassUIDs`` (sorted, distinct), ``SOPInstanceUIDs``,
        ``Instances`` (Orthanc IDs), ``MainDicomTags`` (all of Orthanc's). Empty list when
        the study is absent.
        """
        sid = self.find_study(study_uid)
        if sid is None:
            return []
        out = []
        for series in self.rest_get(f"/studies/{sid}/series"):
            tags = series.get("MainDicomTags", {})
            sop_classes, sop_uids = set(), []
            for inst in self.rest_get(f"/series/{series['ID']}/instances"):
                sop_uids.append(inst["MainDicomTags"].get("SOPInstanceUID"))
                sop_classes.add(self.rest_get_bytes(
                    f"/instances/{inst['ID']}/metadata/SopClassUid").decode().strip())
            out.append({
                "ID": series["ID"],
                "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
                "Modality": tags.get("Modality"),
                "SeriesDescription": tags.get("SeriesDescription"),
                "SeriesNumber": tags.get("SeriesNumber"),
                "SOPClassUIDs": sorted(sop_classes),
                "SOPInstanceUIDs": sorted(u for u in sop_uids if u),
                "Instances": list(series.get("Instances", [])),
                "MainDicomTags": tags,
            })
        return out

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of an instance."""
        return self.rest_get_bytes(f"/instances/{orthanc_id}/file")

    def upload(self, data: bytes | str | os.PathLike) -> dict[str, Any]:
        """POST a DICOM file (bytes or path) to ``/instances``; Orthanc's answer (``ID``...)."""
        if not isinstance(data, (bytes, bytearray)):
            data = Path(data).read_bytes()
        return self.rest_post("/instances", bytes(data))

    def store_to_modality(self, resources: str | Iterable[str], modality: str = "node",
                          timeout: float = 120.0) -> Any:
        """C-STORE Orthanc resources (IDs of patients/studies/series/instances) to a modality.

        Synchronous: returns when Orthanc's job ended; raises OrthancError if the store failed.
        """
        if isinstance(resources, str):
            resources = [resources]
        body = {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout)}
        return self.rest_post(f"/modalities/{modality}/store", body, timeout=timeout + 10)

    def echo_modality(self, modality: str = "node", timeout: float = 10.0) -> bool:
        """C-ECHO from Orthanc to a modality; True when it answered."""
        try:
            self.rest_post(f"/modalities/{modality}/echo", {"Timeout": int(timeout)},
                           timeout=timeout + 5)
            return True
        except OrthancError:
            return False

    def wait_for(self, predicate: Callable[["OrthancPeer"], T], timeout: float = 30.0,
                 interval: float = 0.2, what: str = "Orthanc condition") -> T:
        """Bounded polling: ``predicate(self)`` until truthy; TimeoutError with the log tail."""
        try:
            return wait_for(lambda: predicate(self), timeout, interval, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nOrthanc log tail:\n{self.log_tail(20)}") from None

    def wait_for_instances(self, sop_instance_uids: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until every given SOPInstanceUID is stored."""
        wanted = set(sop_instance_uids)
        self.wait_for(lambda o: wanted <= o.sop_instance_uids(), timeout,
                      what=f"{len(wanted)} instances in Orthanc")


@pytest.fixture
def orthanc_factory():
    """Factory fixture: ``orthanc_factory(node_aet=..., node_port=..., **kw) -> OrthancPeer``
    (started). Everything it started is stopped by PID at teardown."""
    if not Path(ORTHANC_BIN).is_file():
        pytest.skip(f"Orthanc not installed at {ORTHANC_BIN}")
    started: list[OrthancPeer] = []

    def make(node_aet: str = "DICOM_AI_NODE", node_host: str = LOOPBACK,
             node_port: int | None = None, **kw: Any) -> OrthancPeer:
        peer = OrthancPeer(node_aet, node_host, node_port, **kw)
        started.append(peer)
        return peer.start()

    yield make
    for peer in started:
        peer.cleanup()


@pytest.fixture
def orthanc(orthanc_factory) -> OrthancPeer:
    """A started Orthanc (AE ``ORTHANC``) with modality ``"node"`` = ``DICOM_AI_NODE`` at
    127.0.0.1:``orthanc.node_port`` (a free port picked for the node to listen on)."""
    return orthanc_factory()


# --------------------------------------------------------------------------------------------
# dcmtk storescp


class StorescpPeer:
    """dcmtk ``storescp`` on 127.0.0.1 writing received objects into ``out_dir``.

    ``+xa``: accept all transfer syntaxes (compressed too); ``-aet``: its AE title;
    ``TCP_NODELAY=1`` in its environment. storescp accepts any called AE title.
    """

    def __init__(self, aet: str = "STORESCP", port: int | None = None,
                 out_dir: str | os.PathLike | None = None, extra_args: Sequence[str] = (),
                 start_timeout: float = 10.0):
        self.aet = aet
        self.host = LOOPBACK
        self.port = port or free_port()
        self._own_dir = out_dir is None
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="storescp-"))
        self.log_path = self.out_dir.parent / f"storescp-{self.port}.log"
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StorescpPeer":
        exe = shutil.which("storescp")
        if not exe:
            raise RuntimeError("dcmtk storescp not installed")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "-v", "+xa", "-aet", self.aet, "-od", str(self.out_dir), "-ta", "30",
               *self.extra_args, str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_dcmtk_env(),
                                         start_new_session=True)
        _LIVE.add(self)
        try:
            wait_for(lambda: self._check_alive() and _port_open(self.host, self.port),
                     self.start_timeout, 0.05, f"storescp on port {self.port}")
        except Exception:
            self.stop()
            raise
        return self

    def _check_alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"storescp exited; log tail:\n{_tail(self.log_path)}")
        return True

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        _stop_process(proc, timeout)
        _LIVE.discard(self)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "StorescpPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------------------------
# dcmtk SCUs

# Transfer syntax of a file -> the storescu option that proposes it (plus all uncompressed).
# storescu never compresses/decompresses on the fly: a file goes in its own transfer syntax, so
# the association must propose that one. -R alone proposes only uncompressed syntaxes.
TS_PROPOSE_FLAG: dict[str, str] = {
    "1.2.840.10008.1.2": "",            # Implicit VR LE: default proposal covers it
    "1.2.840.10008.1.2.1": "",          # Explicit VR LE
    "1.2.840.10008.1.2.2": "",          # Explicit VR BE
    "1.2.840.10008.1.2.1.99": "-xd",    # Deflated
    "1.2.840.10008.1.2.4.50": "-xy",    # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",    # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.57": "-xs",    # JPEG lossless (only SV1 is -xs's default; see below)
    "1.2.840.10008.1.2.4.70": "-xs",    # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",    # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",    # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",    # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",    # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",       # RLE lossless
    "1.2.840.10008.1.2.4.100": "-xm",   # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101": "-xh",   # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102": "-xn",   # MPEG4 AVC HP 4.1
    "1.2.840.10008.1.2.4.103": "-xl",   # MPEG4 AVC BD
    "1.2.840.10008.1.2.4.104": "-x2",   # MPEG4 AVC 4.2 2D
    "1.2.840.10008.1.2.4.105": "-x3",   # MPEG4 AVC 4.2 3D
    "1.2.840.10008.1.2.4.106": "-xo",   # MPEG4 AVC stereo
    "1.2.840.10008.1.2.4.107": "-x4",   # HEVC main
    "1.2.840.10008.1.2.4.108": "-x5",   # HEVC main 10
}
_PROPOSE_FLAGS = {f for f in TS_PROPOSE_FLAG.values() if f} | {"-x=", "-xe", "-xb", "-xi", "-xf"}


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            files.append(p)
    return files


def _file_transfer_syntax(path: Path) -> str | None:
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - not Part 10 / no meta: let storescu judge it
        return None


def storescu_flag_groups(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Group files by the storescu ``-x..`` option their transfer syntax needs ('' = none)."""
    groups: dict[str, list[Path]] = {}
    for f in _expand(paths):
        ts = _file_transfer_syntax(f)
        groups.setdefault(TS_PROPOSE_FLAG.get(ts or "", ""), []).append(f)
    return groups


def storescu(host: str, port: int, paths_or_folder: str | os.PathLike | Iterable[str | os.PathLike],
             called_ae: str, calling_ae: str = "STORESCU", extra_args: Sequence[str] = (),
             timeout: float = 120.0, propose: str = "auto", check: bool = False,
             ) -> subprocess.CompletedProcess:
    """Send files and/or folders with dcmtk ``storescu``; returns the CompletedProcess.

    Flags always used:
      ``-v``           verbose: one "Sending file" / "Received Store Response" per file, which
                       ``parse_storescu_output`` turns into per-file outcomes;
      ``-R``           propose only the SOP classes the files need (so SEG, SR, any class works;
                       without it storescu proposes a fixed list of ~120 classes);
      ``+sd +r``       scan folders recursively (only when a folder is given);
      ``-nh``          keep going after a failed store (report every file);
      ``-to/-ta/-td``  connection / ACSE / DIMSE timeouts so a dead peer can't hang a test;
      ``-aet/-aec``    calling / called AE titles.
    Transfer syntaxes (``propose``):
      ``"auto"``  read each file's transfer syntax and add the option that proposes it
                  (``-xv`` J2K lossless, ``-xw`` J2K, ``-xs`` JPEG lossless, ``-xy``/``-xx``
                  JPEG lossy, ``-xt``/``-xu`` JPEG-LS, ``-xr`` RLE, ``-xd`` deflate, MPEG/HEVC);
                  storescu takes one such option per run, so files needing different ones are
                  sent in one association per group (stdout/stderr concatenated, returncode =
                  the first non-zero); uncompressed-only input stays one association;
      ``""``      no option (uncompressed only); or an explicit flag like ``"-xv"``.
    ``TCP_NODELAY=1`` is set. ``timeout`` bounds the whole run (subprocess killed after it;
    raises ``subprocess.TimeoutExpired``).

    NOTE: with ``-nh`` storescu exits 0 even when stores fail (refused, no presentation
    context, cannot convert). Judge per file with ``storescu_failures(proc)`` /
    ``parse_storescu_output``; ``check=True`` raises CalledProcessError on a non-zero exit
    *or* any per-file failure.
    """
    exe = shutil.which("storescu")
    if not exe:
        raise RuntimeError("dcmtk storescu not installed")
    if isinstance(paths_or_folder, (str, os.PathLike)):
        paths = [Path(paths_or_folder)]
    else:
        paths = [Path(p) for p in paths_or_folder]
    if not paths:
        raise ValueError("nothing to send")
    net_to = str(max(1, int(min(timeout, 60))))
    base = [exe, "-v", "-R", "-nh", "-to", net_to, "-ta", net_to, "-td", net_to,
            "-aet", calling_ae, "-aec", called_ae]
    explicit_flag = any(a in _PROPOSE_FLAGS for a in extra_args)

    if propose == "auto" and not explicit_flag:
        groups = storescu_flag_groups(paths)
        if set(groups) <= {""}:
            runs = [("", paths)]  # keep folders as folders: one association, +sd
        else:
            runs = sorted(groups.items())
    else:
        runs = [("" if explicit_flag else propose, paths)]

    deadline = time.monotonic() + timeout
    results = []
    for flag, items in runs:
        cmd = list(base)
        if flag:
            cmd.append(flag)
        if any(p.is_dir() for p in items):
            cmd += ["+sd", "+r"]
        cmd += [*extra_args, host, str(port), *map(str, items)]
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(cmd, timeout)
        results.append(subprocess.run(cmd, capture_output=True, text=True, env=_dcmtk_env(),
                                      timeout=left, stdin=subprocess.DEVNULL))
    if len(results) == 1:
        proc = results[0]
    else:
        rc = next((r.returncode for r in results if r.returncode), 0)
        proc = subprocess.CompletedProcess([r.args for r in results], rc,
                                           "".join(r.stdout for r in results),
                                           "".join(r.stderr for r in results))
    if check and (proc.returncode != 0 or storescu_failures(proc)):
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def echoscu(host: str, port: int, called_ae: str, calling_ae: str = "ECHOSCU",
            timeout: float = 30.0, extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """C-ECHO with dcmtk ``echoscu -v`` (TCP_NODELAY=1, bounded network timeouts)."""
    exe = shutil.which("echoscu")
    if not exe:
        raise RuntimeError("dcmtk echoscu not installed")
    net_to = str(max(1, int(min(timeout, 60))))
    cmd = [exe, "-v", "-to", net_to, "-ta", net_to, "-td", net_to, "-aet", calling_ae,
           "-aec", called_ae, *extra_args, host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_dcmtk_env(),
                          timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class StoreOutcome:
    path: str
    status: str | None = None      # "Success", "Warning", "Error: ...", or None (never answered)
    messages: list[str] = field(default_factory=list)  # W:/E: lines about this file

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status.startswith("Success")
                                            or self.status.startswith("Warning"))


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+?)\s*$")
_RESPONSE = re.compile(r"^I: Received Store Response(?: \(MsgID \d+\))?\s*\((?P<status>[^)]*)\)")


def parse_storescu_output(text: str) -> list[StoreOutcome]:
    """Per-file outcomes from ``storescu -v`` output (stdout + stderr together).

    A file with ``status None`` was never answered (no presentation context, association
    failed, unreadable file); its ``messages`` hold storescu's W:/E: lines about it.
    Files storescu skipped before sending (not DICOM) appear only as messages of the
    preceding outcome or not at all, so compare against the list of files you sent.
    """
    outcomes: list[StoreOutcome] = []
    for line in text.splitlines():
        m = _SENDING.match(line)
        if m:
            outcomes.append(StoreOutcome(m["path"]))
            continue
        m = _RESPONSE.match(line)
        if m and outcomes:
            outcomes[-1].status = m["status"].strip()
            continue
        if line.startswith(("E: ", "W: ")) and outcomes:
            outcomes[-1].messages.append(line)
    return outcomes


def storescu_failures(proc: subprocess.CompletedProcess) -> list[StoreOutcome]:
    """The outcomes of a ``storescu()`` run that did not end in Success/Warning."""
    return [o for o in parse_storescu_output(proc.stdout + "\n" + proc.stderr) if not o.ok]


# --------------------------------------------------------------------------------------------
# test data


def write_tiny_ct(path: str | os.PathLike, *, study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None,
                  instance_number: int = 1, rows: int = 8, cols: int = 8,
                  patient_id: str = "PEERTEST", modality: str = "CT"):
    """Write a small, valid CT Image Storage file (Explicit VR LE, 16-bit signed) and return
    its pydicom Dataset. Slices of one series: same study/series UIDs, rising instance_number
    (z position follows it)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    sop_uid = sop_uid or generate_uid()
    now = _dt.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "dicom-ai-node tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "peer test"
    ds.SeriesDescription = "tiny CT"
    ds.PatientName = "Peer^Test"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.KVP = 120
    ds.SliceThickness = 1.0
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number - 1)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[ds.StudyInstanceUID, "FoR"])
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = float(instance_number - 1)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [1.0, 1.0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    pixels = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) * 10 + instance_number)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds
