"""Run the real node as a child process (`python -m dicom_ai_node.cli serve`), the way a site
runs it, with its own config, storage and SQLite database under a temp folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import _port_open, _stop_process, free_port

NODE_AE = "DICOM_AI_NODE"


def toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")


class NodeProcess:
    def __init__(self, workdir: Path, *, port: int | None = None, destination_port: int | None = None,
                 destination_ae: str = "ORTHANC", rules: str = "", quiet_period_s: float = 1.0,
                 allowed_callers: str = '{ ae_title = "STORESCU" }, { ae_title = "ECHOSCU" }',
                 node_extra: str = "", database_url: str | None = None, max_attempts: int = 3,
                 backoff_s: float = 0.5, web: bool = False, model_paths: tuple[str | Path, ...] = (),
                 extra: str = "", role: str = "all"):
        self.role = role  # serve --role: all, receiver (no web page) or web (no DICOM listener)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "node.log"
        self.database_url = database_url or f"sqlite:///{self.workdir / 'node.db'}"
        # the admin page: off unless asked for, so parallel nodes never fight over port 8080
        self.web_port = free_port() if web else None
        self.web_url = f"http://127.0.0.1:{self.web_port}" if web else None
        web_section = (f"[web]\nport = {self.web_port}\n" if web else "[web]\nenabled = false\n")
        # site model folders ([models] paths), e.g. a test's own exported model
        models_section = ("[models]\npaths = " + json.dumps([str(p) for p in model_paths]) + "\n"
                          if model_paths else "")
        destination = ""
        if destination_port:
            destination = (f'[[destinations]]\nname = "pacs"\nae_title = "{destination_ae}"\n'
                           f'host = "127.0.0.1"\nport = {destination_port}\n'
                           f"max_attempts = {max_attempts}\nbackoff_s = {backoff_s}\ntimeout_s = 10\n")
        self.config_path.write_text(f"""
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {self.port}
storage_dir = "storage"
log_level = "DEBUG"
min_free_disk_mb = 0
release_grace_s = 0.5
allowed_callers = [{allowed_callers}]
{node_extra}

[database]
url = "{self.database_url}"

[completion]
quiet_period_s = {quiet_period_s}

{web_section}

{models_section}
{destination}
{rules}
{extra}
""")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.config_path), "serve", "--role", self.role],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        log.close()

        def ready() -> bool:
            return (self.role == "web" or _port_open("127.0.0.1", self.port)) and (
                self.web_port is None or _port_open("127.0.0.1", self.web_port))

        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:  # fail at once, with the reason, not after the timeout
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not ready on port {self.port} after {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up, like a power cut of the process."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        _stop_process(self.process, timeout=15)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config",
                                 str(self.config_path), *args], capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"dicom-ai-node {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def study(self, study_uid: str) -> dict:
        return json.loads(self.cli("studies", "show", study_uid, "--json").stdout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def node_factory(tmp_path):
    started: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:
        node = NodeProcess(tmp_path / f"node{len(started)}", **kwargs)
        started.append(node)
        return node.start()

    yield make
    for node in started:
        node.stop()
