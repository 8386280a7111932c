"""The log supervisor of a runc container: drain its stdio pipes into a log file.

CRIU can only dump stdio that is a pipe, a pty or /dev/null, so a detached runc
container writes into pipes whose read ends this tiny process holds (as conmon does).
It appends everything to the log and exits when every pipe reached EOF (the container
exited, or was checkpointed and stopped) or on SIGTERM.

Run as ``python -m ctrmig.engines.runc_supervisor LOG FD [FD ...]``.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys


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
        print("usage: python -m ctrmig.engines.runc_supervisor LOG FD [FD ...]",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    drain(argv[0], [int(a) for a in argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
