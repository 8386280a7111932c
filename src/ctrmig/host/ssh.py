"""A remote unix socket reached through ssh, as podman-remote reaches podman's API.

``ssh://[user@]host[:port][/path/to.sock]``: ssh forwards a private local socket (in a
0700 directory) to the remote one (``ssh -L local.sock:remote.sock``, OpenSSH's
streamlocal forwarding), so the API traffic is encrypted and authenticated by ssh, and
nothing on the remote host listens on the network. The ssh client runs until
:meth:`SocketTunnel.close`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ctrmig.errors import EngineUnavailableError, OptionError
from ctrmig.host import proc

#: ssh flags of every ctrmig ssh link: no prompts, and keep-alives so that a link that
#: dies without a reset is noticed in ~15 s instead of when TCP gives up.
SSH_FLAGS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=5",
             "-o", "ServerAliveCountMax=3")
CONNECT_TIMEOUT = 30.0


def ssh_destination(address: str) -> tuple[list[str], str, str]:
    """``ssh://[user@]host[:port][/path]`` -> (port flags, ``[user@]host``, path)."""
    parts = urlsplit(address)
    if parts.scheme != "ssh" or not parts.hostname:
        raise OptionError(f"not an ssh address: {address!r}",
                          hint="use ssh://[user@]host[:port][/path/to/socket]")
    dest = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
    return (["-p", str(parts.port)] if parts.port else []), dest, parts.path


class SocketTunnel:
    """The remote socket named by ``address`` (its path, else ``default_socket``),
    forwarded to a local one; :attr:`url` is ``unix://`` + that local socket."""

    def __init__(self, address: str, *, default_socket: str,
                 ssh_options: Sequence[str] = (), timeout: float = CONNECT_TIMEOUT):
        port, dest, path = ssh_destination(address)
        remote = path if path not in ("", "/") else default_socket
        self._dir = Path(tempfile.mkdtemp(prefix="ctrmig-ssh-"))  # 0700: ours alone
        self.local = self._dir / "api.sock"
        argv = ["ssh", "-N", "-T", *SSH_FLAGS, "-o", "ExitOnForwardFailure=yes",
                "-o", "StreamLocalBindUnlink=yes", *ssh_options, *port,
                "-L", f"{self.local}:{remote}", dest]
        self._err = tempfile.TemporaryFile()
        self._child = proc.spawn(argv, stdout=subprocess.DEVNULL, stderr=self._err)
        try:
            self._wait(address, timeout)
        except BaseException:
            self.close()
            raise
        self.url = f"unix://{self.local}"

    def _wait(self, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.local.exists():
            if self._child.poll() is not None or time.monotonic() > deadline:
                self._err.seek(0)
                stderr = self._err.read().decode(errors="replace")
                raise EngineUnavailableError(
                    f"cannot reach {address} through ssh: "
                    f"{proc.tail(stderr, 1) or 'no forwarded socket'}",
                    stderr=proc.tail(stderr),
                    hint="check that `ssh` logs in without a prompt (a key; "
                         "CTRMIG_SSH_OPTIONS for extra flags) and the socket path exists")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the ssh client (by its PID) and remove the local socket."""
        proc.stop(self._child, timeout=5)
        self._err.close()
        shutil.rmtree(self._dir, ignore_errors=True)
