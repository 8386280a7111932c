"""Post-copy's prefetching relay (ctrmig.direct.prefetch) against a page server that
speaks criu's protocol over a socket pair: pure logic, no CRIU (the real route is in
tests/integration/test_postcopy.py)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctrmig.archive.criu_images import PE_LAZY
from ctrmig.direct.prefetch import (
    AHEAD,
    HEADER,
    PAGE,
    PS_IOV_GET,
    Broken,
    Prefetcher,
    lazy_ranges,
    preamble,
    read_preamble,
)
from ctrmig.direct.relay import SocketEnd, Tally
from tests.unit.test_criu_images import PE_PRESENT, pagemap_image

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
    outside: bool = False
    hold: bool = False  # keep the connection open after the relay's end (ssh's stdout)

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
            held = [(s, n) for s, n in self.ranges if s <= vaddr < s + n * PAGE]
            if not held:  # "no iovs found, zero pages": criu's page server gives up
                self.outside = True
                break
            start, size = held[0]
            got = min(nr, (start + size * PAGE - vaddr) // PAGE)
            self._send(HEADER.pack(ADD_F, got, vaddr, dst) +
                       b"".join(page(vaddr + i * PAGE) for i in range(got)))
        if not self.hold:
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


RANGES = [(0x10000, 100), (0x100000, 40)]


def make_rig(announced: list[tuple[int, int, int]], hold: bool = False) -> Iterator[Rig]:
    wire_ours, wire_theirs = socket.socketpair()
    daemon_ours, daemon_theirs = socket.socketpair()
    source = Source(wire_theirs, ranges=RANGES, hold=hold)
    relay = Prefetcher(SocketEnd(wire_ours), SocketEnd(daemon_ours), idle=5.0,
                       ranges=announced)
    result: list[Tally] = []
    threads = [threading.Thread(target=source.serve, daemon=True),
               threading.Thread(target=lambda: result.append(relay.run()), daemon=True)]
    for t in threads:
        t.start()
    yield Rig(source, daemon_theirs, relay, result)
    daemon_theirs.close()
    for t in threads:
        t.join(10)
    wire_theirs.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    """The relay with nothing announced: it fetches ahead only on request."""
    yield from make_rig([])


@pytest.fixture
def announced() -> Iterator[Rig]:
    """The relay told the source's ranges (the preamble): it fetches them ahead."""
    yield from make_rig([(ID, start, pages) for start, pages in RANGES], hold=True)


def wait_for_result(rig: Rig) -> Tally:
    for _ in range(100):
        if rig.result:
            return rig.result[0]
        threading.Event().wait(0.05)
    raise AssertionError("the relay did not end")


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
    tally = wait_for_result(rig)
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


def test_announced_pages_come_ahead_of_the_faults_and_only_once(announced: Rig) -> None:
    """One fault, and the relay fetches the announced ranges from there on: every later
    request (a walk, then lazy-pages' background chunks) is answered here, each page
    crossed the link once, and nothing outside the ranges was asked."""
    first = RANGES[0][0]
    got, _, data = announced.ask(first + 50 * PAGE, 1)
    assert (got, data) == (1, page(first + 50 * PAGE))
    for start, size in RANGES:
        vaddr = start
        while vaddr < start + size * PAGE:
            if vaddr == first + 50 * PAGE:
                vaddr += PAGE
                continue
            want = min(16, (start + size * PAGE - vaddr) // PAGE)
            if vaddr < first + 50 * PAGE:
                want = min(want, (first + 50 * PAGE - vaddr) // PAGE)
            got, _, data = announced.ask(vaddr, want)
            assert data == b"".join(page(vaddr + i * PAGE) for i in range(got))
            vaddr += got * PAGE
    asked = announced.source.asked
    assert not announced.source.outside
    assert sum(n for _, n in asked) == sum(n for _, n in RANGES)  # each page once
    assert announced.relay.fetched_ahead > 0
    assert announced.relay.answered_here > len(asked)


def test_the_end_of_lazy_pages_ends_the_relay_without_the_wire_s_eof(announced: Rig) -> None:
    """ssh's client signals the end of its stdout only when it exits: the relay must not
    wait for the source's EOF (that was 10 s of idle timeout per post-copy over ssh)."""
    announced.ask(RANGES[1][0], 1)
    announced.daemon.sendall(HEADER.pack(CLOSE, 0, 0, 0))
    assert recv_exactly(announced.daemon, 4) == b"\0\0\0\0"
    announced.daemon.shutdown(socket.SHUT_WR)
    tally = wait_for_result(announced)  # the source still holds its end open
    assert tally.error == ""
    assert (tally.bytes, tally.sha256) == (len(announced.source.sent),
                                           hashlib.sha256(announced.source.sent).hexdigest())


def test_the_preamble_carries_the_ranges_and_refuses_anything_else() -> None:
    ours, theirs = socket.socketpair()
    ranges = [(1, 0x7F0000000000, 3), (9, 0x400000, 1 << 20)]
    theirs.sendall(preamble(ranges))
    assert read_preamble(SocketEnd(ours), 5.0) == ranges
    theirs.sendall(b"something else, longer than a preamble")
    with pytest.raises(Broken, match="did not announce"):
        read_preamble(SocketEnd(ours), 5.0)
    ours.close()
    theirs.close()
    ours, theirs = socket.socketpair()
    theirs.close()  # the migration failed before the source's dump served
    with pytest.raises(Broken, match="ended before"):
        read_preamble(SocketEnd(ours), 5.0)
    ours.close()


def test_lazy_ranges_reads_the_dump_s_pagemaps(tmp_path: Path) -> None:
    (tmp_path / "pagemap-7.img").write_bytes(pagemap_image([
        (0x400000, 2, PE_PRESENT), (0x7F0000000000, 300, PE_LAZY)]))
    (tmp_path / "pages-1.img").write_bytes(b"\0" * PAGE)
    assert lazy_ranges(tmp_path) == [(7, 0x7F0000000000, 300)]
    (tmp_path / "pagemap-8.img").write_bytes(b"not an image")
    assert lazy_ranges(tmp_path) == []  # unreadable: nothing is fetched ahead
    assert lazy_ranges(None) == []


def test_small_ranges_come_before_lazy_pages_connects() -> None:
    """While the target restores, the relay fetches the small announced ranges (stack,
    TLS, heap): the restorer's first faults are answered here, without the link."""
    from ctrmig.direct.relay import listener

    wire_ours, wire_theirs = socket.socketpair()
    big = (0x7F0000000000, 4096)  # a data region: not fetched before the restore runs
    source = Source(wire_theirs, ranges=[*RANGES, big], hold=True)
    relay = Prefetcher(SocketEnd(wire_ours), idle=5.0,
                       ranges=[(ID, start, pages) for start, pages in [*RANGES, big]])
    sock = listener()
    result: list[Tally] = []

    def relay_all() -> None:
        relay.connected(sock, 10.0)
        result.append(relay.run())

    threads = [threading.Thread(target=source.serve, daemon=True),
               threading.Thread(target=relay_all, daemon=True)]
    for t in threads:
        t.start()
    small = sum(n for _, n in RANGES)
    for _ in range(200):  # every small range asked, smallest first, before any fault
        if sum(n for _, n in source.asked) >= small:
            break
        threading.Event().wait(0.01)
    assert source.asked[0][0] == RANGES[1][0]  # 40 pages before 100
    assert sum(n for _, n in source.asked) == small
    daemon = socket.create_connection(sock.getsockname())
    rig = Rig(source, daemon, relay, result)
    asked = len(source.asked)
    got, _, data = rig.ask(RANGES[0][0] + 7 * PAGE, 1)
    assert (got, data) == (1, page(RANGES[0][0] + 7 * PAGE))
    assert relay.answered_here == 1
    assert all(start >= big[0] for start, _ in source.asked[asked:])  # only read-ahead
    daemon.close()
    for t in threads:
        t.join(10)
    wire_theirs.close()


@pytest.mark.parametrize("ranges", [[], [(ID, 0x10000, 4)]], ids=["quiet", "fetching"])
def test_a_wire_that_ends_before_lazy_pages_connects_ends_the_wait(
        ranges: list[tuple[int, int, int]]) -> None:
    """Not a wait for the timeout: lazy_relay reports it (a migration killed before the
    restore), whether the relay was fetching then or not."""
    from ctrmig.direct.relay import listener

    wire_ours, wire_theirs = socket.socketpair()
    wire_theirs.close()
    relay = Prefetcher(SocketEnd(wire_ours), idle=5.0, ranges=ranges)
    with pytest.raises((Broken, OSError)):
        relay.connected(listener(), 30.0)
