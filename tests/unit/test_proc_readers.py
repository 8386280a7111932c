"""host.proc's /proc readers against a real child that holds a thread, a child process,
an open file, a file lock, a mapped file and a unix socket pair."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrmig.host import proc

HOLDER = """
import fcntl, mmap, os, socket, subprocess, sys, threading, time
data = open(sys.argv[1])
locked = open(sys.argv[2], "w")
fcntl.lockf(locked, fcntl.LOCK_EX)
mapped = mmap.mmap(data.fileno(), 0, prot=mmap.PROT_READ)
pair = socket.socketpair(socket.AF_UNIX)
child = subprocess.Popen(["sleep", "60"])
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(child.pid, pair[0].fileno(), flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    data, locked = tmp_path / "data.txt", tmp_path / "locked"
    data.write_text("some data\n")
    p = proc.spawn([sys.executable, "-c", HOLDER, str(data), str(locked)],
                   stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        child, sock_fd = (int(n) for n in p.stdout.readline().split())
        yield p, child, sock_fd, data
    finally:
        proc.kill_group(p)  # the holder and its sleep child (one process group)


def test_tree_threads_and_identity(holder: tuple[subprocess.Popen[bytes], int, int, Path],
                                   tmp_path: Path) -> None:
    p, child, _, _ = holder
    assert proc.children(p.pid) == [child]
    assert proc.tree(p.pid) == [p.pid, child]
    assert len(proc.threads(p.pid)) >= 2 and p.pid in proc.threads(p.pid)
    assert proc.exe(p.pid) == os.path.realpath(sys.executable)
    assert proc.cmdline(p.pid)[:2] == [sys.executable, "-c"]
    assert proc.cwd(p.pid) == os.getcwd()
    assert proc.state(p.pid) in ("R", "S")
    assert proc.namespace(p.pid, "mnt") == proc.namespace("self", "mnt")
    fields = proc.stat_fields(p.pid)
    assert fields is not None and int(fields[3]) == p.pid  # its own session (spawn)
    assert proc.start_time(p.pid) == int(fields[19])


def test_fds_maps_sockets_and_locks(
        holder: tuple[subprocess.Popen[bytes], int, int, Path]) -> None:
    p, _, sock_fd, data = holder
    fds = {fd.fd: fd for fd in proc.open_fds(p.pid)}
    opened = [fd for fd in fds.values() if fd.target == str(data)]
    assert opened and opened[0].flags & os.O_ACCMODE == os.O_RDONLY
    assert fds[1].target.startswith("pipe:[")
    socket_target = fds[sock_fd].target
    assert socket_target.startswith("socket:[")
    assert int(socket_target[len("socket:["):-1]) in proc.unix_socket_inodes()
    assert str(data) in proc.mapped_paths(p.pid)
    assert p.pid in proc.lock_holders()


def test_gone_processes_read_as_nothing() -> None:
    p = proc.spawn(["true"])
    p.wait()
    assert proc.stat_fields(p.pid) is None and proc.state(p.pid) is None
    assert proc.start_time(p.pid) is None
    assert proc.threads(p.pid) == [] and proc.open_fds(p.pid) == []
    assert proc.mapped_paths(p.pid) == set()
    assert not proc.alive(p.pid)


def test_alive_without_reaping_leaves_the_exit_status_to_the_parent() -> None:
    p = proc.spawn([sys.executable, "-c", "raise SystemExit(3)"])
    while proc.state(p.pid) not in (None, "Z"):
        time.sleep(0.01)
    assert proc.state(p.pid) == "Z"  # a zombie still holds its PID
    assert not proc.alive(p.pid, reap=False)
    assert p.wait(timeout=5) == 3  # not reaped behind the Popen's back
