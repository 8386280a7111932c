"""The one place where ctrmig runs subprocesses.

Every call takes an argument list (never a shell string) and a timeout. A child that
outlives its timeout is killed together with its process group (runc and criu fork), and
every failure raises :class:`~ctrmig.errors.CommandError` carrying the command, the exit
code, the tail of stderr and, when given, the tail of a CRIU log file.

It is also the one place that reads ``/proc``: a process's state, start time, tree,
threads, open fds, mappings, and the host's unix sockets and file locks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ctrmig.errors import CommandError, CommandTimeoutError, ToolMissingError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20

# Packages that provide each tool, for the "not installed" hint.
_PROVIDERS = {
    "criu": "criu (run scripts/setup-host)",
    "runc": "runc",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "podman": "podman",
    "dockerd": "docker.io",
    "buildah": "buildah",
    "gcc": "gcc",
}


def which(tool: str) -> str:
    """Return the full path of ``tool`` or raise ToolMissingError with an install hint."""
    path = shutil.which(tool)
    if path is None:
        pkg = _PROVIDERS.get(tool, tool)
        raise ToolMissingError(
            f"{tool} is not installed", hint=f"install it: apt-get install {pkg}"
        )
    return path


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _log_tail(log_file: Path | None) -> str:
    if log_file is None or not log_file.exists():
        return ""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    errors = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
    return tail("\n".join(errors) or text, 10)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    input: bytes | None = None,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
    log_file: Path | None = None,
    error: type[CommandError] = CommandError,
    what: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion and return its CompletedProcess (stdout/stderr as bytes).

    ``what`` names the step in error messages ("runc checkpoint web"); ``log_file`` is a
    CRIU log whose error lines are added to the raised error; ``error`` picks the
    CommandError subclass raised on a non-zero exit.
    """
    argv = _resolve(argv)
    what = what or shlex.join(argv[:3])
    log.debug("run: %s", shlex.join(argv))
    if input is not None and stdin is None:
        stdin = subprocess.PIPE
    proc = subprocess.Popen(
        argv,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise CommandTimeoutError(
            f"{what} timed out after {timeout:g} s",
            argv=argv,
            stderr=_join(err, log_file),
            hint="the process group was killed; check the tool's log",
        ) from None
    except BaseException:
        kill_group(proc)  # Ctrl-C: never leave a half-run runc/criu behind
        raise
    if check and proc.returncode != 0:
        stderr = _join(err, log_file)
        first = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        raise error(
            f"{what} failed (exit {proc.returncode}): {first}",
            argv=argv,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return subprocess.CompletedProcess(argv, proc.returncode, out or b"", err or b"")


def _resolve(argv: Sequence[str]) -> list[str]:
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty argv")
    if "/" not in argv[0]:
        which(argv[0])  # a clear "not installed" error instead of FileNotFoundError
    return argv


def output(argv: Sequence[str], *, timeout: float, **kwargs: object) -> str:
    """Run ``argv`` and return its stdout as stripped text."""
    return run(argv, timeout=timeout, **kwargs).stdout.decode(errors="replace").strip()  # type: ignore[arg-type]


def _join(err: bytes | None, log_file: Path | None) -> str:
    text = tail((err or b"").decode(errors="replace"))
    extra = _log_tail(log_file)
    if extra:
        text = f"{text}\n--- {log_file} ---\n{extra}" if text else extra
    return text


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-running child in its own session (services, supervisors)."""
    argv = _resolve(argv)
    log.debug("spawn: %s", shlex.join(argv))
    return subprocess.Popen(
        argv,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child we started and its process group (by PID, never by name)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """Stop a child we started: SIGTERM, wait up to ``timeout``, then SIGKILL its group."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def stop_pid(pid: int, *, timeout: float = 10.0) -> None:
    """Stop a process we started earlier and know only by PID (e.g. from a pidfile)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- /proc ---------------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (index 0 is the state, 19 the
    start time), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` (R, S, T, Z, ...), or None if there is none.
    A zombie still holds its PID."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): with the PID, it names one
    process, not whichever process reuses the number later. None if it is gone."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def running(pid: int, start: int | None) -> bool:
    """Whether the process that was ``pid``, started at ``start`` (:func:`start_time`),
    still runs: not a zombie, and not another process that reuses the number."""
    return alive(pid) and start_time(pid) == start


def alive(pid: int, *, reap: bool = True) -> bool:
    """Whether process ``pid`` runs (a zombie does not). A dead child of ours is reaped,
    unless ``reap`` is false (it may be a child whose owner waits for it, e.g. a Popen)."""
    if pid <= 0:
        return False
    if reap:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        except ChildProcessError:
            pass
    return state(pid) not in (None, "Z", "X")


def threads(pid: int) -> list[int]:
    """The thread IDs of process ``pid``, sorted ([] if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    found: list[int] = []
    for tid in threads(pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(c) for c in f.read().split() if int(c) not in found]
    return found


def tree(root: int) -> list[int]:
    """The PIDs of ``root`` and all its descendants, root first (breadth first)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        todo.extend(c for c in children(pid) if c not in pids)
    return pids


def exe(pid: int) -> str:
    """The executable of ``pid`` (ends in " (deleted)" if it was); OSError if unreadable."""
    return os.readlink(f"/proc/{pid}/exe")


def cwd(pid: int) -> str:
    """The working directory of ``pid``; OSError if unreadable."""
    return os.readlink(f"/proc/{pid}/cwd")


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid``; OSError if unreadable."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def namespace(pid: int | str, kind: str) -> str:
    """The ``kind`` namespace ("mnt", "pid", ...) of ``pid`` (or "self"), e.g.
    ``mnt:[4026531841]``; OSError if unreadable."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@dataclass(frozen=True)
class OpenFd:
    """One open fd of a process, as /proc shows it."""

    fd: int
    target: str  # readlink of /proc/PID/fd/N: a path, pipe:[N], socket:[N], ...
    stat: os.stat_result  # of what it refers to
    flags: int  # the open flags (fdinfo)


def open_fds(pid: int) -> list[OpenFd]:
    """The open fds of ``pid`` in fd order; fds closed while reading are left out."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    result = []
    for name in sorted(names, key=int):
        link = f"/proc/{pid}/fd/{name}"
        try:
            target = os.readlink(link)
            st = os.stat(link)
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                info = f.read()
        except OSError:
            continue  # closed meanwhile
        m = re.search(r"^flags:\s*(\d+)", info, re.M)
        result.append(OpenFd(int(name), target, st, int(m.group(1), 8) if m else 0))
    return result


def mapped_paths(pid: int) -> set[str]:
    """The paths of the files mapped into ``pid`` (deleted ones left out)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    paths = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            paths.add(parts[5])
    return paths


def unix_socket_inodes() -> set[int]:
    """The inodes of this network namespace's unix sockets (/proc/net/unix)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {int(fields[6]) for ln in lines if len(fields := ln.split()) > 6
            and fields[6].isdigit()}


def lock_holders() -> set[int]:
    """The PIDs that hold a file lock (/proc/locks; waiters for one are not counted)."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {int(fields[4]) for ln in lines
            if len(fields := ln.split()) > 4 and fields[4].lstrip("-").isdigit()}
