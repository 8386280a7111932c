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

Requests are handled one at a time, in order: lazy-pages reads its answers in the order
it asked. A command other than ``PS_IOV_GET`` and the closing ones hands the rest of the
connection to a plain byte pump.
"""

from __future__ import annotations

import hashlib
import resource
import struct
import threading
import time

from ctrmig.direct.relay import CHUNK, STAMPS, End, Tally

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


class Broken(Exception):
    """The link or the page server ended or stalled in the middle of the protocol."""


class Prefetcher:
    """Relay ``criu lazy-pages`` (``daemon``) to the source's page server (``wire``);
    :meth:`run` returns what came over the wire (bytes, sha256, how it ended)."""

    def __init__(self, wire: End, daemon: End, *, idle: float | None):
        self.wire, self.daemon, self.idle = wire, daemon, idle
        self.tally = Tally()
        self.answered_here = 0  # requests answered from pages fetched ahead
        self._digest = hashlib.sha256()
        self._ahead: dict[tuple[int, int], memoryview] = {}  # (dst_id, vaddr) -> a page
        self._answer = 0  # the command word of the source's answers (PS_IOV_ADD_F, flags)

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
            request = self._request()
            if request is None:  # lazy-pages is done: so is the source, once it sees EOF
                self.wire.close_write()
                self._pump(self.wire, self.daemon, hashed=True)
                return
            cmd, nr_pages, vaddr, dst_id = HEADER.unpack(request)
            if cmd & CMD_MASK == PS_IOV_GET and nr_pages > 0:
                self._get(cmd, nr_pages, vaddr, dst_id)
            elif cmd & CMD_MASK in CLOSING:
                self.wire.write(request)
                self.daemon.write(self._from_wire(4))
            else:
                self.wire.write(request)
                self._plain()
                return

    def _get(self, cmd: int, nr_pages: int, vaddr: int, dst_id: int) -> None:
        here = 0
        while here < nr_pages and (dst_id, vaddr + here * PAGE) in self._ahead:
            here += 1
        if here:
            self.answered_here += 1
            pages = [self._ahead.pop((dst_id, vaddr + i * PAGE)) for i in range(here)]
            self.daemon.write(HEADER.pack(self._answer, here, vaddr, dst_id) + b"".join(pages))
            return
        ask = max(nr_pages, AHEAD)
        for i in range(1, ask):  # up to the first page already waiting here
            if (dst_id, vaddr + i * PAGE) in self._ahead:
                ask = i
                break
        self.wire.write(HEADER.pack(cmd, ask, vaddr, dst_id))
        answer, got, at, of = HEADER.unpack(self._from_wire(HEADER.size))
        if (at, of) != (vaddr, dst_id) or not 0 < got <= ask:
            raise Broken(f"the source's page server answered {got} pages at {at:#x} of "
                         f"{of} to a request of {ask} at {vaddr:#x} of {dst_id}")
        given = min(got, nr_pages)
        self._answer = answer
        self.daemon.write(HEADER.pack(answer, given, vaddr, dst_id))
        data = self._from_wire(got * PAGE, passed=given * PAGE)
        for i in range(given, got):
            self._ahead[(dst_id, vaddr + i * PAGE)] = data[i * PAGE:(i + 1) * PAGE]

    def _request(self) -> bytearray | None:
        """lazy-pages' next request; None at its EOF."""
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
