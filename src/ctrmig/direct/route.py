"""The direct route of ``migrate``: runc -> runc and process -> process, no archive of the
memory anywhere, the stages overlapping.

Pre-copy: ctrmig on the target starts ``criu page-server`` (its socket one end of a
socket pair, no port), and the source's dump sends its pages to a loopback relay of ours
while it dumps; the relay pumps them over the link, hashing on both ends. The small
archive of everything but the pages follows, carrying the source's sha256 of the page
stream; the target checks what it received against it, then restores from both.
The source stays frozen (runc: paused; a process: stopped) with its memory intact until
the target runs, so a rollback is an unfreeze.

Post-copy (``lazy``): the source's dump freezes the container, writes everything but the
memory and serves the pages on loopback; the target restores at once and ``criu
lazy-pages`` fetches the pages through the relay, on fault and in the background. The
source ends only when the last page arrived. If the link or either side fails before,
the target (whose memory is incomplete) is killed and the source's CRIU lets go of the
container, which runs on there.

The link: a socket pair when the target is on this host, else an ssh session running
``ctrmig _pages`` there (stdio relay: no port opens beyond loopback on either host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ctrmig.direct import guard as guard_module
from ctrmig.direct import pages, prefetch, relay
from ctrmig.direct.relay import End, FdEnd, Relay, SocketEnd
from ctrmig.engines.remote import RemoteMigrator
from ctrmig.errors import ChecksumError, CtrmigError, EngineError, OptionError
from ctrmig.host import criu, proc
from ctrmig.options import RestoreOptions
from ctrmig.protocol import Migrator

log = logging.getLogger(__name__)

ENGINES = ("runc", "process")
#: ``migrate``'s routes: auto is direct where it applies (runc, process), else archive.
ROUTES = ("auto", "direct", "archive")
START_TIMEOUT = 60.0  # for a page helper on the target to say it is ready
FINISH_TIMEOUT = 120.0


def applies(source: Migrator, target: Migrator) -> bool:
    """Whether the direct route can carry this migration: the same engine (runc or
    process) on both ends, the source on this host, the target here or over ssh."""
    return (source.engine == target.engine and source.engine in ENGINES
            and hasattr(source, "sending_pages")
            and (isinstance(target, RemoteMigrator) or hasattr(target, "sending_pages")))


def choose(route: str, source: Migrator, target: Migrator) -> bool:
    """Whether to take the direct route for ``route`` (one of :data:`ROUTES`)."""
    if route not in ROUTES:
        raise OptionError(f"unknown route {route!r}", hint=f"one of {', '.join(ROUTES)}")
    fits = applies(source, target)
    if route == "direct" and not fits:
        raise OptionError(
            f"the direct route moves runc -> runc and process -> process, from this host; "
            f"not {source.engine} -> {target.engine}", hint="use --route archive")
    return route == "direct" or (route == "auto" and fits)


# --- the target's ends, here or over ssh -------------------------------------------------

Announce = Callable[[dict[str, Any]], None]


def serve_receive(wire: End, announce: Announce, timeout: float,
                  parent: Path | None = None) -> dict[str, Any]:
    """Pre-copy, on the target: a page server fed from ``wire``, writing into a new dir
    under ``parent`` (the target's workdir, where it extracts archives); announces it."""
    directory = pages.new_directory(parent)
    try:
        receiver = pages.Receiver(directory, wire)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        announce({"dir": str(directory)})
    except BaseException:
        # Whoever asked is gone (a migrate killed at its start: the announcement met a
        # closed ssh, BrokenPipeError) and no journal names the dir: drop it here.
        proc.kill_group(receiver.daemon)
        wire.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return receiver.finish(timeout)


def serve_relay(wire: End, announce: Announce, timeout: float,
                parent: Path | None = None) -> dict[str, Any]:
    """Post-copy, on the target: a loopback port for ``criu lazy-pages``, relayed to
    ``wire``; announces the port."""
    tally = pages.lazy_relay(wire, lambda port: announce({"port": port}), timeout=timeout)
    return {**tally.as_dict(), "error": tally.error}


SERVE: dict[str, Callable[[End, Announce, float, Path | None], dict[str, Any]]] = {
    "receive": serve_receive, "relay": serve_relay}


def serve_stdio(role: str, argument: str | None = None) -> int:
    """``ctrmig _pages ROLE``: one of :data:`SERVE` with the link on stdin/stdout (an ssh
    session); the first stdout line says where, the last stderr line what passed."""
    if role == "clean":
        if argument:
            pages.remove_directory(argument)
        return 0
    wire = FdEnd(0, 1)

    def announce(info: dict[str, Any]) -> None:
        os.write(1, (json.dumps(info) + "\n").encode())

    result = SERVE[role](wire, announce, FINISH_TIMEOUT, None)
    os.write(2, (pages.summary_line(result) + "\n").encode())
    return 1 if result.get("error") else 0


class Link(Protocol):
    """The target's end of the pages, as the source sees it."""

    wire: End
    info: dict[str, Any]

    def finish(self, timeout: float) -> dict[str, Any]: ...

    def abort(self) -> None: ...

    def clean(self) -> None: ...


class LocalLink:
    """The target's end in this process (a target engine on this host)."""

    def __init__(self, role: str, parent: Path | None = None,
                 timeout: float = FINISH_TIMEOUT):
        ours, theirs = socket.socketpair()
        self.wire: End = SocketEnd(ours)
        self._result: dict[str, Any] = {}
        said: queue.Queue[dict[str, Any] | None] = queue.Queue()

        def run() -> None:
            try:
                self._result.update(SERVE[role](SocketEnd(theirs), said.put, timeout, parent))
            except BaseException as e:  # reported through finish()
                self._result["error"] = str(e) or type(e).__name__
                said.put(None)

        self._thread = threading.Thread(target=run, name=f"ctrmig-pages-{role}", daemon=True)
        self._thread.start()
        info = said.get(timeout=START_TIMEOUT)
        if info is None:
            raise EngineError(f"the target's page {role} did not start: "
                              f"{self._result.get('error')}")
        self.info = info

    def finish(self, timeout: float) -> dict[str, Any]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abort()
            return {"error": f"the target's page stream did not end within {timeout:g} s"}
        return self._result

    def abort(self) -> None:
        self.wire.close()

    def clean(self) -> None:
        if "dir" in self.info:
            pages.remove_directory(str(self.info["dir"]))


def discard_pages(target: Migrator, directory: str) -> None:
    """Remove the pages directory a receiver made for ``target`` (here or over ssh) that
    no restore took: a killed migration's, found in its journal by ``ctrmig recover``."""
    if isinstance(target, RemoteMigrator):
        with contextlib.suppress(CtrmigError):
            proc.run(target.helper_argv("_pages", "clean", directory), timeout=60)
    else:
        pages.remove_directory(directory)


class SshLink:
    """The target's end in ``ctrmig _pages ROLE`` on the target host, over ssh stdio."""

    def __init__(self, remote: RemoteMigrator, role: str):
        self.remote = remote
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self.child = proc.spawn(remote.helper_argv("_pages", role), stdin=in_r,
                                    stdout=out_w, stderr=subprocess.PIPE)
        except BaseException:
            for fd in (in_w, out_r):
                os.close(fd)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        self.wire: End = FdEnd(out_r, in_w)
        self._stderr: list[bytes] = []
        err = self.child.stderr
        assert err is not None
        self._reader = threading.Thread(target=lambda: self._stderr.append(err.read()),
                                        daemon=True)
        self._reader.start()
        line = _read_line(out_r, START_TIMEOUT)
        if not line:
            self.abort()
            self._reader.join(5)
            raise remote.error(self.stderr, f"ctrmig _pages {role} on {remote.address}")
        self.info: dict[str, Any] = json.loads(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def finish(self, timeout: float) -> dict[str, Any]:
        try:
            self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.abort()
        self._reader.join(5)
        self.wire.close()
        summary = pages.parse_summary(self.stderr)
        if summary is None:
            return {"error": f"the page helper on {self.remote.address} said nothing "
                             f"(exit {self.child.returncode}): {proc.tail(self.stderr, 3)}"}
        return summary

    def abort(self) -> None:
        proc.kill_group(self.child)
        self.wire.close()

    def clean(self) -> None:
        if "dir" in self.info:
            discard_pages(self.remote, str(self.info["dir"]))


def _read_line(fd: int, timeout: float) -> bytes:
    """One line from ``fd``, byte by byte (what follows it belongs to the relay)."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return b""
        byte = os.read(fd, 1)
        if not byte:
            return b""
        line += byte
    return line


def open_link(target: Migrator, role: str) -> Link:
    if isinstance(target, RemoteMigrator):
        return SshLink(target, role)
    workdir = getattr(target, "workdir", None)
    return LocalLink(role, Path(workdir) if workdir is not None else None)


# --- the source's end ----------------------------------------------------------------------


class Outcome:
    """The target's restore: not yet known, succeeded, or failed."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.at = 0.0  # when it became known (time.monotonic())

    def set(self, ok: bool) -> None:
        self.ok = ok
        self.at = time.monotonic()
        self.done.set()


class Feeder:
    """The source's relay between its dump's page-server socket and the link.

    Pre-copy: it listens on loopback for the dump's connection. Post-copy: it connects to
    the port the dump serves on, once the dump is ready; and when the link ends it never
    just closes the dump's socket (CRIU could take that for the end): it waits until the
    dump ends by itself or the target's restore failed, and then kills the dump, which
    lets go of the container so that it runs on at the source.
    """

    def __init__(self, wire: End, sink: pages.PageSink, outcome: Outcome,
                 listening: socket.socket | None, timeout: float):
        self.wire, self.sink, self.outcome = wire, sink, outcome
        self.relay: Relay | None = None
        self.error = ""
        self._timeout = timeout
        self._listening = listening
        self._ready = threading.Event()
        self._guard: tuple[subprocess.Popen[bytes], int] | None = None
        self._thread = threading.Thread(target=self._run, name="ctrmig-pages-out",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._listening is not None:
                conn = relay.accept(self._listening, self._timeout)
            else:
                deadline = time.monotonic() + self._timeout
                while "dumped" not in self.sink.marks:
                    if time.monotonic() > deadline or self.outcome.done.is_set():
                        raise TimeoutError("the dump never served its pages")
                    time.sleep(0.01)
                conn = relay.connect(self.sink.port, 30.0)
                self._guard = _guard(conn, self.sink.serving)
                self.wire.write(prefetch.preamble(prefetch.lazy_ranges(self.sink.images)))
            on_break = self._hold_source if self.sink.lazy else None
            self.relay = Relay(SocketEnd(conn), self.wire, name="ctrmig-pages-out",
                               on_break=on_break).start()
        except (OSError, TimeoutError) as e:
            self.error = str(e) or type(e).__name__
            self.wire.close()
        finally:
            self._ready.set()

    def _hold_source(self) -> None:
        """Post-copy, the link ended. CRIU's lazy dump takes the end of its socket for
        "every page sent" and then ends the source's tasks (criu 4.2: "Lazy pages transfer
        finished successfully" on EOF), so the socket stays open until the target's
        restore is known: it succeeded (every page arrived: let the dump end), or it
        failed, and the dump is killed first, which lets the container run on here."""
        serving = self.sink.serving
        self.outcome.done.wait()
        if not self.outcome.ok and serving is not None and serving.poll() is None:
            log.warning("post-copy broke: stopping the source's page server, so that the "
                        "container runs on there")
            proc.kill_group(serving)
        self.release()

    def release(self) -> None:
        """The outcome is known: the guard (see :mod:`.guard`) may let go."""
        guard, self._guard = self._guard, None
        if guard is not None:
            child, pipe = guard
            with contextlib.suppress(OSError):
                os.write(pipe, guard_module.RELEASE)
            os.close(pipe)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)

    def sent(self) -> dict[str, Any]:
        """Pre-copy, after the dump: what went to the target (waits for the stream's end)."""
        self._ready.wait(self._timeout)
        if self.relay is None or not self.relay.wait(self._timeout):
            raise EngineError(f"the page stream to the target did not end: {self.error}")
        if self.relay.error:
            raise EngineError(f"the page stream to the target broke: {self.relay.error}")
        return self.relay.forward.as_dict()

    @property
    def sent_bytes(self) -> int:
        """Bytes of the page stream that went toward the target so far."""
        return self.relay.forward.bytes if self.relay is not None else 0

    def first_request_after(self, moment: float) -> float | None:
        """Post-copy: when the target first asked for pages after ``moment`` (the archive
        sent): it has been restored and runs, faulting its memory in."""
        return self.relay.backward.first_after(moment) if self.relay is not None else None

    def wait(self, timeout: float) -> None:
        self._ready.wait(timeout)
        if self.relay is not None:
            self.relay.wait(timeout)

    def abort(self) -> None:
        serving = self.sink.serving
        if serving is not None and serving.poll() is None and not self.outcome.ok:
            proc.kill_group(serving)  # never let a serving dump see its socket end
        self.release()
        if self._listening is not None:
            self._listening.close()
        if self.relay is not None:
            self.relay.close()
        self.wire.close()


def _guard(conn: socket.socket, serving: subprocess.Popen[bytes] | None
           ) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start the guard holding ``conn`` open while a post-copy runs (see :mod:`.guard`);
    return it and the pipe that releases it."""
    if serving is None:
        return None
    read_fd, write_fd = os.pipe()
    try:
        child = proc.spawn([sys.executable, "-m", "ctrmig.direct.guard", str(conn.fileno()),
                            str(read_fd), str(serving.pid)],
                           pass_fds=[conn.fileno(), read_fd])
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return child, write_fd


class WatchedTarget:
    """The target migrator, reporting its restore's outcome (see :class:`Feeder`)."""

    def __init__(self, target: Migrator, outcome: Outcome,
                 on_failure: Callable[[], None], on_success: Callable[[], None]):
        self._target, self._outcome = target, outcome
        self._on_failure, self._on_success = on_failure, on_success

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def restore(self, *args: Any, **kwargs: Any) -> str:
        try:
            name = self._target.restore(*args, **kwargs)
        except BaseException:
            self._outcome.set(False)
            self._on_failure()
            raise
        self._outcome.set(True)
        self._on_success()
        return name


class WatchedSource:
    """The source migrator; its resume (the rollback) knows that a failed post-copy has
    already let the container run on at the source."""

    def __init__(self, source: Migrator, plan: Plan):
        self._source, self._plan = source, plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def resume(self, container: str) -> None:
        if self._plan.sink.lazy:
            self._plan.target_failed()  # the serving dump is gone: CRIU let go
            if any(c.state == "running" for c in self._source.list()
                   if container in (c.name, c.id)):
                return
        self._source.resume(container)


@dataclasses.dataclass
class Plan:
    """What the direct route hands the migration: a sink for the source's dump, the
    restore options the target needs, and what to finish or undo afterwards."""

    sink: pages.PageSink
    restore: RestoreOptions
    link: Link
    feeder: Feeder
    outcome: Outcome

    def target_failed(self) -> None:
        """Post-copy: the target's restore failed; stop the source's page server at once,
        which lets go of the container: it runs on at the source."""
        if self.sink.serving is not None:
            proc.kill_group(self.sink.serving)
        self._served()

    def target_ran(self) -> None:
        """Post-copy: the target runs with every page; the source's dump ends now (CRIU
        ends the source's tasks)."""
        self._served()

    def _served(self) -> None:
        served, self.sink.served = self.sink.served, None
        if served is None:
            return
        try:
            served()
        except CtrmigError as e:
            if self.outcome.ok:  # the target has it all: the source is removed anyway
                log.warning("the target runs with every page, but the source's dump "
                            "ended badly: %s", e)


@contextlib.contextmanager
def planned(source: Migrator, target: Migrator, rest: RestoreOptions, *,
            lazy: bool, timeout: float) -> Iterator[Plan]:
    """Set up the pages' way to ``target`` for one migration; tear it down afterwards
    (and, if the migration failed, what the target received)."""
    if lazy:
        criu.require_post_copy()
    link = open_link(target, "relay" if lazy else "receive")
    outcome = Outcome()
    try:
        if lazy:
            sink = pages.PageSink(relay.free_port(), lazy=True)
            feeder = Feeder(link.wire, sink, outcome, None, timeout)
            rest = dataclasses.replace(
                rest, lazy_pages=True, lazy_page_server=f"127.0.0.1:{link.info['port']}")
        else:
            listening = relay.listener()
            sink = pages.PageSink(int(listening.getsockname()[1]))
            feeder = Feeder(link.wire, sink, outcome, listening, timeout)
            sink.sent = feeder.sent
            rest = dataclasses.replace(rest, page_images=str(link.info["dir"]))
    except BaseException:
        link.abort()
        raise
    plan = Plan(sink, rest, link, feeder, outcome)
    try:
        with source.sending_pages(sink):  # type: ignore[attr-defined]
            yield plan
    except BaseException:
        feeder.abort()
        link.abort()
        link.finish(10.0)
        link.clean()
        raise
    feeder.wait(timeout)
    result = link.finish(timeout)
    if lazy:
        _check_lazy(feeder, result)


def _check_lazy(feeder: Feeder, received: dict[str, Any]) -> None:
    """After a post-copy: the pages the target took are the bytes the source sent."""
    sent = feeder.relay.forward if feeder.relay is not None else None
    if sent is None or received.get("error"):
        log.warning("post-copy ended, but the target's relay reported: %s",
                    received.get("error") or "nothing")
        return
    if (sent.sha256, sent.bytes) != (received.get("sha256"), received.get("bytes")):
        raise ChecksumError(
            f"post-copy: the target took {received.get('bytes')} bytes of pages, sha256 "
            f"{str(received.get('sha256'))[:12]}; the source sent {sent.bytes}, sha256 "
            f"{sent.sha256[:12]}", hint="the link corrupted the pages: the target, whose "
            "memory cannot be trusted, is removed, and the source ended with its last page: "
            "the container is lost")
