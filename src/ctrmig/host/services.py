"""Start and stop the engine services ctrmig talks to: podman's API service and dockerd.

Used by the CLI (``ctrmig service start``), the README's commands and the test fixtures.
A service is started in its own session, its PID written to a pidfile we own, its output
to a log; it is stopped by that PID only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctrmig import settings
from ctrmig.errors import EngineUnavailableError
from ctrmig.host import proc
from ctrmig.host.files import open_private, private_dir, write_private

log = logging.getLogger(__name__)

DEFAULT_PODMAN_SOCKET = settings.DEFAULT_PODMAN_SOCKET
DEFAULT_DOCKER_SOCKET = settings.DEFAULT_DOCKER_SOCKET


def _http_get(sock: Path, path: str, timeout: float) -> tuple[bytes, bytes]:
    """GET ``path`` over a unix socket (HTTP/1.0): (status line, body). Raises OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: d\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def _http_ping(sock: Path, path: str, timeout: float = 2.0) -> bool:
    """GET ``path`` over a unix socket; True on an HTTP 200."""
    try:
        status, _ = _http_get(sock, path, timeout)
    except OSError:
        return False
    return status.split(b" ")[1:2] == [b"200"]


def podman_alive(sock: Path = DEFAULT_PODMAN_SOCKET) -> bool:
    return _http_ping(sock, "/_ping")


def docker_alive(sock: Path = DEFAULT_DOCKER_SOCKET) -> bool:
    return _http_ping(sock, "/_ping")


@dataclass
class Service:
    """A daemon we start and stop by PID."""

    name: str
    socket: Path
    argv: list[str]
    log_path: Path
    pidfile: Path
    env: dict[str, str] | None = None
    netns: str | None = None
    own_netns: bool = False  # ``netns`` is made by start() and deleted by stop()
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return _http_ping(self.socket, "/_ping")

    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start the service unless it already answers; wait until it does.

        ``wait=False`` only spawns it (for a service probed another way, e.g. over TCP).
        """
        if wait and self.alive():
            log.info("%s already answers on %s", self.name, self.socket)
            return
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        private_dir(self.log_path.parent)
        private_dir(self.pidfile.parent)
        argv = self.argv
        if self.netns:
            if self.own_netns:
                make_netns(self.netns)
            argv = [*netns_prefix(self.netns), *argv]
        try:
            with open_private(self.log_path, append=True) as logf:
                self._proc = proc.spawn(argv, stdout=logf, stderr=logf, env=self.env)
        except BaseException:
            self._drop_netns()
            raise
        write_private(self.pidfile, f"{self._proc.pid}\n")
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self._proc.poll() is not None:
                self._drop_netns()
                raise EngineUnavailableError(
                    f"{self.name} exited with code {self._proc.returncode} while starting",
                    stderr=proc.tail(self.log_path.read_text(errors="replace")),
                    hint=f"see {self.log_path}",
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EngineUnavailableError(
                    f"{self.name} did not answer on {self.socket} within {timeout:g} s",
                    stderr=proc.tail(self.log_path.read_text(errors="replace")),
                    hint=f"see {self.log_path}",
                )
            time.sleep(0.2)
        log.info("%s started (pid %s) on %s", self.name, self._proc.pid, self.socket)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the service we started (by PID), if it runs."""
        if self._proc is not None:
            proc.stop(self._proc, timeout=timeout)
            self._proc = None
        else:
            pid = self.pid()
            if pid is not None:
                proc.stop_pid(pid, timeout=timeout)
        self.pidfile.unlink(missing_ok=True)
        self._drop_netns()

    def _drop_netns(self) -> None:
        if self.own_netns and self.netns:
            delete_netns(self.netns)


def netns_prefix(netns: str) -> list[str]:
    """Run a command in a named network namespace, and in nothing else new.

    Not ``ip netns exec``: it also remounts /sys, which hides the cgroup mounts runc needs.
    """
    return ["nsenter", f"--net=/run/netns/{netns}"]


def make_netns(name: str) -> None:
    """A named network namespace holding only ``lo`` (up), unless it exists already."""
    if not Path("/run/netns", name).exists():
        proc.run(["ip", "netns", "add", name], timeout=30)
        proc.run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=30)


def delete_netns(name: str) -> None:
    """Remove a named network namespace (it lives on while a process still uses it)."""
    if Path("/run/netns", name).exists():
        proc.run(["ip", "netns", "delete", name], timeout=30, check=False)


def podman_service(
    sock: Path = DEFAULT_PODMAN_SOCKET,
    *,
    root: Path | None = None,
    runroot: Path | None = None,
    state_dir: Path | None = None,
    netns: str | None = None,
    uri: str | None = None,
    tmpdir: Path | None = None,
) -> Service:
    """``podman system service --time=0`` on ``sock`` (or ``uri``, e.g. tcp://ADDR:PORT).

    With ``root`` and ``runroot`` it is a podman instance of its own (own storage, own
    libpod tmp dir), beside the machine's default one. ``tmpdir`` becomes the service's
    TMPDIR: podman's API spools every exported and every imported checkpoint archive
    there (a tmpfs saves writing each archive to disk twice).
    """
    state_dir = state_dir or settings.current().run_dir
    argv = ["podman", *podman_root_args(root, runroot)]
    argv += ["system", "service", "--time=0", uri or f"unix://{sock}"]
    tag = sock.stem if sock != DEFAULT_PODMAN_SOCKET else "podman"
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    return Service("podman API service", sock, argv, state_dir / f"{tag}.log",
                   state_dir / f"{tag}.pid", env=env, netns=netns)


def podman_root_args(root: Path | None, runroot: Path | None) -> list[str]:
    """Global podman flags that select a private instance (storage, run and tmp dirs)."""
    args: list[str] = []
    if root is not None:
        args += ["--root", str(root)]
    if runroot is not None:
        args += ["--runroot", str(runroot), "--tmpdir", str(runroot / "libpod-tmp")]
    return args


def dockerd_service(
    sock: Path = DEFAULT_DOCKER_SOCKET,
    *,
    data_root: Path | None = None,
    exec_root: Path | None = None,
    state_dir: Path | None = None,
    bridge: str | None = None,
    netns: str | None = None,
    experimental: bool = True,
) -> Service:
    """dockerd with experimental features on (needed for checkpoints).

    The system daemon reads /etc/docker/daemon.json (setup-host merges the settings in).
    With ``data_root`` it is a private daemon beside any system one, with its own config
    file (``experimental=False`` there makes one that refuses checkpoints, as a daemon
    left at docker's default does). ``bridge="none"`` turns off docker's bridge network
    and its iptables rules, but dockerd then DELETES any docker0 bridge in the network
    namespace it runs in (moby's removeDefaultBridgeInterface, seen here): so a daemon
    without a bridge and without ``netns`` gets a network namespace of its own, made on
    start and deleted on stop, and the machine's docker0 stays.
    """
    state_dir = state_dir or settings.current().run_dir
    tag = sock.stem if sock != DEFAULT_DOCKER_SOCKET else "dockerd"
    own_netns = bridge == "none" and netns is None
    if own_netns:  # named after the socket: unique per daemon, and known to any stop()
        netns = f"ctrmig-dockerd-{hashlib.sha256(str(sock).encode()).hexdigest()[:12]}"
    argv = ["dockerd", "-H", f"unix://{sock}", "--pidfile", str(state_dir / f"{tag}.dockerd-pid")]
    env: dict[str, str] | None = None
    if data_root is not None:
        config = state_dir / f"{tag}.daemon.json"
        private_dir(state_dir)
        nofile = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        write_private(config, json.dumps({
            "experimental": experimental,
            "default-ulimits": {"nofile": {"Name": "nofile", "Soft": nofile, "Hard": nofile}},
        }))
        argv += ["--config-file", str(config), "--data-root", str(data_root)]
        # containerd (dockerd's child) copies every checkpoint it restores into
        # $TMPDIR/ctrd-checkpoint* and never removes it (seen: 764 such dirs, each a
        # container's memory, after a day of test runs): a private daemon gets a TMPDIR
        # of its own, which goes with its state dir.
        tmpdir = private_dir(state_dir / f"{tag}.tmp")
        env = {**os.environ, "TMPDIR": str(tmpdir)}
    if exec_root is not None:
        argv += ["--exec-root", str(exec_root)]
    if bridge is not None:
        argv += ["--bridge", bridge]
        if bridge == "none":
            argv += ["--iptables=false", "--ip-masq=false"]
    return Service("dockerd", sock, argv, state_dir / f"{tag}.log",
                   state_dir / f"{tag}.pid", env=env, netns=netns, own_netns=own_netns)


def docker_info(sock: Path = DEFAULT_DOCKER_SOCKET) -> dict[str, object]:
    """``GET /info`` of a dockerd, raw (used by doctor before the SDK is involved)."""
    try:
        _, body = _http_get(sock, "/info", timeout=5)
    except OSError as e:
        raise EngineUnavailableError(f"dockerd does not answer on {sock}: {e.strerror}") from None
    info: dict[str, object] = json.loads(body)
    return info
