"""The stdio of runc containers: pipes drained into a log by a supervisor process.

CRIU can only dump stdio that is a pipe, a pty or /dev/null, so a detached runc
container writes into pipes whose read ends a tiny supervisor process holds (as conmon
does). It appends everything to the log and exits when every pipe reached EOF (the
container exited, or was checkpointed and stopped) or on SIGTERM. runc records the pipes
in descriptors.json and a restore hands it new ones.

The supervisor runs as ``python -m ctrmig.engines.runc.supervisor LOG FD [FD ...]``
(:func:`main`); :class:`Stdio` starts runc under a new one.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ctrmig.engines.runc.commands import Runc, failure_text, keep_logs, summary
from ctrmig.errors import CommandTimeoutError, CtrmigError
from ctrmig.host import proc

log = logging.getLogger(__name__)

MODULE = "ctrmig.engines.runc.supervisor"
#: The module names supervisors run as; the second one is what ctrmig before the runc
#: package split started, and such a supervisor may still drain a running container.
_MODULES = (MODULE.encode(), b"ctrmig.engines.runc_supervisor")


def drain(log_path: str, fds: list[int]) -> None:
    """Append what arrives on ``fds`` to ``log_path`` until every fd reached EOF."""
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        while sel.get_map():
            for key, _ in sel.select():
                try:
                    data = os.read(key.fd, 65536)
                except InterruptedError:
                    continue
                if data:
                    os.write(out, data)
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
    finally:
        os.close(out)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: python -m {MODULE} LOG FD [FD ...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    drain(argv[0], [int(a) for a in argv[1:]])
    return 0


class Stdio:
    """The output logs of one state dir's containers and the supervisors writing them."""

    def __init__(self, runc: Runc, logs_dir: Path, timeout: float):
        self.runc = runc
        self.logs_dir = logs_dir
        self.timeout = timeout

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def start(self, name: str, args: list[str], *, runc_log: Path, work: Path | None,
              record: Callable[[int], None], error: type[CtrmigError], what: str) -> None:
        """Run ``runc ARGS`` (run --detach / restore --detach) with pipes as the
        container's stdout/stderr, drained by a new supervisor into the log. ``record``
        gets the supervisor's PID before runc starts."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            supervisor = proc.spawn(
                [sys.executable, "-m", MODULE, str(self.log_path(name)), str(out_r),
                 str(err_r)],
                pass_fds=(out_r, err_r))
            record(supervisor.pid)
            argv = self.runc.argv("--log", str(runc_log), *args)
            runc = proc.spawn(argv, stdout=out_w, stderr=err_w)
        finally:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
        started = time.monotonic()
        try:
            code = runc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill_group(runc)
            raise CommandTimeoutError(f"{what} timed out after {self.timeout:g} s",
                                      argv=argv, stderr=failure_text(runc_log, work),
                                      ) from None
        except BaseException:
            proc.kill_group(runc)
            raise
        log.debug("%s: exit %d after %.2f s", what, code, time.monotonic() - started)
        if code != 0:
            text = failure_text(runc_log, work)
            kept = keep_logs(self.logs_dir, name, work)
            raise error(f"{what} failed (exit {code}): {summary(text)}", stderr=text,
                        hint=f"full logs kept in {kept}" if kept else None)

    def drained(self, pid: object, name: str, timeout: float = 2.0) -> int | None:
        """Wait until supervisor ``pid`` wrote all the (gone) container's output and
        exited; return its PID if it still runs after ``timeout``."""
        if not isinstance(pid, int) or not self.is_ours(pid, name):
            return None
        deadline = time.monotonic() + timeout
        while proc.alive(pid):
            if time.monotonic() > deadline:
                return pid
            time.sleep(0.02)
        return None

    def is_ours(self, pid: int, name: str) -> bool:
        """Whether ``pid`` is the supervisor of ``name`` (not a reused PID)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (any(module in cmdline for module in _MODULES)
                and str(self.log_path(name)).encode() in cmdline)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
