"""The source's guard during a post-copy: ``python -m ctrmig.direct.guard SOCK PIPE PGID``.

CRIU's lazy dump takes the end of its page-server connection for "every page sent" and
then ends the source's tasks. If ``ctrmig migrate`` dies (SIGKILL) mid post-copy, its
end of that connection closes with it: the source would be ended while the target still
lacks pages. So a guard process holds a second descriptor of the connection (``SOCK``),
which keeps it open, and waits on a pipe from ctrmig (``PIPE``): a byte "r" means the
outcome is known, let go; the pipe's end without it means ctrmig died, and the guard
kills the dump's process group (``PGID``) first, which lets the container run on at the
source. The target, whose pages stop, is killed by its own side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

RELEASE = b"r"


def main(argv: list[str]) -> int:
    sock_fd, pipe_fd, pgid = (int(a) for a in argv)
    try:
        said = os.read(pipe_fd, 1)
    except OSError:
        said = b""
    if said != RELEASE:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    os.close(sock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
