"""What a process tree depends on outside its memory, read from /proc (through
:mod:`ctrmig.host.proc`) while it runs: the facts ``config.dump`` records.

The executable (path, size, sha256), argv, cwd, session, the tree's PIDs and TIDs, its
open fds classified as CRIU names them, the regular files it holds open or has mapped,
its stdio, whether it holds file locks, and which stdio is a unix socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrmig.archive import ContainerRecord
from ctrmig.errors import CheckpointError, ContainerNotFoundError, OptionError
from ctrmig.host import proc
from ctrmig.protocol import CheckpointOptions

CONFIG_VERSION = 1
#: Files up to this size get a sha256 in config.dump; larger ones only their size.
HASH_LIMIT = 64 << 20
#: Character-device majors of terminals: tty/console (4, 5) and Unix98 ptys (136-143).
_TTY_MAJORS = frozenset({4, 5, *range(136, 144)})


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_facts(path: str, *, with_hash: bool) -> dict[str, Any]:
    """Size, and sha256 when asked and the file is small enough.

    Files of size 0 get none: empty, or /proc and /sys files, whose content is made up
    on every read."""
    size = os.stat(path).st_size
    facts: dict[str, Any] = {"size": size, "sha256": None}
    if with_hash and 0 < size <= HASH_LIMIT:
        facts["sha256"] = sha256(path)
    return facts


@dataclass(frozen=True)
class Fd:
    """One open fd of a process in the tree, classified."""

    pid: int
    fd: int
    target: str  # readlink of /proc/PID/fd/N
    flags: int
    kind: str  # file, deleted, null, pipe, socket, tty, other
    key: str  # CRIU's name for it in --inherit-fd (pipe:[N], tty[R:D], path)

    @property
    def access(self) -> str:
        return {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(self.flags & os.O_ACCMODE, "rw")

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


def fds(pid: int) -> list[Fd]:
    """The open fds of ``pid``, each with its kind and CRIU's name for it."""
    result = []
    for open_fd in proc.open_fds(pid):
        target, st = open_fd.target, open_fd.stat
        if stat.S_ISREG(st.st_mode) and target.endswith(" (deleted)"):
            kind, key = "deleted", target  # CRIU carries its content (up to --ghost-limit)
        elif stat.S_ISREG(st.st_mode) and target.startswith("/"):
            kind, key = "file", target.lstrip("/")
        elif stat.S_ISCHR(st.st_mode) and target == "/dev/null":
            kind, key = "null", target.lstrip("/")
        elif stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS:
            kind, key = "tty", f"tty[{st.st_rdev:x}:{st.st_dev:x}]"
        elif target.startswith("pipe:"):
            kind, key = "pipe", target
        elif target.startswith("socket:"):
            kind, key = "socket", target
        else:
            kind, key = "other", target
        result.append(Fd(pid, open_fd.fd, target, open_fd.flags, kind, key))
    return result


def pid_of(container: str) -> int:
    """The PID named by ``container``; ContainerNotFoundError if it is not one."""
    try:
        pid = int(container)
    except ValueError:
        raise ContainerNotFoundError(
            f"{container!r} is not a PID", hint="the process engine takes a numeric PID"
        ) from None
    if pid <= 0:
        raise ContainerNotFoundError(f"{container!r} is not a PID")
    return pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs. Never reaps: it may be a child someone else waits for."""
    return proc.alive(pid, reap=False)


def describe(pid: int) -> ContainerRecord:
    """The record of the tree rooted at ``pid``; refuse what cannot be checkpointed here."""
    if not alive(pid):
        raise ContainerNotFoundError(f"no running process with PID {pid}")
    if pid == 1 or pid == os.getpid():
        raise OptionError(f"refusing to checkpoint PID {pid}", hint="init or ctrmig itself")
    for ns in ("mnt", "pid"):
        with contextlib.suppress(OSError):
            if proc.namespace(pid, ns) != proc.namespace("self", ns):
                raise CheckpointError(
                    f"PID {pid} runs in another {ns} namespace (a container?)",
                    hint="checkpoint containers with their engine (podman, docker, runc)",
                )
    try:
        exe = proc.exe(pid)
        argv = proc.cmdline(pid)
    except OSError as e:
        raise CheckpointError(f"cannot inspect PID {pid}: {e.strerror}",
                              hint="kernel threads cannot be checkpointed") from None
    if exe.endswith(" (deleted)"):
        raise CheckpointError(
            f"the executable of PID {pid} was deleted or replaced: {exe}",
            hint="restart the process from the current file, then checkpoint it",
        )
    return ContainerRecord(name=str(pid), id=str(pid), image=exe,
                           image_id=f"sha256:{sha256(exe)}", command=argv)


def facts(pid: int, opts: CheckpointOptions) -> dict[str, Any]:
    """What config.dump records, gathered from /proc while the tree runs."""
    pids = proc.tree(pid)
    fields = proc.stat_fields(pid) or []
    pgid, sid, tty_nr = (int(fields[i]) for i in (2, 3, 4))
    open_fds = [fd for p in pids for fd in fds(p)]
    stdio = {fd.fd: fd for fd in open_fds if fd.pid == pid and fd.fd in (0, 1, 2)}
    has_tty = tty_nr != 0 or any(fd.kind == "tty" for fd in open_fds)
    unix = {f"socket:[{inode}]" for inode in proc.unix_socket_inodes()}
    locked = not proc.lock_holders().isdisjoint(pids)
    files: dict[str, dict[str, Any]] = {}
    for fd in open_fds:
        if fd.kind != "file":
            continue
        entry = files.setdefault(fd.target, {"path": fd.target, "access": fd.access,
                                             "append": fd.append, "fds": []})
        if entry["access"] != fd.access:
            entry["access"] = "rw"
        entry["append"] = entry["append"] and fd.append
        entry["fds"].append(f"{fd.pid}:{fd.fd}")
    exe = proc.exe(pid)
    return {
        "version": CONFIG_VERSION,
        "pid": pid,
        "tree": {"pids": pids, "tids": sorted({t for p in pids for t in proc.threads(p)})},
        "exe": exe,
        "cwd": proc.cwd(pid),
        "argv": proc.cmdline(pid),
        "session": {"sid": sid, "pgid": pgid, "tty": has_tty},
        "shell_job": sid != pid or pgid != pid or has_tty,
        "file_locks": opts.file_locks or locked,
        "tcp_established": opts.tcp_established,
        "ext_unix_sk": sorted({fd.key for fd in stdio.values() if fd.key in unix}),
        "stdio": {
            str(n): {"kind": fd.kind, "key": fd.key, "target": fd.target,
                     "access": fd.access, "append": fd.append}
            for n, fd in sorted(stdio.items())
        },
        "files": sorted(files.values(), key=lambda f: f["path"]),
        "deleted_files": sorted({fd.target for fd in open_fds if fd.kind == "deleted"}),
        "mapped": [{"path": p} for p in sorted(proc.mapped_paths(pid) - {exe})
                   if os.path.isfile(p)],
    }


def hash_files(config: dict[str, Any]) -> None:
    """Add size/sha256 to the exe and files: sha256 only for what is read, not written."""
    config["exe_sha256"] = sha256(config["exe"])
    config["exe_size"] = os.stat(config["exe"]).st_size
    for entry in config["files"]:
        with contextlib.suppress(OSError):
            entry.update(file_facts(entry["path"], with_hash=entry["access"] == "r"))
    for entry in config["mapped"]:
        with contextlib.suppress(OSError):
            entry.update(file_facts(entry["path"], with_hash=True))


def manifest_extra(config: dict[str, Any]) -> dict[str, Any]:
    """The facts of ``config`` the manifest shows (``ctrmig inspect``)."""
    return {
        "pid": config["pid"],
        "exe": config["exe"],
        "exe_sha256": config["exe_sha256"],
        "argv": config["argv"],
        "cwd": config["cwd"],
        "shell_job": config["shell_job"],
        "stdio": {n: s["kind"] if s["kind"] != "file" else f"file {s['target']}"
                  for n, s in config["stdio"].items()},
        "files": [f["path"] for f in config["files"]],
    }
