"""Peers that hold connections or claim huge lengths cannot starve or bloat the receiver
(issue 10): a real node process, raw sockets as the hostile peers, dcmtk as the good ones."""

from __future__ import annotations

import select
import socket
import time
import urllib.request

import pytest

from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import (
    echoscu,
    skip_unless_tools,
    storescu,
    storescu_failures,
    wait_for,
    write_tiny_ct,
)
from tests.raw_peer import associate_rq, raw_associate

pytestmark = [pytest.mark.integration, skip_unless_tools("echoscu", "storescu")]


class SlowSenders:
    """Connections that send a valid A-ASSOCIATE-RQ one byte a second (a slowloris), each from
    the given loopback source address; notes how long each stayed open."""

    def __init__(self, node, sources: list[str]):
        self.pdu = associate_rq()
        self.sent = 0
        self.sockets: list[socket.socket] = []
        for source in sources:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", node.port))
            self.sockets.append(sock)
        self.opened_at = time.monotonic()
        self.lifetimes: dict[socket.socket, float] = {}  # closed by the node: seconds open

    @property
    def open(self) -> list[socket.socket]:
        return [sock for sock in self.sockets if sock not in self.lifetimes]

    def drip(self, seconds: float) -> None:
        """One more byte on every open connection each second, for ``seconds`` at most or
        until the node has closed them all."""
        deadline = time.monotonic() + seconds
        while self.open and time.monotonic() < deadline:
            self._note_closed()
            assert self.sent < len(self.pdu) - 1  # the A-ASSOCIATE-RQ is never complete
            byte = self.pdu[self.sent:self.sent + 1]
            for sock in self.open:
                try:
                    sock.send(byte)
                except OSError:
                    self.lifetimes[sock] = time.monotonic() - self.opened_at
            self.sent += 1
            time.sleep(1.0)
        self._note_closed()

    def _note_closed(self) -> None:
        readable, _, _ = select.select(self.open, [], [], 0) if self.open else ([], [], [])
        for sock in readable:  # the node sends nothing before an association: this is the end
            try:
                sock.recv(64)
            except OSError:
                pass
            self.lifetimes[sock] = time.monotonic() - self.opened_at

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_connections_that_never_associate_do_not_count_against_the_association_limit(node_factory, tmp_path):
    # 40 slowloris connections, more than the 32 associations allowed, from 40 addresses
    node = node_factory(node_extra="association_timeout_s = 120", web=True)
    slow = SlowSenders(node, [f"127.0.1.{i}" for i in range(1, 41)])
    try:
        slow.drip(2)
        assert len(slow.open) == 40
        result = echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU")
        assert result.returncode == 0, result.stdout + result.stderr
        with urllib.request.urlopen(f"{node.web_url}/healthz", timeout=10) as health:
            assert health.status == 200
        write_tiny_ct(tmp_path / "one.dcm")
        result = storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE)
        assert not storescu_failures(result), result.stdout + result.stderr
        assert "Local Limit Exceeded" not in node.log()
    finally:
        slow.close()


def test_connections_that_never_associate_are_closed_at_the_deadline(node_factory, tmp_path):
    node = node_factory(node_extra="association_timeout_s = 2")
    # from one address: 16 may wait for their association, the other 24 are closed at once
    slow = SlowSenders(node, ["127.0.0.2"] * 40)
    try:
        slow.drip(60)
        print("seconds each slow connection stayed open:",
              sorted(round(lifetime, 1) for lifetime in slow.lifetimes.values()))
        assert not slow.open, f"{len(slow.open)} slow connections still open after 60 s"
        assert max(slow.lifetimes.values()) < 30  # deadline 2 s; a generous bound
    finally:
        slow.close()
    log = node.log()
    assert log.count("not associated within 2 s (ARTIM)") == 16
    assert log.count("too many not yet associated") == 1  # one line for 24 closed connections
    # the node goes on serving
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0
    write_tiny_ct(tmp_path / "one.dcm")
    assert not storescu_failures(storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_release_request_claiming_a_huge_length_is_aborted_unread(node_factory):
    node = node_factory()
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0
    before = rss_bytes(node.process.pid)
    connection = raw_associate(node)
    claimed = 1536 * 2**20  # 1.5 GiB
    streamed = 0
    chunk = bytes(2**20)
    try:
        connection.sendall(bytes([0x05, 0]) + claimed.to_bytes(4, "big"))
        for _ in range(256):  # 256 MiB at most, unless the node closes the connection first
            connection.sendall(chunk)
            streamed += len(chunk)
    except OSError:
        pass  # the node aborted and closed the connection
    grown = rss_bytes(node.process.pid) - before  # while the connection is still open
    connection.close()
    print(f"streamed {streamed / 2**20:.0f} MiB; node RSS {before / 2**20:.0f} MiB before, "
          f"grew by {grown / 2**20:.1f} MiB")
    assert grown < 64 * 2**20
    wait_for(lambda: f"A-RELEASE-RQ of {claimed} bytes" in node.log(), timeout=20,
             what="the node's abort of the release request")
    assert echoscu("127.0.0.1", node.port, NODE_AE, calling_ae="ECHOSCU").returncode == 0
