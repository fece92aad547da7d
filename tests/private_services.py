"""A PostgreSQL server and a RabbitMQ node of the test's own, on free loopback ports, in a
temporary folder — so a test can restart them (as an outage would) without touching the
machine's shared servers or other tests. Both are the Debian packages' programs, started by
PID and stopped by it."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers import _port_open, free_port

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT_S = 90  # RabbitMQ takes ~15 s on a busy 2-core machine


def missing() -> str | None:
    """Why these cannot run here, or None."""
    if not PG_BIN or not Path(PG_BIN[-1], "initdb").exists():
        return "PostgreSQL server programs (initdb, pg_ctl) not installed"
    if not Path(RABBITMQ_SERVER).exists():
        return f"{RABBITMQ_SERVER} not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser missing (initdb refuses to run as root)"
    return None


def _wait_port(port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within {START_TIMEOUT_S} s:\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


class PrivatePostgres:
    def __init__(self):
        # its own folder under /tmp: the server runs as user postgres, which cannot enter pytest's
        # (root-only) temporary folders
        self.folder = Path(tempfile.mkdtemp(prefix="dain-postgres-"))
        self.port = free_port()
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(Path(PG_BIN[-1], args[0])), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")
        _wait_port(self.port, "PostgreSQL", self.log)
        return self

    def restart(self) -> None:
        """A fast shutdown (every connection cut, as a crash or failover does) and a start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start()  # not pg_ctl restart: without -l the server would hold our output pipe open

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRabbitMQ:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.node = f"dain{self.port}@localhost"
        self.log = folder / "rabbitmq.log"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.process: subprocess.Popen | None = None

    def start(self) -> PrivateRabbitMQ:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.folder / "enabled_plugins").write_text("[].\n")
        env = {**os.environ, "HOME": str(self.folder), "RABBITMQ_NODENAME": self.node,
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"), "RABBITMQ_CONF_ENV_FILE": "/dev/null",
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
               "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"), "RABBITMQ_LOG_BASE": str(self.folder / "log"),
               "ERL_EPMD_ADDRESS": "127.0.0.1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([RABBITMQ_SERVER], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, "RabbitMQ", self.log)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the Erlang VM and its helpers
            self.process.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        """Stopped and started again; durable queues and persistent messages survive."""
        self.stop()
        self.start()
