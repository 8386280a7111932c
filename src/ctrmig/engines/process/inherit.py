"""The fds CRIU is handed at restore (``--inherit-fd``).

Stdio that pointed outside the tree (a pipe, a socket, a terminal) cannot come back as it
was: it gets the fd the caller gave for it, else ``/dev/null`` for stdin and a log file
in the state dir for stdout/stderr; a terminal only a terminal (the given one, else ours,
else restore refuses). A file opened for writing only that changed size since the
checkpoint is reopened ``O_APPEND``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Mapping
from typing import IO, Any

from ctrmig.errors import OptionError

log = logging.getLogger(__name__)

Stdio = int | IO[Any] | None


def own_terminal() -> int | None:
    """Our stdin, if it is a terminal."""
    return 0 if os.isatty(0) else None


def _fd_of(target: int | IO[Any]) -> int:
    """A private duplicate (>= 3, clear of criu's own stdio) of a caller's fd or file."""
    fd = target if isinstance(target, int) else target.fileno()
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def external_stdio(config: dict[str, Any]) -> dict[str, set[int]]:
    """CRIU names of the stdio that led out of the tree -> the stdio fds sharing each
    (one pipe or terminal is often stdout and stderr)."""
    sharing: dict[str, set[int]] = {}
    for n, s in config["stdio"].items():
        if s["kind"] in ("pipe", "socket", "tty"):
            sharing.setdefault(s["key"], set()).add(int(n))
    return sharing


def check_terminal(config: dict[str, Any], stdio: Mapping[int, Stdio]) -> None:
    """A terminal can only be replaced by a terminal: refuse if there is none to give."""
    for key, numbers in external_stdio(config).items():
        given = [n for n in numbers if stdio[n] is not None]
        if key.startswith("tty[") and not given and own_terminal() is None:
            raise OptionError(
                f"the stdio of PID {config['pid']} was a terminal, and there is no "
                "terminal to restore it onto",
                hint="run the restore from a terminal, or give the process engine "
                     "a pty as stdin/stdout/stderr",
            )


def inherited_fds(
    config: dict[str, Any],
    stdio: Mapping[int, Stdio],
    log_file: Callable[[], str],
    stack: contextlib.ExitStack,
) -> tuple[dict[str, int], str | None]:
    """CRIU resource name -> fd to hand it, for stdio and for files that changed size;
    and the log file (from ``log_file()``) that stdout/stderr went to, if any. The fds
    are closed when ``stack`` closes."""
    inherit: dict[str, int] = {}
    logfile = None
    for key, numbers in external_stdio(config).items():
        given = next((stdio[n] for n in (1, 2, 0)
                      if n in numbers and stdio[n] is not None), None)
        if given is None and key.startswith("tty["):
            given = own_terminal()  # what criu --shell-job itself would use
        if given is not None:
            fd = _fd_of(given)
        elif numbers == {0}:
            fd = os.open(os.devnull, os.O_RDONLY)
        else:
            logfile = log_file()
            fd = os.open(logfile, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        stack.callback(os.close, fd)
        inherit[key] = fd
    for entry in config["files"]:
        if entry["access"] != "w" or entry["append"] or entry.get("size") is None:
            continue
        if os.stat(entry["path"]).st_size != entry["size"]:
            log.info("%s changed size since the checkpoint: reopened O_APPEND",
                     entry["path"])
            fd = os.open(entry["path"], os.O_WRONLY | os.O_APPEND)
            stack.callback(os.close, fd)
            inherit[entry["path"].lstrip("/")] = fd
    return inherit, logfile
