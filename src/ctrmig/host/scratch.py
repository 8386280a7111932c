"""A private scratch directory per ctrmig process, and the sweep of those whose process died.

Spools, extracted archives, page and image copies hold a container's memory, and a ctrmig
killed by SIGKILL cannot remove them. So the CLI puts every temporary file of its process
under one directory, ``<TMPDIR>/ctrmig-scratch.<pidns>.<pid>.<start>`` (0700), removed
when the process ends; ``ctrmig recover`` (:func:`sweep`) removes those of processes of its
PID namespace that are gone (a PID names another process in another namespace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctrmig.host import mounts, proc

log = logging.getLogger(__name__)

PREFIX = "ctrmig-scratch."
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)\.(\d+)")
_base: Path | None = None  # where scratch directories go: TMPDIR before private() moved it


def base() -> Path:
    """The temporary directory shared by every process (TMPDIR), not this one's scratch."""
    return _base or Path(tempfile.gettempdir())


@contextlib.contextmanager
def private() -> Iterator[Path]:
    """Make this process's temporary files go into a scratch directory of its own, for
    the duration of the block; remove the directory at the end. Nested: a no-op."""
    global _base
    if _base is not None:
        yield Path(tempfile.gettempdir())
        return
    previous = tempfile.tempdir
    parent = Path(tempfile.gettempdir())
    directory = parent / f"{PREFIX}{_pid_namespace()}.{os.getpid()}." \
                         f"{proc.start_time(os.getpid())}"
    directory.mkdir(mode=0o700)
    _base, tempfile.tempdir = parent, str(directory)
    try:
        yield directory
    finally:
        tempfile.tempdir, _base = previous, None
        _remove(directory)


def sweep() -> list[Path]:
    """Remove the scratch directories of ctrmig processes that are gone; return them."""
    removed = []
    for directory in base().glob(PREFIX + "*"):
        match = _NAME.fullmatch(directory.name)
        if match is None or not directory.is_dir() or directory.is_symlink():
            continue
        namespace, pid, start = (int(g) for g in match.groups())
        if namespace != _pid_namespace() or proc.start_time(pid) == start:
            continue
        if _remove(directory):
            removed.append(directory)
    if removed:
        log.info("removed the scratch space of %d ctrmig process(es) that died", len(removed))
    return removed


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _remove(directory: Path) -> bool:
    """Remove ``directory`` unless something is mounted below it (never delete through a
    mount: it may be a user's volume)."""
    below = mounts.mounts_under(directory)
    if below:
        log.warning("left %s: %s is mounted below it", directory, below[0])
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()
