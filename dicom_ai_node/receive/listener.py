"""The TCP listener: accepts connections and runs each association in its own thread."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, host: str, port: int, serve: Callable[[socket.socket, tuple], None],
                 ssl_context: ssl.SSLContext | None = None, shared_port: bool = False):
        """``serve(connection, address)`` runs an association to its end; ``shared_port``: other
        processes listen on the same port (SO_REUSEPORT) and the kernel spreads connections."""
        self._serve = serve
        self._ssl_context = ssl_context
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared_port:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._socket.bind((host, port))
        self._socket.listen(128)
        self._socket.settimeout(0.5)  # how often the accept loop looks at the stop flag
        self.address = self._socket.getsockname()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting and cut the open connections: an instance not yet acknowledged is
        resent by its sender, so nothing acknowledged is lost."""
        self._stopping.set()
        self._thread.join(timeout)
        self._socket.close()
        with self._lock:
            open_connections = dict(self._connections)
        for connection in open_connections.values():
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in open_connections:
            thread.join(timeout)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if not self._stopping.is_set():
                    log.error("DICOM listener stopped accepting: %s", error)
                return
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                connection = self._ssl_context.wrap_socket(connection, server_side=True,
                                                           do_handshake_on_connect=False)
            thread = threading.Thread(target=self._run, args=(connection, address),
                                      name=f"association-{address[0]}:{address[1]}", daemon=True)
            with self._lock:
                self._connections[thread] = connection
            thread.start()

    def _run(self, connection: socket.socket, address: tuple) -> None:
        try:
            self._serve(connection, address)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)
