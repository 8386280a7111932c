"""Byte pumps: CRIU's page-server connection <-> the link to the other ctrmig.

A :class:`Relay` copies both ways between two :class:`End` s and hashes the forward
direction (toward the target: the page data), so that both ctrmigs can compare what one
sent with what the other got. The link is a socket pair (both ends in one process) or an
ssh session's stdio (ctrmig on the other host): never a port beyond loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 1 << 20
#: Socket buffers of a relay's ends. The default (~208 KiB on a socket pair) kept CRIU's
#: dump, both relays and the page server in lockstep: 4 MiB took a 1 GiB pre-copy stream
#: from a median of 3.30 s to 2.67 s (6 interleaved runs each, this 2-core host).
SOCKET_BUFFER = 4 << 20
STAMPS = 256
LOOPBACK = "127.0.0.1"


class End:
    """One side of a relay: something to read from and to write to."""

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: memoryview) -> int:
        """Read into ``buffer``; 0 at EOF."""
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def close_write(self) -> None:
        """No more data will be written (the reader sees EOF)."""

    def close(self) -> None:
        """Release it entirely; a blocked reader of this end returns."""

    def readable(self, timeout: float) -> bool:
        """Whether a read would not block, waiting up to ``timeout`` seconds."""
        return True

    def fileno(self) -> int:
        """The descriptor it is read from (to wait for it with others)."""
        raise NotImplementedError


class SocketEnd(End):
    def __init__(self, sock: socket.socket):
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Post-copy answers a fault with a header, then the page: Nagle held our
            # second write back until the first was acked. A fault's round trip through
            # both relays took 3.1 ms on average without TCP_NODELAY (CRIU's own
            # setting), 0.2 ms with it (bench/profile_runc.py's notes).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _grow_buffers(sock)

    def read(self, n: int) -> bytes:
        return self.sock.recv(n)

    def readinto(self, buffer: memoryview) -> int:
        return self.sock.recv_into(buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def close_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def fileno(self) -> int:
        return self.sock.fileno()


class FdEnd(End):
    """A pair of pipe fds (an ssh child's stdout and stdin, or our own stdin and stdout)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self._closed: set[int] = set()

    def read(self, n: int) -> bytes:
        return os.read(self.read_fd, n)

    def readinto(self, buffer: memoryview) -> int:
        return os.readv(self.read_fd, [buffer])

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def _close(self, fd: int) -> None:
        if fd not in self._closed:
            self._closed.add(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_write(self) -> None:
        self._close(self.write_fd)

    def close(self) -> None:
        self._close(self.write_fd)
        self._close(self.read_fd)

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.read_fd], [], [], timeout)[0])

    def fileno(self) -> int:
        return self.read_fd


@dataclass
class Tally:
    """What went one way through a relay: how many bytes, their sha256, how it ended."""

    bytes: int = 0
    sha256: str = ""
    error: str = ""  # why the copy stopped before its EOF ("" : it ended cleanly)
    #: When the first reads arrived (time.monotonic(), at most STAMPS of them).
    stamps: list[float] = field(default_factory=list)

    def first_after(self, moment: float) -> float | None:
        """When the first read after ``moment`` arrived, if one did (and was stamped)."""
        return next((t for t in self.stamps if t >= moment), None)

    def as_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "sha256": self.sha256}


class Relay:
    """Copy ``source`` -> ``sink`` (hashed: the forward direction, toward the target) and
    ``sink`` -> ``source`` (CRIU's answers and requests).

    ``idle`` (seconds): the forward copy counts the link as broken when nothing arrives
    for that long (post-copy pages are fetched without pause until the last one, so
    silence means a dead link, not a slow one).
    """

    def __init__(self, source: End, sink: End, *, name: str, idle: float | None = None,
                 on_break: Callable[[], None] | None = None):
        """``on_break``: called before anything is closed when the backward copy ends (the
        far side is done) or either copy fails."""
        self.source, self.sink = source, sink
        self.on_break = on_break
        self.forward = Tally()
        self.backward = Tally()
        self.idle = idle
        self._threads = [
            threading.Thread(target=self._copy, args=(source, sink, self.forward, True),
                             name=f"{name}-fwd", daemon=True),
            threading.Thread(target=self._copy, args=(sink, source, self.backward, False),
                             name=f"{name}-back", daemon=True),
        ]

    def start(self) -> Relay:
        for t in self._threads:
            t.start()
        return self

    def _copy(self, src: End, dst: End, tally: Tally, hashed: bool) -> None:
        digest = hashlib.sha256()
        # One buffer, read into again and again: a new 1 MiB bytes object per read
        # (then cut to what arrived) made a post-copy fault's round trip through both
        # relays 2-2.5x slower (154-220 us against 61-87 us, bench/profile_runc.py notes).
        buffer = memoryview(bytearray(CHUNK))
        try:
            while True:
                if hashed and self.idle is not None and not src.readable(self.idle):
                    tally.error = f"nothing arrived for {self.idle:g} s: the link is down"
                    break
                n = src.readinto(buffer)
                if not n:
                    break
                data = buffer[:n]
                if len(tally.stamps) < STAMPS:
                    tally.stamps.append(time.monotonic())
                tally.bytes += n
                # Forward first, hash after: the far side works on the piece meanwhile. A
                # post-copy fault waits for the background chunk ahead of it (64 KiB, CRIU's
                # reset size) to pass both relays: each digest first added ~60 us there.
                dst.write(data)
                if hashed:
                    digest.update(data)
        except OSError as e:
            tally.error = str(e) or type(e).__name__
        finally:
            tally.sha256 = digest.hexdigest()
            if self.on_break is not None and (tally.error or not hashed):
                self.on_break()
            dst.close_write()
            if tally.error:
                # A broken side ends the other direction too (its reads return).
                src.close()
                dst.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for both directions to end; False if they did not within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def error(self) -> str:
        return self.forward.error or self.backward.error

    def close(self) -> None:
        """Tear both ends down (the copies then end)."""
        self.source.close()
        self.sink.close()


# Linux: set a buffer above net.core.[rw]mem_max (needs CAP_NET_ADMIN; else the plain
# option, capped at that maximum).
_FORCE = {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}  # SO_SNDBUFFORCE, SO_RCVBUFFORCE


def _grow_buffers(sock: socket.socket) -> None:
    for option, forced in _FORCE.items():
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def listener() -> socket.socket:
    """A TCP socket listening on loopback, on a port the kernel picked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(1)
    return sock


def free_port() -> int:
    """A loopback port free right now, for a tool that must be told one to listen on
    (CRIU's lazy page server binds it itself; the window for another taker is tiny)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def accept(sock: socket.socket, timeout: float, *, quiet: End | None = None) -> socket.socket:
    """The one connection ``sock`` waits for; TimeoutError after ``timeout`` seconds.
    ``quiet``: an end that has nothing to say until then; if it does (its EOF: the other
    side gave up), ConnectionAbortedError at once."""
    watched = [sock.fileno()] + ([quiet.fileno()] if quiet is not None else [])
    try:
        ready = select.select(watched, [], [], timeout)[0]
        if not ready:
            raise TimeoutError(f"nothing connected within {timeout:g} s")
        if sock.fileno() not in ready:
            raise ConnectionAbortedError("the link ended first")
        conn, _ = sock.accept()
    finally:
        sock.close()
    conn.settimeout(None)
    return conn


def connect(port: int, timeout: float) -> socket.socket:
    """Connect to loopback ``port``, retrying until something listens (``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
            sock.settimeout(None)
            return sock
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
