"""The TCP listener: accepts connections and runs each association in its own thread.

A connection is *pending* from accept until its A-ASSOCIATE-RQ is accepted. Pending
connections are capped per address and in all (the excess is closed at once, before any
thread starts), and each must be associated within the ARTIM deadline or it is closed: a
peer that connects and then sends nothing, or one byte a second, holds a place for a bounded
time and never counts against the association limit, which only associated peers fill.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 60.0  # connections closed at accept: one log line per interval at most


@dataclass(frozen=True)
class ConnectionLimits:
    association_timeout_s: float = 30.0  # ARTIM: from accept to an accepted A-ASSOCIATE-RQ
    max_pending: int = 128  # connections not yet associated, in all
    max_pending_per_address: int = 16  # ... from one peer address
    max_associations: int = 32  # associated peers at once


class Connection:
    """One accepted connection, as the listener tracks it."""

    def __init__(self, listener: Listener, sock: socket.socket, host: str, deadline: float):
        self.socket = sock
        self.host = host
        self.deadline = deadline  # time.monotonic() by which it must be associated
        self.associated = False
        self.timed_out = False  # closed by the listener at the ARTIM deadline
        self._listener = listener

    def associate(self) -> bool:
        """Count this connection as an association; False when the association limit is
        reached (or the deadline has passed): the caller rejects the association."""
        return self._listener._associate(self)


class Listener:
    def __init__(self, host: str, port: int, serve: Callable[[Connection], None],
                 ssl_context: ssl.SSLContext | None = None, shared_port: bool = False,
                 limits: ConnectionLimits = ConnectionLimits()):
        """``serve(connection)`` runs an association to its end and calls
        ``connection.associate()`` before it accepts one; ``shared_port``: other processes
        listen on the same port (SO_REUSEPORT) and the kernel spreads connections."""
        self._serve = serve
        self._ssl_context = ssl_context
        self.limits = limits
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared_port:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._socket.bind((host, port))
        self._socket.listen(128)
        self._socket.settimeout(0.5)  # how often the accept loop looks at deadlines and the stop flag
        self.address = self._socket.getsockname()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, Connection] = {}
        self._refused = 0  # connections closed at accept since the last log line about them
        self._refused_last_host = ""
        self._refused_logged_at = -REFUSAL_LOG_INTERVAL_S
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting and cut the open connections: an instance not yet acknowledged is
        resent by its sender, so nothing acknowledged is lost."""
        self._stopping.set()
        self._thread.join(timeout)
        self._socket.close()
        with self._lock:
            open_connections = dict(self._connections)
        for connection in open_connections.values():
            _shut(connection.socket)
        for thread in open_connections:
            thread.join(timeout)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, address = self._socket.accept()
            except TimeoutError:
                self._expire_pending()
                continue
            except OSError as error:
                if not self._stopping.is_set():
                    log.error("DICOM listener stopped accepting: %s", error)
                return
            self._expire_pending()
            self._start(sock, address[0])

    def _start(self, sock: socket.socket, host: str) -> None:
        with self._lock:
            pending = [c for c in self._connections.values() if not c.associated]
            from_host = sum(c.host == host for c in pending)
            too_many = (len(pending) >= self.limits.max_pending
                        or from_host >= self.limits.max_pending_per_address)
            if too_many:
                self._refused += 1
                self._refused_last_host = host
        if too_many:
            _shut(sock)
            sock.close()
            self._log_refusals()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        connection = Connection(self, sock, host, time.monotonic() + self.limits.association_timeout_s)
        thread = threading.Thread(target=self._run, args=(connection,), name=f"association-{host}",
                                  daemon=True)
        with self._lock:
            self._connections[thread] = connection
        thread.start()

    def _log_refusals(self) -> None:
        """One line per interval, however many connections were closed at accept."""
        now = time.monotonic()
        with self._lock:
            if self._refused == 0 or now - self._refused_logged_at < REFUSAL_LOG_INTERVAL_S:
                return
            count, host = self._refused, self._refused_last_host
            self._refused, self._refused_logged_at = 0, now
        log.warning("closed %d connection(s) at once (the latest from %s): too many not yet "
                    "associated (at most %d per address, %d in all); next report in %d s at the "
                    "earliest", count, host, self.limits.max_pending_per_address,
                    self.limits.max_pending, REFUSAL_LOG_INTERVAL_S)

    def _expire_pending(self) -> None:
        """Close every connection past its ARTIM deadline (its thread then ends)."""
        now = time.monotonic()
        with self._lock:
            expired = [c for c in self._connections.values()
                       if not c.associated and not c.timed_out and c.deadline <= now]
            for connection in expired:
                connection.timed_out = True
        for connection in expired:
            log.warning("closed the connection from %s: not associated within %g s (ARTIM)",
                        connection.host, self.limits.association_timeout_s)
            _shut(connection.socket)
        self._log_refusals()

    def _associate(self, connection: Connection) -> bool:
        with self._lock:
            if connection.timed_out:
                return False
            if sum(c.associated for c in self._connections.values()) >= self.limits.max_associations:
                return False
            connection.associated = True
            return True

    def _run(self, connection: Connection) -> None:
        try:
            self._serve(connection)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)


def _shut(sock: socket.socket) -> None:
    """Wake any thread blocked reading the socket: it sees the end of the stream."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
