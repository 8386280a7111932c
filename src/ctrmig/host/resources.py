"""What this host offers a restore, and what a running container holds, read from the
kernel: free space, free ports, its processes' memory and credentials (/proc), directory
sizes. (Process trees and namespaces come from :mod:`ctrmig.host.proc`.)

Used by :mod:`ctrmig.preflight` on whichever host it runs (ctrmig on an ssh target runs
these there): nothing here runs a program or changes anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from ctrmig.archive.criu_images import Creds
from ctrmig.host import proc
from ctrmig.host.mounts import unescape


def free_bytes(path: Path) -> tuple[Path, int]:
    """Bytes an unprivileged writer may still use on the filesystem of ``path`` (its
    nearest existing parent if it does not exist yet), and the directory measured."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    st = os.statvfs(where)
    return where, st.f_bavail * st.f_frsize


def dir_bytes(path: Path) -> int:
    """Disk space the files below ``path`` take (allocated blocks; links not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def overlay_upper(mountpoint: Path) -> Path | None:
    """The upper (writable) directory of the overlay mounted at ``mountpoint``: what a
    container wrote to its rootfs. None if no overlay is mounted there."""
    where = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mine, _, theirs = line.partition(" - ")
            fields, super_fields = mine.split(), theirs.split()
            if (len(fields) > 4 and unescape(fields[4]) == where and super_fields
                    and super_fields[0] == "overlay"):
                for opt in super_fields[-1].split(","):
                    if opt.startswith("upperdir="):
                        return Path(unescape(opt.removeprefix("upperdir=")))
    return None


def host_key() -> str:
    """This host's identity for "same host?": its boot and its network namespace (ports,
    and the PIDs a same-host restore needs, are per host)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}:{os.stat('/proc/self/ns/net').st_ino}"


# --- a running process tree ----------------------------------------------------------------


def sharing_mounts(pid: int) -> list[int]:
    """Every process in ``pid``'s mount namespace: a container's processes, whatever
    runtime made them (just ``pid`` when that namespace is the host's own)."""
    ns = proc.namespace(pid, "mnt")
    if ns == proc.namespace("self", "mnt"):
        return [pid]
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if proc.namespace(int(entry.name), "mnt") == ns:
                    found.append(int(entry.name))
    return sorted(found)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def memory_bytes(pids: list[int]) -> int:
    """Memory CRIU dumps for these processes: their anonymous and shared pages (file-backed
    pages are mapped again from the files at restore)."""
    total = 0
    for pid in pids:
        try:
            status = _status(pid)
        except OSError:
            continue
        for key in ("RssAnon", "RssShmem"):
            total += int(status.get(key, "0 kB").split()[0]) << 10
    return total


def creds(pid: int) -> Creds:
    """Process ``pid``'s credentials, as CRIU would record them in its core image."""
    status = _status(pid)
    uids = [int(v) for v in status["Uid"].split()]
    gids = [int(v) for v in status["Gid"].split()]
    return Creds(
        uid=uids[0], euid=uids[1], suid=uids[2], fsuid=uids[3],
        gid=gids[0], egid=gids[1], sgid=gids[2], fsgid=gids[3],
        cap_inh=int(status["CapInh"], 16), cap_prm=int(status["CapPrm"], 16),
        cap_eff=int(status["CapEff"], 16), cap_bnd=int(status["CapBnd"], 16),
        secbits=0, groups=tuple(int(g) for g in status.get("Groups", "").split()),
    )


def inner_pid(pid: int) -> int:
    """``pid`` as its own PID namespace numbers it (a container's init is 1)."""
    return int(_status(pid).get("NSpid", str(pid)).split()[-1])


# --- ports ---------------------------------------------------------------------------------


def port_taken(port: int, proto: str = "tcp", host_ip: str = "") -> str | None:
    """Why ``port`` cannot be bound here (a listener holds it, the address is not this
    host's), or None if it is free: tried for real, with a socket bound and closed."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not taken
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "in use"
            return e.strerror or str(e)
    return None
