"""Migration benchmark: ctrmig migrate vs the engine's raw CLI route vs the bare-CRIU floor.

    .venv/bin/python -m bench.migrate_bench [--sizes 64,256,1024] [--engines podman,runc]
                                            [--engines runc-ssh --routes floor,runc-ssh/...]
                                            [--out docs/benchmarks.md]

For each memory size (MiB of touched memory held by bench/memhog.c, which verifies its own
memory) and engine, in one run, side by side:

- ``ctrmig``: :func:`ctrmig.migrate` from host A to host B (two network namespaces with
  their own podman storage joined by a veth, tests/hosts.py); for podman the migration is
  driven from inside host A and reaches B's podman over TCP across the veth. runc has no
  API service: both runc "hosts" are state directories on this machine and the archive
  goes through a pipe in one process.
- podman ``ctrmig`` is the direct route (ctrmig reads A's podman storage and restores
  into B's through B's local socket, see ctrmig.engines.podman.direct); ``ctrmig-api``
  streams podman's export into B's import over TCP; ``ctrmig-archive`` is
  ``checkpoint -o FILE`` (zstd) on A + ``restore FILE`` into B; ``local`` is podman's own
  checkpoint + restore of one container on A (no export).
- ``raw``: the engine's own CLI route with default options (podman: ``container
  checkpoint --export F`` on A + ``container restore --import F`` on B; F is on local
  disk, visible to both: the file copy a real move needs is NOT counted).
- ``runc-ssh`` (``--engines runc-ssh``): runc on host A -> ``runc+ssh://`` host B of the
  two-host topology, ``ctrmig migrate`` run in A's namespace, ctrmig on B over ssh: the
  route between two real hosts (``ctrmig``: the archive, ``ctrmig-direct``: pre-copy,
  ``ctrmig-postcopy``: post-copy).
- ``floor``: bare ``criu dump`` of memhog running as a plain process into a tmpfs
  directory + ``criu restore -d`` from it (same machine, no container, no archive).

Downtime: source frozen -> target running. ctrmig's and the raw route's checkpoints freeze
the container as they start, so their downtime is their total time. memhog's own view of
the freeze (the longest gap between two of its rounds, across the migration) is printed
too. Memory check: after the move, memhog must complete two more verification passes
over all of its pages with no CORRUPT line.

This is a benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from tests.hosts import Host, TwoHosts

from bench import workload
from ctrmig.host import images, proc

PODMAN_TCP_PORT = 8791
HEALTH_TIMEOUT = 120.0

MIGRATE_SCRIPT = """
import json, sys, time, ctrmig
direct = sys.argv[6] == "direct"
src = ctrmig.migrator("podman", url=sys.argv[1], direct=direct)
dst = ctrmig.migrator("podman", url=sys.argv[2], workdir=sys.argv[5] or None, direct=direct)
report = ctrmig.migrate(sys.argv[3], source=src, target=dst, compression=sys.argv[4],
                        insecure=True)
print(json.dumps({"name": report.target_name, "downtime": report.downtime_s,
                  "total": report.total_s, "checkpoint": report.checkpoint_s,
                  "restore": report.restore_s, "bytes": report.bytes_moved}))
"""

ARCHIVE_SCRIPT = """
import json, sys, time, ctrmig
src = ctrmig.migrator("podman", url=sys.argv[1])
dst = ctrmig.migrator("podman", url=sys.argv[2])
t0 = time.monotonic()
archive = src.checkpoint(sys.argv[3], sys.argv[4])  # ctrmig's default: zstd
t1 = time.monotonic()
dst.restore(sys.argv[4])
t2 = time.monotonic()
print(json.dumps({"checkpoint": t1 - t0, "restore": t2 - t1, "bytes": archive.size}))
"""


@dataclass
class Row:
    """One measured route."""

    mib: int
    engine: str
    route: str  # ctrmig, ctrmig-lazy, ctrmig-direct, ctrmig-postcopy, raw, floor
    downtime_s: float | None = None
    total_s: float | None = None
    bytes_moved: int | None = None
    app_freeze_s: float | None = None  # memhog's longest gap between rounds
    memory_ok: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    runs: int = 1
    downtime_min: float | None = None
    downtime_max: float | None = None


# --- helpers ---------------------------------------------------------------------------------


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_after(logs: Callable[[], str], before: workload.Health,
                timeout: float = HEALTH_TIMEOUT) -> tuple[bool, float]:
    """Wait for two more full passes after ``before``; return (memory ok, freeze s)."""
    def settled() -> bool:
        h = workload.health(logs())
        return h.corrupt or h.last_pass >= before.last_pass + 2
    with contextlib.suppress(TimeoutError):
        wait_until(settled, timeout, "memhog passes after the move")
    text = logs()
    h = workload.health(text)
    # A restored container's log may start after the restore (runc): no "filled" line.
    ok = (not h.corrupt and h.last_pass >= before.last_pass + 2
          and h.last_round > before.last_round)
    return ok, workload.gap_after(text, before.last_round) / 1000.0


# --- podman -----------------------------------------------------------------------------------


class PodmanBench:
    """podman on hosts A and B. With ``tmpfs``, each host's podman service spools
    archives (its TMPDIR) in a tmpfs, and so does ctrmig's target (its workdir)."""

    def __init__(self, hosts: TwoHosts, work: Path, compression: str, tmpfs: bool = True):
        self.hosts, self.work, self.compression = hosts, work, compression
        self.a, self.b = hosts.a, hosts.b
        self.tmpfs = tmpfs
        self.spool = ""

    def _tmpfs(self, host: Host) -> Path | None:
        if not self.tmpfs:
            return None
        # unmounted by Host.stop() (unmount_under its root)
        return mount_tmpfs(host.root / "tmpfs", "6g")

    def setup(self) -> None:
        self.a.start_podman(tmpdir=self._tmpfs(self.a))
        tmp_b = self._tmpfs(self.b)
        self.b.start_podman(tcp_port=PODMAN_TCP_PORT, tmpdir=tmp_b)
        self.spool = str(tmp_b or "")
        ref = workload.ensure_image(self.work)
        archive = images.podman_save(ref, self.work / "memhog-image.tar", fmt="oci-archive")
        for host in (self.a, self.b):
            host.podman_cli("load", "-q", "-i", str(archive))
        archive.unlink()

    def _start(self, mib: int) -> tuple[str, workload.Health]:
        name = f"memhog-{mib}-{uuid.uuid4().hex[:6]}"
        self.a.podman_cli("run", "-d", "--name", name, "--network", "none",
                          workload.IMAGE, *workload.command(mib))
        logs = self._logs(self.a, name)
        wait_until(lambda: workload.health(logs()).last_pass >= 1, 120, f"{name} filled")
        return name, workload.health(logs())

    @staticmethod
    def _logs(host: Host, name: str) -> Callable[[], str]:
        return lambda: host.podman_cli("logs", name)

    def _rm(self, host: Host, name: str) -> None:
        flags = ["--root", str(host.podman_root), "--runroot", str(host.podman_runroot)]
        proc.run(["podman", *flags, "rm", "-f", "-t", "0", name], timeout=120, check=False)

    def ctrmig(self, mib: int, *, direct: bool = True) -> Row:
        """``direct``: ctrmig reads A's podman storage and restores into B's through B's
        local socket (both on this machine), else podman's export, streamed to B's
        import over TCP across the veth."""
        row = Row(mib, "podman", "ctrmig" if direct else "ctrmig-api")
        name, before = self._start(mib)
        target = f"unix://{self.b.podman_socket}" if direct else self.b.podman_tcp
        try:
            res = self.a.run([sys.executable, "-c", MIGRATE_SCRIPT,
                              f"unix://{self.a.podman_socket}", target, name,
                              self.compression, self.spool,
                              "direct" if direct else "api"], timeout=1800)
            if res.returncode != 0:
                raise RuntimeError(proc.tail(res.stderr.decode(errors="replace"), 5))
            rep = json.loads(res.stdout.decode().strip().splitlines()[-1])
            row.downtime_s, row.total_s, row.bytes_moved = rep["downtime"], rep["total"], \
                rep["bytes"]
            row.detail = {"checkpoint_s": rep["checkpoint"], "restore_s": rep["restore"],
                          "compression": self.compression, "spool_tmpfs": self.tmpfs}
            row.memory_ok, row.app_freeze_s = check_after(self._logs(self.b, name), before)
        finally:
            self._rm(self.a, name)
            self._rm(self.b, name)
        return row

    def archive(self, mib: int) -> Row:
        """``ctrmig checkpoint -o FILE`` on A + ``ctrmig restore FILE`` into B (its local
        socket): the archive route, against the raw route's export + import."""
        row = Row(mib, "podman", "ctrmig-archive")
        name, before = self._start(mib)
        archive = self.work / f"{name}.ckpt.tar.zst"
        try:
            res = self.a.run([sys.executable, "-c", ARCHIVE_SCRIPT,
                              f"unix://{self.a.podman_socket}",
                              f"unix://{self.b.podman_socket}", name, str(archive)],
                             timeout=1800)
            if res.returncode != 0:
                raise RuntimeError(proc.tail(res.stderr.decode(errors="replace"), 5))
            rep = json.loads(res.stdout.decode().strip().splitlines()[-1])
            row.downtime_s = row.total_s = rep["checkpoint"] + rep["restore"]
            row.bytes_moved = rep["bytes"]
            row.detail = {"checkpoint_s": rep["checkpoint"], "restore_s": rep["restore"]}
            row.memory_ok, row.app_freeze_s = check_after(self._logs(self.b, name), before)
        finally:
            archive.unlink(missing_ok=True)
            self._rm(self.a, name)
            self._rm(self.b, name)
        return row

    def local(self, mib: int) -> Row:
        """podman's own local route on host A: checkpoint (no export) + restore in place."""
        row = Row(mib, "podman", "local")
        name, before = self._start(mib)
        try:
            t0 = time.monotonic()
            self.a.podman_cli("container", "checkpoint", name, timeout=1800)
            t1 = time.monotonic()
            self.a.podman_cli("container", "restore", name, timeout=1800)
            t2 = time.monotonic()
            row.downtime_s = row.total_s = t2 - t0
            row.detail = {"checkpoint_s": t1 - t0, "restore_s": t2 - t1}
            row.memory_ok, row.app_freeze_s = check_after(self._logs(self.a, name), before)
        finally:
            self._rm(self.a, name)
        return row

    def raw(self, mib: int) -> Row:
        row = Row(mib, "podman", "raw")
        name, before = self._start(mib)
        archive = self.work / f"{name}.tar.zst"
        try:
            t0 = time.monotonic()
            self.a.podman_cli("container", "checkpoint", "--export", str(archive), name,
                              timeout=1800)
            t1 = time.monotonic()
            self.b.podman_cli("container", "restore", "--import", str(archive), timeout=1800)
            t2 = time.monotonic()
            row.downtime_s = row.total_s = t2 - t0
            row.bytes_moved = archive.stat().st_size
            row.detail = {"checkpoint_export_s": t1 - t0, "restore_import_s": t2 - t1}
            row.memory_ok, row.app_freeze_s = check_after(self._logs(self.b, name), before)
        finally:
            archive.unlink(missing_ok=True)
            self._rm(self.a, name)
            self._rm(self.b, name)
        return row


# --- the bare-CRIU floor ------------------------------------------------------------------------


class _Drain:
    """Read a pipe into a growing text buffer on a thread."""

    def __init__(self, fd: int):
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                with self._lock:
                    self.text += chunk.decode(errors="replace")

    def __call__(self) -> str:
        with self._lock:
            return self.text


def mount_tmpfs(path: Path, size: str) -> Path:
    """A private tmpfs of ``size`` (mount's syntax: 6g, 768m) at ``path``, made if need be."""
    path.mkdir(parents=True, exist_ok=True)
    proc.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
             timeout=30)
    return path


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    mount_tmpfs(path, size)
    try:
        yield path
    finally:
        proc.run(["umount", str(path)], timeout=60, check=False)
        shutil.rmtree(path, ignore_errors=True)


def floor(mib: int, work: Path, memhog: Path) -> Row:
    """criu dump of memhog (a plain process) into tmpfs, then criu restore -d from it."""
    row = Row(mib, "criu", "floor")
    with tmpfs(work / f"floor-{mib}", f"{mib + 512}m") as fs:
        imgdir = fs / "images"
        imgdir.mkdir()
        read_fd, write_fd = os.pipe()
        pipe_ino = os.fstat(write_fd).st_ino
        child = proc.spawn([str(memhog), str(mib), "7"], stdout=write_fd,
                           stderr=subprocess.DEVNULL)
        os.close(write_fd)
        drain = _Drain(read_fd)
        restored_pid: int | None = None
        try:
            wait_until(lambda: workload.health(drain()).last_pass >= 1, 120, "memhog filled")
            before = workload.health(drain())
            t0 = time.monotonic()
            proc.run(["criu", "dump", "-t", str(child.pid), "-D", str(imgdir),
                      "-o", "dump.log"], timeout=600, log_file=imgdir / "dump.log",
                     what="criu dump")
            t1 = time.monotonic()
            child.wait(timeout=30)  # reap it: its PID must be free for the restore
            row.bytes_moved = dir_bytes(imgdir)
            new_read, new_write = os.pipe()
            argv = ["criu", "restore", "-d", "-D", str(imgdir), "-o", "restore.log",
                    "--inherit-fd", f"fd[{new_write}]:pipe:[{pipe_ino}]"]
            proc.run(argv, timeout=600, pass_fds=[new_write], log_file=imgdir / "restore.log",
                     what="criu restore")
            t2 = time.monotonic()
            restored_pid = child.pid
            os.close(new_write)
            drain2 = _Drain(new_read)
            row.downtime_s = row.total_s = t2 - t0
            row.detail = {"dump_s": t1 - t0, "restore_s": t2 - t1, "images": "tmpfs"}
            combined: Callable[[], str] = lambda: drain() + drain2()  # noqa: E731
            row.memory_ok, row.app_freeze_s = check_after(combined, before)
        finally:
            proc.kill_group(child)
            if restored_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restored_pid, 9)
    return row


# --- runc ------------------------------------------------------------------------------------


def remove_everywhere(migrators: list[Any], name: str | None = None) -> None:
    """Remove container ``name`` (None: every container) wherever it is; best effort."""
    for m in migrators:
        names = [c.name for c in m.list()] if name is None else [name]
        for each in names:
            with contextlib.suppress(Exception):
                m.remove(each)


def runc_tmpfs(path: Path, max_mib: int) -> Path:
    """The runc benches' tmpfs. A limit, not an allocation: big enough for preflight's room
    check (the memory and its spool, ~2.6x the size) at the largest size measured."""
    return mount_tmpfs(path, f"{max(8, 3 * max_mib // 1024 + 1)}g")


class RuncPair:
    """Two RuncMigrators, ``a`` (the source) and ``b``: memhog started on A, moved by the
    subclass's route, checked on B; ``mount`` (a tmpfs under them) unmounted at close."""

    def __init__(self, a: Any, b: Any, mount: Path | None):
        self.a, self.b, self.mount = a, b, mount

    def _start(self, mib: int) -> tuple[str, workload.Health]:
        """memhog of ``mib`` on A, filled: its name and health."""
        name = f"memhog-{mib}-{uuid.uuid4().hex[:6]}"
        self.a.run(workload.IMAGE, name=name, command=workload.command(mib))
        try:
            wait_until(lambda: workload.health(self.a.logs(name)).last_pass >= 1, 120,
                       f"{name} filled")
        except BaseException:
            remove_everywhere([self.a], name)
            raise
        return name, workload.health(self.a.logs(name))

    def _measure(self, row: Row, move: Callable[[str], dict[str, Any]]) -> Row:
        """Start memhog of ``row.mib`` on A, ``move`` it (it returns the MigrationReport's
        figures), then check it on B; it is removed from both afterwards."""
        name, before = self._start(row.mib)
        try:
            report = move(name)
            row.downtime_s, row.total_s = report["downtime_s"], report["total_s"]
            row.bytes_moved = report["bytes_moved"]
            row.detail = {k: report[k] for k in ("checkpoint_s", "restore_s", "freeze_s",
                                                 "dump_s", "transfer_s", "compression")}
            row.memory_ok, row.app_freeze_s = check_after(lambda: self.b.logs(name), before)
        finally:
            remove_everywhere([self.a, self.b], name)
        return row

    def close(self) -> None:
        from ctrmig.host import mounts

        remove_everywhere([self.a, self.b])
        if self.mount is not None:
            mounts.unmount_under(self.mount)
            shutil.rmtree(self.mount, ignore_errors=True)


class RuncBench(RuncPair):
    """Two RuncMigrators ("hosts" A and B) with their own state directories. With
    ``tmpfs`` their state (bundles, so the CRIU images) and work directories (the
    extracted archive) are in a tmpfs, as the floor's images are."""

    def __init__(self, work: Path, tmpfs: bool = True, max_mib: int = 1024):
        from ctrmig.engines.runc import RuncMigrator

        self.work = work
        base = runc_tmpfs(work / "runc-tmpfs", max_mib) if tmpfs else work
        super().__init__(RuncMigrator(state_dir=base / "runc-a", workdir=base),
                         RuncMigrator(state_dir=base / "runc-b", workdir=base),
                         base if tmpfs else None)

    def setup(self) -> None:
        workload.ensure_image(self.work)

    #: route name in the table -> (migrate's route, lazy pages)
    ROUTES: ClassVar[dict[str, tuple[str, bool]]] = {
        "ctrmig": ("archive", False), "ctrmig-lazy": ("archive", True),
        "ctrmig-direct": ("direct", False), "ctrmig-postcopy": ("direct", True)}

    def ctrmig(self, mib: int, *, lazy: bool = False, route: str | None = None) -> Row:
        """``route``: a key of :data:`ROUTES` (default: the archive route, lazy or not)."""
        import ctrmig

        route = route or ("ctrmig-lazy" if lazy else "ctrmig")
        how, lazy = self.ROUTES[route]

        def move(name: str) -> dict[str, Any]:
            rep = ctrmig.migrate(name, source=cast(ctrmig.Migrator, self.a),
                                 target=cast(ctrmig.Migrator, self.b), route=how,
                                 restore_options={"lazy_pages": True} if lazy else None)
            figures = dict(vars(rep))
            if rep.manifest is not None:
                figures["dump_s"] = rep.manifest.extra.get("dump_seconds")
            return figures

        return self._measure(Row(mib, "runc", route), move)


class RuncSshBench(RuncPair):
    """runc on host A -> ``runc+ssh://`` host B (tests/hosts.py: two network namespaces
    joined by a veth, sshd on B): ``ctrmig migrate`` runs in A's namespace and crosses
    the veth through ssh, ctrmig on B restores, as between two real hosts. Both hosts'
    runc state and temp files are in a tmpfs, as the floor's images are."""

    #: route name in the table -> ``ctrmig migrate`` flags
    ROUTES: ClassVar[dict[str, list[str]]] = {
        "ctrmig": ["--route", "archive"], "ctrmig-direct": ["--route", "direct"],
        "ctrmig-postcopy": ["--route", "direct", "--lazy-pages"]}

    def __init__(self, hosts: TwoHosts, max_mib: int):
        from ctrmig.engines.runc import RuncMigrator

        self.hosts = hosts
        fs = runc_tmpfs(hosts.a.root.parent / "runc-ssh-tmpfs", max_mib)  # one machine
        for side in ("a", "b"):
            (fs / f"tmp-{side}").mkdir(mode=0o700)
        super().__init__(RuncMigrator(state_dir=fs / "runc-a", workdir=fs / "tmp-a"),
                         RuncMigrator(state_dir=fs / "runc-b", workdir=fs / "tmp-b"), fs)
        self.ssh_options = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"]

    def setup(self) -> None:
        workload.ensure_image(self.hosts.a.root.parent)
        self.ssh_options = [*self.hosts.b.start_sshd(), *self.ssh_options]

    def ctrmig(self, mib: int, route: str) -> Row:
        assert self.mount is not None
        fs = self.mount
        ctrmig_cli = str(Path(sys.executable).with_name("ctrmig"))
        env = {
            "CTRMIG_RUNC_STATE_DIR": str(self.a.state_dir), "TMPDIR": str(fs / "tmp-a"),
            "CTRMIG_JOURNAL_DIR": str(fs / "journal"),
            "CTRMIG_SSH_OPTIONS": " ".join(self.ssh_options),
            "CTRMIG_REMOTE_COMMAND": f"env CTRMIG_RUNC_STATE_DIR={self.b.state_dir} "
                                     f"TMPDIR={fs / 'tmp-b'} {ctrmig_cli}",
        }

        def move(name: str) -> dict[str, Any]:
            res = self.hosts.a.run(
                [ctrmig_cli, "migrate", name, "--from", "runc", "--to",
                 f"runc+ssh://root@{self.hosts.b.address}:2222", "--json",
                 *self.ROUTES[route]], env=env)
            if res.returncode != 0:
                raise RuntimeError(proc.tail(res.stderr.decode(errors="replace"), 5))
            figures: dict[str, Any] = json.loads(res.stdout)
            return figures

        return self._measure(Row(mib, "runc-ssh", route), move)


# --- docker ------------------------------------------------------------------------------------


class DockerBench:
    """Two private dockerds (own data roots, no bridge) on this machine: docker's "hosts".

    docker has no checkpoint export: its raw route is ``docker checkpoint create`` +
    ``docker start --checkpoint`` on the same daemon (retried: containerd's start race).
    """

    def __init__(self, work: Path):
        from ctrmig.host import services

        self.work = work
        tag = uuid.uuid4().hex[:6]
        self.run_dir = Path(f"/run/ctrmig-bench-{tag}")
        self.data_dir = Path(f"/var/lib/ctrmig-bench-{tag}")
        self.socks = {h: self.run_dir / f"dk{h}.sock" for h in ("a", "b")}
        self.services = [
            services.dockerd_service(self.socks[h], data_root=self.data_dir / h,
                                     exec_root=self.run_dir / f"dk{h}-exec",
                                     state_dir=self.run_dir, bridge="none")
            for h in ("a", "b")
        ]

    def cli(self, host: str, *args: str, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return proc.run(["docker", "-H", f"unix://{self.socks[host]}", *args],
                        timeout=timeout, check=check)

    def setup(self) -> None:
        for svc in self.services:
            svc.start()
        ref = workload.ensure_image(self.work)
        archive = images.podman_save(ref, self.work / "memhog-docker.tar")
        for h in ("a", "b"):
            self.cli(h, "load", "-q", "-i", str(archive))
        archive.unlink()

    def close(self) -> None:
        from ctrmig.host import mounts

        for svc in self.services:
            svc.stop()
        for d in (self.data_dir, self.run_dir):
            mounts.unmount_under(d)
            shutil.rmtree(d, ignore_errors=True)

    def _logs(self, host: str, name: str) -> Callable[[], str]:
        return lambda: self.cli(host, "logs", name, timeout=60).stdout.decode(errors="replace")

    def _start(self, mib: int) -> tuple[str, workload.Health]:
        name = f"memhog-{mib}-{uuid.uuid4().hex[:6]}"
        self.cli("a", "run", "-d", "--name", name, "--network", "none", workload.IMAGE,
                 *workload.command(mib))
        logs = self._logs("a", name)
        wait_until(lambda: workload.health(logs()).last_pass >= 1, 120, f"{name} filled")
        return name, workload.health(logs())

    def _rm(self, name: str) -> None:
        for h in ("a", "b"):
            self.cli(h, "rm", "-f", name, timeout=120, check=False)

    def ctrmig(self, mib: int) -> Row:
        import ctrmig
        from ctrmig.engines.docker import DockerMigrator

        row = Row(mib, "docker", "ctrmig")
        name, before = self._start(mib)
        try:
            with DockerMigrator(f"unix://{self.socks['a']}") as src, \
                    DockerMigrator(f"unix://{self.socks['b']}") as dst:
                rep = ctrmig.migrate(name, source=cast(ctrmig.Migrator, src),
                                     target=cast(ctrmig.Migrator, dst))
            row.downtime_s, row.total_s = rep.downtime_s, rep.total_s
            row.bytes_moved = rep.bytes_moved
            row.detail = {"checkpoint_s": rep.checkpoint_s, "restore_s": rep.restore_s}
            row.memory_ok, row.app_freeze_s = check_after(self._logs("b", rep.target_name),
                                                          before)
        finally:
            self._rm(name)
        return row

    def raw(self, mib: int) -> Row:
        row = Row(mib, "docker", "raw")
        name, before = self._start(mib)
        try:
            t0 = time.monotonic()
            self.cli("a", "checkpoint", "create", name, "ck", timeout=1800)
            t1 = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                res = self.cli("a", "start", "--checkpoint", "ck", name, timeout=1800,
                               check=False)
                if res.returncode == 0:
                    break
                if attempts >= 10:
                    raise RuntimeError(proc.tail(res.stderr.decode(errors="replace"), 3))
                time.sleep(0.5)
            t2 = time.monotonic()
            row.downtime_s = row.total_s = t2 - t0
            ck = self.data_dir / "a" / "containers"
            row.bytes_moved = sum(dir_bytes(p) for p in ck.glob("*/checkpoints/ck"))
            row.detail = {"checkpoint_s": t1 - t0, "start_s": t2 - t1,
                          "start_attempts": attempts, "same_daemon": True}
            row.memory_ok, row.app_freeze_s = check_after(self._logs("a", name), before)
        finally:
            self._rm(name)
        return row


# --- report ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            return proc.output(argv, timeout=30).splitlines()[0]
        except Exception as e:  # a missing tool is reported, not fatal
            return f"n/a ({type(e).__name__})"

    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    disk = out(["findmnt", "-no", "SOURCE,FSTYPE", "-T", tempfile.gettempdir()])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "memory": f"{int(mem) / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "disk": disk,
        "criu": out(["criu", "--version"]),
        "podman": out(["podman", "--version"]),
        "runc": out(["runc", "--version"]),
        "docker": out(["dockerd", "--version"]),
        "python": platform.python_version(),
    }


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def ratios(rows: list[Row]) -> dict[tuple[int, str, str], tuple[float | None, float | None]]:
    """ctrmig downtime / raw-route downtime and ctrmig downtime / floor downtime."""
    out: dict[tuple[int, str, str], tuple[float | None, float | None]] = {}
    for r in rows:
        if not r.route.startswith("ctrmig") or r.downtime_s is None:
            continue
        raw = next((x for x in rows if x.mib == r.mib and x.engine == r.engine
                    and x.route == "raw" and x.downtime_s), None)
        flo = next((x for x in rows if x.mib == r.mib and x.route == "floor"
                    and x.downtime_s), None)
        out[(r.mib, r.engine, r.route)] = (
            r.downtime_s / raw.downtime_s if raw and raw.downtime_s else None,
            r.downtime_s / flo.downtime_s if flo and flo.downtime_s else None,
        )
    return out


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return statistics.median(known) if known else None


def summarize(rows: list[Row]) -> list[Row]:
    """One row per (size, engine, route): medians over the repeated runs."""
    groups: dict[tuple[int, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.mib, r.engine, r.route), []).append(r)
    out = []
    for (mib, engine, route), runs in groups.items():
        ok = [r for r in runs if not r.error]
        downs = [r.downtime_s for r in ok if r.downtime_s is not None]
        moved = _median([float(r.bytes_moved) for r in ok if r.bytes_moved is not None])
        out.append(Row(
            mib, engine, route,
            downtime_s=_median(list(downs)), total_s=_median([r.total_s for r in ok]),
            bytes_moved=None if moved is None else int(moved),
            app_freeze_s=_median([r.app_freeze_s for r in ok]),
            memory_ok=all(r.memory_ok for r in ok) if ok else None,
            error="; ".join(sorted({r.error for r in runs if r.error})),
            runs=len(runs), downtime_min=min(downs, default=None),
            downtime_max=max(downs, default=None),
        ))
    return out


def table(all_rows: list[Row]) -> str:
    rows = summarize(all_rows)
    rat = ratios(rows)
    head = ("| MiB | engine | route | runs | downtime s (min-max) | total s | MiB moved "
            "| memhog freeze s | memory ok | ctrmig/raw | ctrmig/floor |")
    lines = [head, "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r.mib, r.engine != "criu", r.engine, r.route)):
        raw_ratio, floor_ratio = rat.get((r.mib, r.engine, r.route), (None, None))
        moved = None if r.bytes_moved is None else r.bytes_moved / (1 << 20)
        ok = "-" if r.memory_ok is None else ("yes" if r.memory_ok else "NO")
        if r.error:
            ok = f"{ok}; FAILED: {r.error[:80]}"
        down = _f(r.downtime_s)
        if r.runs > 1 and r.downtime_min is not None:
            down += f" ({r.downtime_min:.2f}-{r.downtime_max:.2f})"
        lines.append(
            f"| {r.mib} | {r.engine} | {r.route} | {r.runs} | {down} | {_f(r.total_s)} "
            f"| {_f(moved, '{:.0f}')} | {_f(r.app_freeze_s)} | {ok} "
            f"| {_f(raw_ratio)} | {_f(floor_ratio)} |"
        )
    return "\n".join(lines)


NOTES = Path(__file__).with_name("benchmarks-notes.md")


def write_report(out: Path, rows: list[Row], info: dict[str, str], argv: list[str],
                 notes: Path | None = NOTES) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    details = "\n".join(
        f"- {r.mib} MiB {r.engine} {r.route}: "
        + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.detail.items())
        for r in rows if r.detail
    )
    text = f"""# Migration benchmark

Generated by `.venv/bin/python -m bench.migrate_bench {' '.join(argv)}` (see the module's
docstring for what each route measures). Downtime = source frozen -> target running;
"memhog freeze" is the workload's own longest gap between two verification rounds
across the move; "memory ok" = memhog completed two full verification passes of all its
pages after the move with no corruption. With --repeat, every value is the median over
the runs (the downtime column also gives the range). Ratios are of median downtimes.

{table(rows)}

Phase details:

{details}

Machine: {', '.join(f'{k}: {v}' for k, v in info.items())}
"""
    if notes is not None and notes.exists():
        text += "\n" + notes.read_text()
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "argv": argv, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def chart(all_rows: list[Row], out: Path) -> bool:
    """Downtime against memory size, one line per (engine, route), log scales, into the
    PNG ``out``; the workload's own longest stall dashed for the post-copy route. False
    (nothing drawn) where matplotlib is not installed: it is no dependency of ctrmig."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summarize(all_rows) if r.downtime_s]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    tab20 = plt.get_cmap("tab20")
    ax.set_prop_cycle(color=[tab20(i) for i in range(20)])
    lines: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        lines.setdefault((r.engine, r.route), []).append(r)
    for (engine, route), group in sorted(lines.items()):
        group.sort(key=lambda r: r.mib)
        ax.plot([r.mib for r in group], [r.downtime_s or 0.0 for r in group], marker="o",
                label=f"{engine} {route}")
        stalls = [r for r in group if r.app_freeze_s]
        if route == "ctrmig-postcopy" and stalls:
            ax.plot([r.mib for r in stalls], [r.app_freeze_s or 0.0 for r in stalls],
                    marker="x", linestyle="--", label=f"{engine} {route}: memhog's own stall")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("touched memory, MiB")
    ax.set_ylabel("downtime, s (median)")
    ax.set_title("Migration downtime (bench/migrate_bench.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# --- main -------------------------------------------------------------------------------------


def run_bench(sizes: list[int], engines: list[str], work: Path, compression: str,
              lazy: bool, tmpfs_spool: bool, out: Callable[[Row], None],
              docker_max: int = 1 << 30, repeat: int = 1,
              routes: set[str] | None = None) -> list[Row]:
    """``routes``: only these (``floor``, ``ENGINE/ROUTE`` such as ``runc/ctrmig-postcopy``,
    or a bare route name for every engine); None runs them all."""
    rows: list[Row] = []

    def measure(row: Row, fn: Callable[..., Row], *args: Any, **kwargs: Any) -> None:
        if routes is not None and not {row.route, f"{row.engine}/{row.route}"} & routes:
            return
        try:
            row = fn(*args, **kwargs)
        except Exception as e:  # one failed route must not end the run
            row.error = f"{type(e).__name__}: {e}".replace("\n", " ")
        rows.append(row)
        out(row)

    memhog = workload.build_memhog(work / "memhog")
    with contextlib.ExitStack() as stack:
        podman: PodmanBench | None = None
        runc: RuncBench | None = None
        if "podman" in engines:
            hosts = stack.enter_context(TwoHosts(work / "hosts"))
            podman = PodmanBench(hosts, work, compression, tmpfs_spool)
            podman.setup()
        docker_bench: DockerBench | None = None
        if "docker" in engines:
            docker_bench = DockerBench(work)
            stack.callback(docker_bench.close)
            docker_bench.setup()
        if "runc" in engines:
            runc = RuncBench(work, tmpfs_spool, max(sizes))
            stack.callback(runc.close)
            runc.setup()
        runc_ssh: RuncSshBench | None = None
        if "runc-ssh" in engines:
            ssh_hosts = stack.enter_context(TwoHosts(work / "ssh-hosts"))
            runc_ssh = RuncSshBench(ssh_hosts, max(sizes))
            stack.callback(runc_ssh.close)
            runc_ssh.setup()
        for mib in [m for m in sizes for _ in range(repeat)]:
            measure(Row(mib, "criu", "floor"), floor, mib, work, memhog)
            if podman is not None:
                measure(Row(mib, "podman", "ctrmig"), podman.ctrmig, mib)
                measure(Row(mib, "podman", "ctrmig-api"), podman.ctrmig, mib, direct=False)
                measure(Row(mib, "podman", "ctrmig-archive"), podman.archive, mib)
                measure(Row(mib, "podman", "local"), podman.local, mib)
                measure(Row(mib, "podman", "raw"), podman.raw, mib)
            if runc is not None:
                measure(Row(mib, "runc", "ctrmig"), runc.ctrmig, mib)
                measure(Row(mib, "runc", "ctrmig-direct"), runc.ctrmig, mib,
                        route="ctrmig-direct")
                if lazy:
                    measure(Row(mib, "runc", "ctrmig-lazy"), runc.ctrmig, mib, lazy=True)
                    measure(Row(mib, "runc", "ctrmig-postcopy"), runc.ctrmig, mib,
                            route="ctrmig-postcopy")
            if runc_ssh is not None:
                for route in RuncSshBench.ROUTES:
                    if route == "ctrmig-postcopy" and not lazy:
                        continue
                    measure(Row(mib, "runc-ssh", route), runc_ssh.ctrmig, mib, route)
            if docker_bench is not None and mib <= docker_max:
                measure(Row(mib, "docker", "ctrmig"), docker_bench.ctrmig, mib)
                measure(Row(mib, "docker", "raw"), docker_bench.raw, mib)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.migrate_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024", help="MiB of touched memory")
    ap.add_argument("--engines", default="podman,runc,docker",
                    help="podman,runc,docker,runc-ssh (runc-ssh: runc to runc+ssh:// "
                         "across the two-host topology)")
    ap.add_argument("--docker-max", type=int, default=1 << 30,
                    help="largest size (MiB) to run docker at (docker is slow here)")
    ap.add_argument("--compression", default="none", choices=("none", "zstd", "gzip"),
                    help="ctrmig's archive compression (the raw route uses podman's default)")
    ap.add_argument("--disk-spool", action="store_true",
                    help="podman's services and ctrmig's target spool archives on disk, "
                         "runc's state and work dirs are on disk (default: in tmpfs)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every route per size (the table shows medians)")
    ap.add_argument("--no-lazy", action="store_true", help="skip runc's lazy-pages route")
    ap.add_argument("--routes", default="",
                    help="only these, comma-separated: floor, runc/ctrmig-postcopy, raw, ...")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (and .json)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="where the run's files go (local disk)")
    ap.add_argument("--from-json", type=Path, action="append", default=[],
                    help="only re-render --out (and --chart) from the JSON an earlier run "
                         "wrote; repeatable: the rows of several runs together")
    ap.add_argument("--chart", type=Path, default=None,
                    help="draw downtime against size into this PNG (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json]
        rows = [Row(**r) for data in runs for r in data["rows"]]
        print(table(rows))
        if args.out:
            write_report(args.out, rows, runs[0]["machine"],
                         [a for data in runs for a in data["argv"]])
        if args.chart and not chart(rows, args.chart):
            print("matplotlib is not installed: no chart", file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        print("the benchmark needs root (CRIU, namespaces, mounts)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    engines = [e for e in args.engines.split(",") if e]
    work = Path(tempfile.mkdtemp(prefix="ctrmig-bench-", dir=args.workdir))
    info = machine()

    def show(row: Row) -> None:
        print(f"{row.mib:>5} MiB {row.engine:<6} {row.route:<11} downtime "
              f"{_f(row.downtime_s)} s total {_f(row.total_s)} s freeze "
              f"{_f(row.app_freeze_s)} s memory_ok={row.memory_ok} {row.error}", flush=True)

    try:
        rows = run_bench(sizes, engines, work, args.compression, not args.no_lazy,
                         not args.disk_spool, show, args.docker_max, args.repeat,
                         {r for r in args.routes.split(",") if r} or None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print()
    print("machine:", ", ".join(f"{k}: {v}" for k, v in info.items()))
    if args.out:
        write_report(args.out, rows, info, argv)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if args.chart and not chart(rows, args.chart):
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
