"""Lazy pages: ``criu lazy-pages`` serves a restored container's memory on demand.

``runc restore --lazy-pages`` restores without the pages; the daemon started here hands
them over as the container faults them in (and in the background), then exits.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ctrmig.engines.runc.state import read_text
from ctrmig.errors import RestoreError
from ctrmig.host import proc

log = logging.getLogger(__name__)

LAZY_SOCKET = "lazy-pages.socket"
LAZY_LOG = "lazy-pages.log"
START_TIMEOUT = 30.0


@contextlib.contextmanager
def serving(images: Path, work: Path, timeout: float) -> Iterator[None]:
    """``criu lazy-pages`` serving ``images`` for the block (a ``runc restore
    --lazy-pages --work-path WORK``); after it, wait until every page was handed over."""
    daemon = _start(images, work)
    try:
        yield
    except BaseException:
        proc.stop(daemon)
        raise
    _finish(daemon, work, timeout)


def _start(images: Path, work: Path) -> subprocess.Popen[bytes]:
    """Start ``criu lazy-pages`` serving ``images``; wait until its socket listens."""
    daemon = proc.spawn(["criu", "lazy-pages", "--images-dir", str(images),
                         "--work-dir", str(work), "--log-file", LAZY_LOG, "-v4"])
    deadline = time.monotonic() + START_TIMEOUT
    while not (work / LAZY_SOCKET).exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            proc.stop(daemon)
            raise RestoreError("criu lazy-pages did not start",
                               stderr=proc.tail(read_text(work / LAZY_LOG)))
        time.sleep(0.02)
    log.debug("criu lazy-pages %d serving %s", daemon.pid, images)
    return daemon


def _finish(daemon: subprocess.Popen[bytes], work: Path, timeout: float) -> None:
    """The container runs; wait until the daemon handed over every page and exited."""
    started = time.monotonic()
    try:
        code = daemon.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.stop(daemon)
        raise RestoreError(f"criu lazy-pages did not finish within {timeout:g} s",
                           stderr=proc.tail(read_text(work / LAZY_LOG))) from None
    log.debug("lazy pages done %.2f s after the container started",
              time.monotonic() - started)
    if code != 0:
        raise RestoreError(f"criu lazy-pages failed (exit {code})",
                           stderr=proc.tail(read_text(work / LAZY_LOG)))
