"""Post-copy's relay on the target, fetching pages ahead of the faults.

criu 4.2's ``lazy-pages`` asks the source for ONE page per fault (criu/uffd.c has no
fault-around) and the faulting task waits for it: a workload walking its memory pays one
round trip over the link per 4 KiB. This relay reads the page-server protocol
(criu/page-xfer.c): a request is a 32-byte ``page_server_iov`` (cmd, nr_pages, vaddr,
dst_id); ``PS_IOV_GET``'s answer is the same header, then the pages, and may hold fewer
pages than asked (lazy-pages takes what came and asks again for the rest). A small
request goes to the source as one of :data:`AHEAD` pages; the pages beyond what was
asked wait here, and requests for them are answered at once, without crossing the link.
The source serves a page as often as it is asked (``page_pipe_read`` tee()s from its
page pipes), so a page fetched ahead and never asked for costs only its transfer.

Fetching ahead without being asked: lazy-pages' background transfer asks one chunk at a
time and drops back to 64 KiB at every fault (criu/uffd.c ``update_xfer_len``), so over
ssh it crossed the link at one round trip per 64-128 KiB: 256 MiB took 14 s to arrive
after the restore. The source announces the ranges its dump serves (its pagemap's lazy
entries, :func:`preamble`) before the first request; the relay keeps up to
:data:`WINDOW_PAGES` of them in flight, from the last fault on (read-ahead), and
answers lazy-pages from what arrived. It never asks outside an announced range: criu's
page server ends the connection on a request for a page it does not hold.

Requests are handled one at a time, in order: lazy-pages reads its answers in the order
it asked, and criu's page server answers in the order it was asked. A command other
than ``PS_IOV_GET`` and the closing ones hands the rest of the connection to a plain
byte pump.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import logging
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctrmig.archive.criu_images import PAGEMAP_NAME, read_lazy_ranges
from ctrmig.direct.relay import CHUNK, STAMPS, End, SocketEnd, Tally
from ctrmig.errors import CriuImageError

log = logging.getLogger(__name__)

#: struct page_server_iov on x86-64 and arm64: u32 cmd (its low 16 bits the command),
#: 4 bytes of padding, u64 nr_pages, u64 vaddr, u64 dst_id.
HEADER = struct.Struct("=I4xQQQ")
CMD_MASK = 0xFFFF
PS_IOV_GET = 7
CLOSING = (0x1023, 0x1024)  # PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE: answered by an int32
PAGE = resource.getpagesize()
#: Pages asked for on a request of fewer. 32 (128 KiB) turns 31 of a sequential walk's 32
#: faults into answers from here.
AHEAD = 32
#: Fetched ahead, unasked: requests of this many pages, at most this many pages on the
#: way at once, and at most this many waiting here for lazy-pages to ask.
FETCH_PAGES = 64
WINDOW_PAGES = 256
HELD_PAGES = 16384  # 64 MiB
#: Before lazy-pages connects (CRIU restores meanwhile: 0.2-0.5 s here), the announced
#: ranges of at most SMALL_PAGES pages are fetched, smallest first, up to PREFILL_PAGES:
#: a process's stack, TLS and heap, which CRIU's restorer touches before the tasks
#: resume (its rseq area, its stack: each such fault waited 1-45 ms for its page) and
#: they touch first, rather than a big data region.
SMALL_PAGES = 256
PREFILL_PAGES = 1024

#: The announcement before the first request: magic, count, then (dst_id, vaddr, pages).
PREAMBLE = struct.Struct("=8sI")
PREAMBLE_MAGIC = b"ctrmigR1"
RANGE = struct.Struct("=QQQ")
MAX_RANGES = 1 << 20

#: (dst_id, vaddr, pages): pages the source's dump serves, dst_id the page server's id
#: of the task (its pagemap image's).
Ranges = Sequence[tuple[int, int, int]]


class Broken(Exception):
    """The link or the page server ended or stalled in the middle of the protocol."""


def lazy_ranges(images: Path | None) -> list[tuple[int, int, int]]:
    """The ranges a ``--lazy-pages`` dump into ``images`` serves (its pagemaps' lazy
    entries); none if they cannot be read (the relay then only fetches on request)."""
    found: list[tuple[int, int, int]] = []
    if images is None:
        return found
    try:
        for path in sorted(images.iterdir()):
            match = PAGEMAP_NAME.fullmatch(path.name)
            if match:
                found += [(int(match.group(1)), vaddr, pages)
                          for vaddr, pages in read_lazy_ranges(path.read_bytes(), path.name)]
    except (OSError, CriuImageError) as e:
        log.warning("post-copy: the dump's pagemap is unreadable, no pages are sent "
                    "ahead: %s", e)
        return []
    return found[:MAX_RANGES]


def preamble(ranges: Ranges) -> bytes:
    """What the source's relay writes on the wire before the page server's bytes."""
    return PREAMBLE.pack(PREAMBLE_MAGIC, len(ranges)) + b"".join(
        RANGE.pack(*r) for r in ranges)


def read_preamble(wire: End, timeout: float) -> list[tuple[int, int, int]]:
    """The source's announced ranges (:func:`preamble`); Broken if the wire ended first
    (the migration failed before the dump served its pages) or sent something else."""
    magic, count = PREAMBLE.unpack(_exactly(wire, PREAMBLE.size, timeout))
    if magic != PREAMBLE_MAGIC or count > MAX_RANGES:
        raise Broken("the source did not announce its pages: is ctrmig there the same "
                     "version as here?")
    data = _exactly(wire, count * RANGE.size, timeout)
    return [RANGE.unpack_from(data, i * RANGE.size) for i in range(count)]


def _exactly(end: End, size: int, timeout: float) -> bytes:
    data = memoryview(bytearray(size))
    got = 0
    deadline = time.monotonic() + timeout
    while got < size:
        if not end.readable(max(0.0, deadline - time.monotonic())):
            raise Broken(f"nothing arrived for {timeout:g} s")
        n = end.readinto(data[got:])
        if not n:
            raise Broken("the wire ended before the source announced its pages")
        got += n
    return bytes(data)


class Announced:
    """The announced ranges, and which of their pages were asked for already."""

    def __init__(self, ranges: Ranges):
        self._ranges = sorted(ranges)
        self._keys = [(d, v) for d, v, _ in self._ranges]
        self._asked = [bytearray(n) for _, _, n in self._ranges]  # 1: asked
        self.left = sum(n for _, _, n in self._ranges)
        self._cursor = (0, 0)  # (range, page) where fetching ahead goes on

    def _find(self, dst_id: int, vaddr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._keys, (dst_id, vaddr)) - 1
        if i < 0:
            return None
        d, start, pages = self._ranges[i]
        at = (vaddr - start) // PAGE
        return (i, at) if d == dst_id and at < pages else None

    def claim(self, dst_id: int, vaddr: int, most: int) -> int:
        """Pages from ``vaddr`` not asked yet (up to ``most``, within its range), now
        asked; 0 if ``vaddr`` is not announced or asked already. Fetching ahead goes
        on after them."""
        found = self._find(dst_id, vaddr)
        if found is None:
            return 0
        i, at = found
        n = self._take(i, at, most)
        self._cursor = (i, at + n)
        return n

    def release(self, dst_id: int, vaddr: int, pages: int) -> None:
        """``pages`` from ``vaddr`` were asked but did not come (a short answer)."""
        found = self._find(dst_id, vaddr)
        if found is not None:
            i, at = found
            end = min(at + pages, len(self._asked[i]))
            self.left += self._asked[i].count(1, at, end)
            self._asked[i][at:end] = bytes(end - at)

    def small(self, largest: int, budget: int, most: int) -> list[tuple[int, int, int]]:
        """The ranges of at most ``largest`` pages, smallest first, up to ``budget``
        pages in all, as requests of at most ``most`` pages, now asked."""
        found: list[tuple[int, int, int]] = []
        for i in sorted(range(len(self._ranges)), key=lambda i: self._ranges[i][2]):
            d, start, pages = self._ranges[i]
            if pages > largest or pages > budget:
                break
            budget -= pages
            for at in range(0, pages, most):
                n = self._take(i, at, most)
                if n:
                    found.append((d, start + at * PAGE, n))
        return found

    def next(self, most: int) -> tuple[int, int, int] | None:
        """The next pages to fetch ahead, (dst_id, vaddr, pages), from the cursor on
        (wrapping), now asked; None when every page was asked."""
        i, at = self._cursor
        for _ in range(len(self._ranges) + 1):
            if not self.left:
                return None
            if i < len(self._ranges):
                free = self._asked[i].find(0, at)
                if free >= 0:
                    n = self._take(i, free, most)
                    self._cursor = (i, free + n)
                    d, start, _ = self._ranges[i]
                    return d, start + free * PAGE, n
            i, at = (i + 1) % len(self._ranges), 0
        return None

    def _take(self, i: int, at: int, most: int) -> int:
        asked = self._asked[i]
        if at >= len(asked) or asked[at]:
            return 0
        end = asked.find(1, at, at + most)
        n = (min(at + most, len(asked)) if end < 0 else end) - at
        asked[at:at + n] = b"\x01" * n
        self.left -= n
        return n


@dataclass(eq=False)
class Wanted:
    """A request on the wire whose answer has not been read."""

    dst_id: int
    vaddr: int
    pages: int
    give: int  # the pages lazy-pages waits for (0: fetched ahead)

    def covers(self, dst_id: int, vaddr: int) -> bool:
        return dst_id == self.dst_id and 0 <= vaddr - self.vaddr < self.pages * PAGE


class Prefetcher:
    """Relay ``criu lazy-pages`` (``daemon``) to the source's page server (``wire``);
    :meth:`run` returns what came over the wire (bytes, sha256, how it ended).
    ``ranges``: what the source announced (:func:`read_preamble`), fetched ahead."""

    def __init__(self, wire: End, daemon: End | None = None, *, idle: float | None,
                 ranges: Ranges = ()):
        self.wire, self.idle = wire, idle
        self.daemon: End = daemon or End()  # none until connected
        self.tally = Tally()
        self.answered_here = 0  # requests answered from pages fetched ahead
        self.fetched_ahead = 0  # pages fetched unasked
        self._digest = hashlib.sha256()
        self._ahead: dict[tuple[int, int], memoryview] = {}  # (dst_id, vaddr) -> a page
        self._answer = 0  # the command word of the source's answers (PS_IOV_ADD_F, flags)
        self._announced = Announced(ranges)
        self._wanted: collections.deque[Wanted] = collections.deque()
        self._fetching = 0  # pages on the way, fetched ahead
        self._closing = False

    def connected(self, sock: socket.socket, timeout: float) -> None:
        """Wait (up to ``timeout``) for lazy-pages to connect to ``sock``, the end to
        relay to; meanwhile fetch the small announced ranges (:data:`SMALL_PAGES`).
        TimeoutError, or Broken if the wire ends first (the migration failed)."""
        try:
            for got in self._announced.small(SMALL_PAGES, PREFILL_PAGES, FETCH_PAGES):
                self._fetching += got[2]
                self._ask(PS_IOV_GET, Wanted(*got, give=0))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                ready = select.select([sock.fileno(), self.wire.fileno()], [], [],
                                      max(0.0, left))[0]
                if sock.fileno() in ready:
                    conn, _ = sock.accept()
                    break
                if not ready:
                    raise TimeoutError(f"nothing connected within {timeout:g} s")
                if not self._wanted:  # the source sends nothing unasked: its end
                    raise Broken("the link ended first")
                self._take()
        finally:
            sock.close()
        conn.settimeout(None)
        self.daemon = SocketEnd(conn)

    def run(self) -> Tally:
        try:
            self._serve()
        except (Broken, OSError) as e:
            self.tally.error = str(e) or type(e).__name__
            self.wire.close()
            self.daemon.close()
        finally:
            self.tally.sha256 = self._digest.hexdigest()
            self._ahead.clear()
        return self.tally

    def _serve(self) -> None:
        while True:
            self._fetch_ahead()
            request = self._request()
            if request is None:
                # lazy-pages is done, and so is the source once it sees our end. Nothing
                # more comes from it: waiting for its EOF was 10 s (LAZY_IDLE) over ssh,
                # whose client signals the end of its stdout only when it exits.
                self._settle()
                self.wire.close_write()
                self.daemon.close_write()
                return
            cmd, nr_pages, vaddr, dst_id = HEADER.unpack(request)
            if cmd & CMD_MASK == PS_IOV_GET and nr_pages > 0:
                self._get(cmd, nr_pages, vaddr, dst_id)
            elif cmd & CMD_MASK in CLOSING:
                self._settle()
                self.wire.write(request)
                self.daemon.write(self._from_wire(4))
            else:
                self._settle()
                self.wire.write(request)
                self._plain()
                return

    def _get(self, cmd: int, nr_pages: int, vaddr: int, dst_id: int) -> None:
        while (dst_id, vaddr) not in self._ahead and any(
                w.covers(dst_id, vaddr) for w in self._wanted):
            self._take()  # it is on its way: fetched ahead
        here = 0
        while here < nr_pages and (dst_id, vaddr + here * PAGE) in self._ahead:
            here += 1
        if here:
            self.answered_here += 1
            pages = [self._ahead.pop((dst_id, vaddr + i * PAGE)) for i in range(here)]
            self.daemon.write(HEADER.pack(self._answer, here, vaddr, dst_id) + b"".join(pages))
            return
        ask = self._announced.claim(dst_id, vaddr, max(nr_pages, AHEAD))
        if not ask:  # not announced: ask ahead blindly, the source clamps at its range
            ask = max(nr_pages, AHEAD)
            for i in range(1, ask):  # up to the first page already waiting here
                if (dst_id, vaddr + i * PAGE) in self._ahead:
                    ask = i
                    break
        wanted = Wanted(dst_id, vaddr, ask, give=nr_pages)
        self._ask(cmd, wanted)
        self._fetch_ahead()  # the read-ahead follows the fault on the wire
        while wanted in self._wanted:
            self._take()

    def _ask(self, cmd: int, wanted: Wanted) -> None:
        self.wire.write(HEADER.pack(cmd, wanted.pages, wanted.vaddr, wanted.dst_id))
        self._wanted.append(wanted)

    def _fetch_ahead(self) -> None:
        """Ask for announced pages nobody asked yet, up to the window and the hold."""
        while (not self._closing and self._fetching < WINDOW_PAGES
               and len(self._ahead) + self._fetching < HELD_PAGES):
            got = self._announced.next(FETCH_PAGES)
            if got is None:
                return
            self._fetching += got[2]
            self._ask(PS_IOV_GET, Wanted(*got, give=0))

    def _take(self) -> None:
        """Read the answer to the oldest request on the wire: pass lazy-pages its pages
        (as they arrive), keep the rest here."""
        wanted = self._wanted[0]
        answer, got, at, of = HEADER.unpack(self._from_wire(HEADER.size))
        if (at, of) != (wanted.vaddr, wanted.dst_id) or not 0 < got <= wanted.pages:
            raise Broken(f"the source's page server answered {got} pages at {at:#x} of "
                         f"{of} to a request of {wanted.pages} at {wanted.vaddr:#x} of "
                         f"{wanted.dst_id}")
        self._answer = answer
        given = min(got, wanted.give)
        if given:
            self.daemon.write(HEADER.pack(answer, given, at, of))
        data = self._from_wire(got * PAGE, passed=given * PAGE)
        self._wanted.popleft()
        if not wanted.give:
            self._fetching -= wanted.pages
            self.fetched_ahead += got
        for i in range(given, got):
            self._ahead[(of, at + i * PAGE)] = data[i * PAGE:(i + 1) * PAGE]
        if got < wanted.pages:
            self._announced.release(of, at + got * PAGE, wanted.pages - got)

    def _settle(self) -> None:
        """Fetch nothing more, and read every answer still on its way (before a request
        that is not a GET, or the end)."""
        self._closing = True
        while self._wanted:
            self._take()

    def _request(self) -> bytearray | None:
        """lazy-pages' next request (meanwhile, the answers to what was fetched ahead are
        read); None at its EOF."""
        while self._wanted:
            ready = select.select([self.daemon.fileno(), self.wire.fileno()], [], [],
                                  self.idle)[0]
            if not ready:
                raise Broken(f"nothing arrived for {self.idle:g} s: the link is down")
            if self.daemon.fileno() in ready:
                break
            self._take()
            self._fetch_ahead()
        data = bytearray(HEADER.size)
        got = 0
        while got < len(data):
            n = self._read(self.daemon, memoryview(data)[got:])
            if not n:
                if got == 0:
                    return None
                raise Broken("lazy-pages ended in the middle of a request")
            got += n
        return data

    def _from_wire(self, size: int, passed: int = 0) -> memoryview:
        """``size`` bytes from the wire (hashed), passing the first ``passed`` on to
        lazy-pages as they arrive: a background chunk (up to 4 MiB) is not held back
        until its last byte."""
        data = memoryview(bytearray(size))
        got = sent = 0
        while got < size:
            n = self._read(self.wire, data[got:])
            if not n:
                raise Broken("the page stream ended in the middle of an answer")
            self._count(data[got:got + n])
            got += n
            if sent < min(got, passed):
                self.daemon.write(data[sent:min(got, passed)])
                sent = min(got, passed)
        return data

    def _read(self, end: End, into: memoryview) -> int:
        """One read from ``end`` (0 at its EOF), waiting at most ``idle`` for it."""
        if self.idle is not None and not end.readable(self.idle):
            raise Broken(f"nothing arrived for {self.idle:g} s: the link is down")
        return end.readinto(into)

    def _count(self, piece: memoryview) -> None:
        if len(self.tally.stamps) < STAMPS:
            self.tally.stamps.append(time.monotonic())
        self.tally.bytes += len(piece)
        self._digest.update(piece)

    def _plain(self) -> None:
        """A command this relay does not know: from here on, bytes both ways."""
        back = threading.Thread(target=self._pump, args=(self.daemon, self.wire),
                                kwargs={"hashed": False}, name="ctrmig-lazy-in-back",
                                daemon=True)
        back.start()
        self._pump(self.wire, self.daemon, hashed=True)
        back.join()

    def _pump(self, src: End, dst: End, *, hashed: bool) -> None:
        buffer = memoryview(bytearray(CHUNK))
        while True:
            # Only the wire's silence means a dead link (as in Relay); lazy-pages may pause.
            n = self._read(src, buffer) if hashed else src.readinto(buffer)
            if not n:
                break
            dst.write(buffer[:n])
            if hashed:
                self._count(buffer[:n])
        dst.close_write()
