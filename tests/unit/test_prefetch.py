"""Post-copy's prefetching relay (ctrmig.direct.prefetch) against a page server that
speaks criu's protocol over a socket pair: pure logic, no CRIU (the real route is in
tests/integration/test_postcopy.py)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ctrmig.direct.prefetch import AHEAD, HEADER, PAGE, PS_IOV_GET, Prefetcher
from ctrmig.direct.relay import SocketEnd, Tally

ADD_F = 6 | (4 << 16)  # PS_IOV_ADD_F with PE_PRESENT, as criu's page server answers
CLOSE = 0x1023
ID = 0x1234


def page(vaddr: int) -> bytes:
    return vaddr.to_bytes(8, "little") * (PAGE // 8)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            return data
        data += piece
    return data


@dataclass
class Source:
    """criu's lazy page server: serves pages in ``ranges`` [(start, pages)], clamping a
    request at the end of its range (page_pipe_read); records what it was asked."""

    sock: socket.socket
    ranges: list[tuple[int, int]]
    asked: list[tuple[int, int]] = field(default_factory=list)
    sent: bytes = b""

    def serve(self) -> None:
        while True:
            head = recv_exactly(self.sock, HEADER.size)
            if len(head) < HEADER.size:
                break
            cmd, nr, vaddr, dst = HEADER.unpack(head)
            if cmd in (CLOSE, 0x1024):
                self._send(b"\0\0\0\0")
                continue
            assert cmd == PS_IOV_GET and dst == ID
            self.asked.append((vaddr, nr))
            start, size = next((s, n) for s, n in self.ranges if s <= vaddr < s + n * PAGE)
            got = min(nr, (start + size * PAGE - vaddr) // PAGE)
            self._send(HEADER.pack(ADD_F, got, vaddr, dst) +
                       b"".join(page(vaddr + i * PAGE) for i in range(got)))
        self.sock.close()

    def _send(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)


@dataclass
class Rig:
    source: Source
    daemon: socket.socket
    relay: Prefetcher
    result: list[Tally]

    def ask(self, vaddr: int, nr: int) -> tuple[int, int, bytes]:
        """As lazy-pages does: a request, then its answer (pages, vaddr, data)."""
        self.daemon.sendall(HEADER.pack(PS_IOV_GET, nr, vaddr, ID))
        cmd, got, at, dst = HEADER.unpack(recv_exactly(self.daemon, HEADER.size))
        assert (cmd, at, dst) == (ADD_F, vaddr, ID)
        return got, at, recv_exactly(self.daemon, got * PAGE)


@pytest.fixture
def rig() -> Iterator[Rig]:
    wire_ours, wire_theirs = socket.socketpair()
    daemon_ours, daemon_theirs = socket.socketpair()
    source = Source(wire_theirs, ranges=[(0x10000, 100), (0x100000, 40)])
    relay = Prefetcher(SocketEnd(wire_ours), SocketEnd(daemon_ours), idle=5.0)
    result: list[Tally] = []
    threads = [threading.Thread(target=source.serve, daemon=True),
               threading.Thread(target=lambda: result.append(relay.run()), daemon=True)]
    for t in threads:
        t.start()
    yield Rig(source, daemon_theirs, relay, result)
    daemon_theirs.close()
    for t in threads:
        t.join(10)


def test_a_walk_of_single_page_faults_crosses_the_link_once_per_ahead_pages(rig: Rig) -> None:
    base = 0x10000
    for i in range(2 * AHEAD):
        got, _, data = rig.ask(base + i * PAGE, 1)
        assert (got, data) == (1, page(base + i * PAGE))
    assert rig.source.asked == [(base, AHEAD), (base + AHEAD * PAGE, AHEAD)]
    assert rig.relay.answered_here == 2 * (AHEAD - 1)


def test_the_source_clamps_at_its_range_and_lazy_pages_gets_what_came(rig: Rig) -> None:
    end = 0x10000 + 100 * PAGE
    got, _, data = rig.ask(end - 3 * PAGE, 1)  # 32 asked ahead, 3 there
    assert (got, data) == (1, page(end - 3 * PAGE))
    got, _, data = rig.ask(end - 2 * PAGE, 8)  # 2 waiting here: a short answer
    assert got == 2 and data == page(end - 2 * PAGE) + page(end - PAGE)
    assert rig.source.asked == [(end - 3 * PAGE, AHEAD)]


def test_a_big_request_stops_short_of_pages_already_here(rig: Rig) -> None:
    base = 0x100000
    rig.ask(base + 10 * PAGE, 1)  # pages 11..39 now wait here
    got, _, data = rig.ask(base, 20)  # asks the source for 0..10 only
    assert got == 11 and data == b"".join(page(base + i * PAGE) for i in range(11))
    got, _, data = rig.ask(base + 11 * PAGE, 9)  # the rest, from here
    assert got == 9 and data == b"".join(page(base + i * PAGE) for i in range(11, 20))
    assert rig.source.asked == [(base + 10 * PAGE, AHEAD), (base, 11)]


def test_close_is_answered_by_the_source_and_the_stream_is_hashed_whole(rig: Rig) -> None:
    rig.ask(0x10000, 1)
    rig.daemon.sendall(HEADER.pack(CLOSE, 0, 0, 0))
    assert recv_exactly(rig.daemon, 4) == b"\0\0\0\0"
    rig.daemon.shutdown(socket.SHUT_WR)  # lazy-pages is done
    assert recv_exactly(rig.daemon, 1) == b""  # the relay ended its side too
    for _ in range(100):
        if rig.result:
            break
        threading.Event().wait(0.05)
    tally = rig.result[0]
    assert tally.error == ""
    assert (tally.bytes, tally.sha256) == (len(rig.source.sent),
                                           hashlib.sha256(rig.source.sent).hexdigest())


def test_an_answer_cut_short_by_the_link_is_an_error_and_ends_both_sides() -> None:
    wire_ours, wire_theirs = socket.socketpair()
    daemon_ours, daemon_theirs = socket.socketpair()

    def half_answer() -> None:
        _, nr, vaddr, dst = HEADER.unpack(recv_exactly(wire_theirs, HEADER.size))
        wire_theirs.sendall(HEADER.pack(ADD_F, nr, vaddr, dst) + b"x" * 100)
        wire_theirs.close()

    threading.Thread(target=half_answer, daemon=True).start()
    relay = Prefetcher(SocketEnd(wire_ours), SocketEnd(daemon_ours), idle=5.0)
    daemon_theirs.sendall(HEADER.pack(PS_IOV_GET, 1, 0x5000, ID))
    tally = relay.run()
    assert "ended in the middle of an answer" in tally.error
    # lazy-pages sees the answer end short, then EOF: it fails (and the restore with it).
    assert len(recv_exactly(daemon_theirs, HEADER.size + PAGE)) < HEADER.size + PAGE
    daemon_theirs.close()
