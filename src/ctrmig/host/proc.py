"""The one place where ctrmig runs subprocesses.

Every call takes an argument list (never a shell string) and a timeout. A child that
outlives its timeout is killed together with its process group (runc and criu fork), and
every failure raises :class:`~ctrmig.errors.CommandError` carrying the command, the exit
code, the tail of stderr and, when given, the tail of a CRIU log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
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


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot): with the PID, it names one
    process, not whichever process reuses the number later. None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int, start: int | None) -> bool:
    """Whether the process that was ``pid``, started at ``start`` (:func:`start_time`),
    still runs: not a zombie, and not another process that reuses the number."""
    return alive(pid) and start_time(pid) == start


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not; a child of ours is reaped)."""
    if pid <= 0:
        return False
    try:
        # Reap it if it is our child; otherwise just probe.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False
