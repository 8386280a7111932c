"""Lazy pages: ``criu lazy-pages`` serves a restored container's memory on demand.

A restore with ``--lazy-pages`` runs without the pages; the daemon started here hands
them over as the tasks fault them in (and in the background), then exits. It reads them
from the images (a local lazy restore) or fetches them from the source's page server
(post-copy, through ctrmig's relay on loopback). On the source, :func:`start_dump` runs
a ``--lazy-pages`` dump, which serves the pages until the last one was taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ctrmig.errors import CheckpointError, RestoreError
from ctrmig.host import criu, proc

log = logging.getLogger(__name__)

LAZY_SOCKET = "lazy-pages.socket"
LAZY_LOG = "lazy-pages.log"
START_TIMEOUT = 30.0
#: What a failed post-copy means, for the error a restore raises when its pages stop.
SPLIT = ("the target was killed: until the last page arrived the source held the only "
         "full copy of the memory; the source runs on if it is still there, and if the "
         "source host is gone the container is lost")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def serving(images: Path, work: Path, timeout: float, page_server: str | None = None,
            on_running: Callable[[], None] | None = None) -> Iterator[None]:
    """``criu lazy-pages`` serving ``images`` (or fetching from ``page_server``,
    "ADDR:PORT") for the block (a restore ``--lazy-pages`` with work dir ``work``); after
    it (the restored tasks run: ``on_running`` is told), wait until every page was
    handed over. A daemon that fails raises RestoreError: the caller must then kill what
    it restored (its memory is incomplete)."""
    daemon = _start(images, work, page_server)
    restoring = threading.Event()
    restoring.set()
    watcher = threading.Thread(target=_watch, args=(daemon, work, restoring), daemon=True)
    watcher.start()
    try:
        yield
    except BaseException:
        proc.stop(daemon)
        raise
    finally:
        restoring.clear()
    if on_running is not None:
        on_running()
    _finish(daemon, work, timeout, page_server is not None)


def _watch(daemon: subprocess.Popen[bytes], work: Path, restoring: threading.Event) -> None:
    """A daemon that fails while the restore still runs leaves CRIU's restore hanging
    (criu 4.2, its tasks blocked on pages that never come): kill that restore, found
    among our own descendants by the work dir on its command line."""
    while restoring.is_set() and daemon.poll() is None:
        time.sleep(0.05)
    if not restoring.is_set() or daemon.returncode == 0:
        return
    marker = str(work)
    for pid in proc.tree(os.getpid())[1:]:
        try:
            argv = proc.cmdline(pid)
        except OSError:
            continue
        if any(marker in a for a in argv):
            log.warning("criu lazy-pages failed during the restore; killing the restore")
            for p in reversed(proc.tree(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)


def _start(images: Path, work: Path, page_server: str | None) -> subprocess.Popen[bytes]:
    """Start ``criu lazy-pages``; wait until its socket listens."""
    argv = ["criu", "lazy-pages", "--images-dir", str(images), "--work-dir", str(work),
            "--log-file", LAZY_LOG, criu.log_flag()]
    if page_server is not None:
        address, _, port = page_server.rpartition(":")
        argv += ["--page-server", "--address", address, "--port", port]
    daemon = proc.spawn(argv)
    deadline = time.monotonic() + START_TIMEOUT
    while not (work / LAZY_SOCKET).exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            proc.stop(daemon)
            raise RestoreError("criu lazy-pages did not start",
                               stderr=proc.tail(_read(work / LAZY_LOG)))
        time.sleep(0.005)  # 15-60 ms here, in post-copy's downtime
    log.debug("criu lazy-pages %d serving %s", daemon.pid, page_server or images)
    return daemon


def _finish(daemon: subprocess.Popen[bytes], work: Path, timeout: float,
            remote: bool) -> None:
    """The container runs; wait until the daemon handed over every page and exited."""
    started = time.monotonic()
    try:
        code = daemon.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.stop(daemon)
        raise RestoreError(f"criu lazy-pages did not finish within {timeout:g} s",
                           stderr=proc.tail(_read(work / LAZY_LOG)),
                           hint=SPLIT if remote else None) from None
    log.debug("lazy pages done %.2f s after the container started",
              time.monotonic() - started)
    if code != 0:
        raise RestoreError(
            f"criu lazy-pages failed (exit {code})"
            + (": the pages stopped coming from the source" if remote else ""),
            stderr=proc.tail(_read(work / LAZY_LOG)), hint=SPLIT if remote else None)


def start_dump(argv: Sequence[str], *, what: str, log_file: Path,
               timeout: float = 300.0) -> subprocess.Popen[bytes]:
    """Start a ``--lazy-pages`` dump (``argv`` without its ``--status-fd``); return once
    the tasks are frozen, their non-page images written and the page server listening.

    A dump that fails before that let the tasks run on; CheckpointError quotes CRIU."""
    read_fd, write_fd = os.pipe()
    try:
        # runc wants a write-only fd for --status-fd (a pipe's write end).
        child = proc.spawn([*argv[:-1], "--status-fd", str(write_fd), argv[-1]],
                           pass_fds=[write_fd], stderr=subprocess.PIPE)
    finally:
        os.close(write_fd)
    try:
        ready = _wait_byte(read_fd, child, timeout)
    except BaseException:
        proc.kill_group(child)
        raise
    finally:
        os.close(read_fd)
    if not ready:
        proc.kill_group(child)
        err = child.stderr.read().decode(errors="replace") if child.stderr else ""
        raise CheckpointError(f"{what} failed before serving its pages",
                              stderr=proc.tail(err + "\n" + _read(log_file)))
    return child


def _wait_byte(fd: int, child: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the status byte on ``fd``; False if the child closed it without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            return os.read(fd, 1) == b"\0"
        if child.poll() is not None:
            return False
    raise CheckpointError(f"the dump did not get ready within {timeout:g} s")


def end_dump(child: subprocess.Popen[bytes], *, what: str, log_file: Path,
             timeout: float) -> None:
    """Wait for a ``--lazy-pages`` dump to end: 0 once the last page was taken (CRIU then
    ends the source); else CheckpointError (CRIU let the source run on)."""
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill_group(child)
        raise CheckpointError(f"{what} did not end within {timeout:g} s") from None
    if code != 0:
        err = child.stderr.read().decode(errors="replace") if child.stderr else ""
        raise CheckpointError(f"{what} failed while serving its pages (exit {code})",
                              stderr=proc.tail(err + "\n" + _read(log_file)))
