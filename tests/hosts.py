"""Two "hosts" on one machine, for migration tests and the benchmark.

Each host is a network namespace with its own engine instances (own storage root,
runtime root and API socket); a veth pair joins the two namespaces, and host B's engines
also listen on its veth address, so a migration driven from host A crosses that link.
Everything is started by PID and torn down again (services, mounts, namespaces, files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ctrmig.host import images, mounts, proc, services

SUBNET = "10.254.{n}.{host}"  # addresses live only inside our own namespaces


@dataclass
class Host:
    """One simulated host: a network namespace and the engines started in it."""

    name: str
    netns: str
    address: str
    root: Path
    started: list[services.Service] = field(default_factory=list)
    podman_socket: Path | None = None
    podman_tcp: str = ""
    docker_socket: Path | None = None
    docker_tcp: str = ""

    @property
    def podman_root(self) -> Path:
        return self.root / "podman-storage"

    @property
    def run_root(self) -> Path:
        # podman refuses a runroot longer than 50 characters: keep it short, under /run.
        return Path("/run/ctrmig-hosts") / self.netns.removeprefix("ctrmig-")

    @property
    def podman_runroot(self) -> Path:
        return self.run_root / "podman"

    def podman_cli(self, *args: str, timeout: float = 300) -> str:
        """Run the podman CLI against this host's storage."""
        flags = services.podman_root_args(self.podman_root, self.podman_runroot)
        return proc.output(["podman", *flags, *args], timeout=timeout)

    def run(self, argv: list[str], timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside this host's network namespace (``env`` added to ours)."""
        return proc.run([*services.netns_prefix(self.netns), *argv], timeout=timeout,
                        check=False, env={**os.environ, **(env or {})})

    def start_podman(self, tcp_port: int | None = None, tmpdir: Path | None = None) -> None:
        """podman on a unix socket (for the test's own look-ups) and, when ``tcp_port``
        is given, on the host's veth address too (for migrations into this host).
        ``tmpdir``: the services' TMPDIR, where podman spools checkpoint archives."""
        sock = self.root / "podman.sock"
        svc = services.podman_service(sock, root=self.podman_root, runroot=self.podman_runroot,
                                      state_dir=self.root, netns=self.netns, tmpdir=tmpdir)
        svc.start()
        self.started.append(svc)
        self.podman_socket = sock
        if tcp_port is not None:
            uri = f"tcp://{self.address}:{tcp_port}"
            tcp = services.podman_service(self.root / "podman-tcp", root=self.podman_root,
                                          runroot=self.podman_runroot, state_dir=self.root,
                                          netns=self.netns, uri=uri, tmpdir=tmpdir)
            tcp.start(wait=False)
            self.started.append(tcp)
            wait_tcp(self.netns, self.address, tcp_port)
            self.podman_tcp = uri

    def start_dockerd(self) -> Path:
        """A private dockerd in this host's namespace (own data root, no bridge)."""
        sock = self.run_root / "docker.sock"
        svc = services.dockerd_service(sock, data_root=self.root / "docker-data",
                                       exec_root=self.run_root / "dx", state_dir=self.root,
                                       bridge="none", netns=self.netns)
        svc.start()
        self.started.append(svc)
        self.docker_socket = sock
        return sock

    def start_sshd(self, port: int = 2222, *, own_pids: bool = False) -> list[str]:
        """sshd on this host's veth address, root login by a throwaway key only.

        ``own_pids``: sshd (and all that ssh runs through it) in a PID namespace of its
        own, with its own /proc (a new mount namespace): this host's PIDs are then apart
        from the machine's, as another machine's are, and a plain process restored there
        can keep its PIDs. Stopping sshd, that namespace's init, ends every process in it.

        Returns the ssh options a client needs (identity, no host-key prompts).
        """
        key = self.root / "id_ed25519"
        host_key = self.root / "ssh_host_ed25519_key"
        for path in (key, host_key):
            if not path.exists():
                proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                         timeout=30)
        (self.root / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        name = "sshd-own-pids" if own_pids else "sshd"  # both may run on one host
        config = self.root / f"{name}_config"
        config.write_text(
            f"Port {port}\nListenAddress {self.address}\nHostKey {host_key}\n"
            f"PidFile {self.root / f'{name}.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "StrictModes no\nUsePAM no\n"
            # Stopping this sshd ends its sessions with it: let a session whose client is
            # gone (a cut link) end first, as its ctrmig then cleans up after itself.
            + ("ClientAliveInterval 1\nClientAliveCountMax 3\n" if own_pids else "")
            # The session's own TMPDIR (tests/conftest.py), where ctrmig on this host is
            # checked for leftovers too.
            + (f"SetEnv TMPDIR={os.environ['TMPDIR']}\n" if os.environ.get("TMPDIR") else "")
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        # --kill-child: should unshare be stopped first, its child (the namespace's init)
        # is killed with it.
        pids = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if own_pids else []
        sshd = services.Service(
            name, self.root / f"{name}.sock",
            [*pids, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            self.root / f"{name}.log", self.root / f"{name}.ctrmig-pid", netns=self.netns)
        sshd.start(wait=False)
        self.started.append(sshd)
        wait_tcp(self.netns, self.address, port)
        return ["-i", str(key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def own_pids_prefix(self) -> list[str]:
        """Run a command as if logged in on this host through ``start_sshd(own_pids=True)``:
        in its PID, mount and network namespaces (those of that sshd, their init)."""
        init = self._own_pids_init()
        assert init is not None, "no sshd with its own PIDs runs here"
        return ["nsenter", f"--target={init}", "--pid", "--mount", "--net"]

    def _own_pids_init(self) -> int | None:
        """The PID (in ours) of the sshd that ``start_sshd(own_pids=True)`` started."""
        unshare = next((s.pid() for s in self.started if s.name == "sshd-own-pids"), None)
        try:
            return int(Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.podman_socket is not None:
            # Whatever a failed test left running here goes first: a container outlives
            # the API service, and would run on with its storage gone.
            flags = services.podman_root_args(self.podman_root, self.podman_runroot)
            proc.run(["podman", *flags, "rm", "--all", "--force", "--time", "0"],
                     timeout=120, check=False)
        if (init := self._own_pids_init()) is not None:
            # unshare ignores SIGTERM while it waits for its child: stop that child (sshd,
            # the namespace's init; the kernel then ends the rest of the namespace)
            proc.stop_pid(init)
        for svc in reversed(self.started):
            svc.stop()
        self.started.clear()
        # conmon runs `podman container cleanup` when a container exits, and that mounts
        # the storage again: wait (bounded) until no process works on this host's run
        # dir, then unmount, retrying until nothing is left.
        _wait_for_no_process_using(self.run_root, timeout=30)
        deadline = time.monotonic() + 20
        while True:
            for path in (self.root, self.run_root):
                mounts.unmount_under(path)
                shutil.rmtree(path, ignore_errors=True)
            left = [p for p in (self.root, self.run_root) if p.exists()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if left:
            raise RuntimeError(f"could not clean up {left}")


def _wait_for_no_process_using(path: Path, timeout: float) -> None:
    """Wait until no process (conmon, podman cleanup, ...) names ``path`` in its argv."""
    marker = str(path).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    busy = marker in (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if busy:
                    break
        if not busy:
            return
        time.sleep(0.2)


def wait_tcp(netns: str, address: str, port: int, timeout: float = 30.0) -> None:
    code = (
        "import socket,sys,time\n"
        f"end=time.time()+{timeout}\n"
        "while time.time()<end:\n"
        "  try:\n"
        f"    socket.create_connection(('{address}',{port}),1).close(); sys.exit(0)\n"
        "  except OSError: time.sleep(0.2)\n"
        "sys.exit(1)\n"
    )
    res = proc.run([*services.netns_prefix(netns), sys.executable, "-c", code],
                   timeout=timeout + 10, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"nothing listens on {address}:{port} in {netns}")


class TwoHosts:
    """Hosts A and B joined by a veth pair; use as a context manager."""

    def __init__(self, base: Path):
        tag = uuid.uuid4().hex[:6]
        n = int(tag[:2], 16)
        self.base = base
        self.a = Host("a", f"ctrmig-{tag}-a", SUBNET.format(n=n, host=1), base / "host-a")
        self.b = Host("b", f"ctrmig-{tag}-b", SUBNET.format(n=n, host=2), base / "host-b")
        self._veth = f"cm{tag}"

    def __enter__(self) -> TwoHosts:
        try:
            for host in (self.a, self.b):
                host.root.mkdir(parents=True, exist_ok=True)
                _ip("netns", "add", host.netns)
                _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("link", "add", f"{self._veth}a", "type", "veth", "peer", "name",
                f"{self._veth}b")
            for host, end in ((self.a, "a"), (self.b, "b")):
                dev = f"{self._veth}{end}"
                _ip("link", "set", dev, "netns", host.netns)
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", dev)
                _ip("-n", host.netns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for host in (self.a, self.b):
            host.stop()
            proc.run(["ip", "netns", "delete", host.netns], timeout=30, check=False)

    def migrate_docker(self, name: str, sock_a: Path, sock_b: Path, ssh_options: list[str],
                       journal: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
        """``ctrmig migrate --json [flags]`` on host A of docker container ``name`` (A's
        dockerd at ``sock_a``) to host B, where ctrmig (over ssh, port 2222) restores into
        ``sock_b``."""
        ctrmig = str(Path(sys.executable).with_name("ctrmig"))
        env = {
            "CTRMIG_JOURNAL_DIR": str(journal),
            "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
            "CTRMIG_REMOTE_COMMAND": f"env DOCKER_HOST=unix://{sock_b} {ctrmig}",
        }
        return self.a.run([ctrmig, "migrate", name, "--from", f"docker+unix://{sock_a}",
                           "--to", f"docker+ssh://root@{self.b.address}:2222", "--json",
                           *flags], env=env)

    def load_test_image(self, host: Host, workdir: Path) -> str:
        """Copy the busybox test image from the machine's podman storage to ``host``."""
        ref = images.ensure_test_image(workdir)
        archive = images.podman_save(ref, workdir / f"img-{host.name}.tar", fmt="oci-archive")
        host.podman_cli("load", "-q", "-i", str(archive))
        archive.unlink()
        return ref


def _ip(*args: str) -> None:
    proc.run(["ip", *args], timeout=30)


def python() -> str:
    return os.fspath(sys.executable)
