"""``criu dump`` and ``criu restore`` of a plain process tree: their argv, written once,
and what their failures say."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctrmig.engines.process.tree import alive
from ctrmig.errors import CheckpointError, CommandError, NameInUseError, RestoreError
from ctrmig.host import criu, proc

_PID_TAKEN = re.compile(r"Can't fork for \S+: File exists")


def criu_option_args(config: dict[str, Any], tcp_established: bool, *,
                     dump: bool) -> list[str]:
    """The flags dump and restore must both get (and the dump's --external list): the
    options asked for and what ``config`` (:func:`~.tree.facts`) found the tree needs."""
    flags = []
    if config["shell_job"]:
        flags.append("--shell-job")
    if config["file_locks"]:
        flags.append("--file-locks")
    if config["ext_unix_sk"]:
        # Stdio on a unix stream socket whose peer is outside the tree: declared
        # external at dump (by its inode), handed a new fd at restore (--inherit-fd).
        flags.append("--ext-unix-sk")
        if dump:
            for key in config["ext_unix_sk"]:
                flags += ["--external", f"unix[{key.removeprefix('socket:[')}"]
    if tcp_established:
        flags.append("--tcp-established")
    return flags


def error_text(e: CommandError) -> str:
    """CRIU's first real error line, else the command's own message."""
    return criu.first_error(e.stderr or "") or e.message


def dump(pid: int, images: Path, config: dict[str, Any], *, leave_running: bool,
         tcp_established: bool, workdir: Path | None, timeout: float) -> None:
    """``criu dump`` the tree rooted at ``pid`` into ``images``: left stopped, or running
    with ``leave_running``. On failure CRIU lets the tree run on; CheckpointError."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-process-", dir=workdir) as work:
        argv = ["criu", "dump", "-t", str(pid), "-D", str(images), "-W", work,
                "-o", "dump.log", "-v4",
                "--leave-running" if leave_running else "--leave-stopped"]
        argv += criu_option_args(config, tcp_established, dump=True)
        try:
            proc.run(argv, timeout=timeout, log_file=Path(work, "dump.log"),
                     what=f"criu dump of PID {pid}")
        except CommandError as e:
            state = "left running" if alive(pid) else "gone (it died meanwhile)"
            raise CheckpointError(
                f"checkpoint of PID {pid} failed: {error_text(e)}", stderr=e.stderr,
                hint=f"the process is {state}; see the CRIU log lines in stderr",
            ) from e


def restore(images: Path, config: dict[str, Any], *, tcp_established: bool,
            inherit: Mapping[str, int], workdir: Path | None, timeout: float) -> int:
    """``criu restore -d`` the tree ``config`` describes from ``images``, handing it the
    fds ``inherit`` (CRIU's name of a resource -> our fd); return the root's PID."""
    pid = int(config["pid"])
    with tempfile.TemporaryDirectory(prefix="ctrmig-process-", dir=workdir) as work:
        argv = ["criu", "restore", "-d", "-D", str(images), "-W", work,
                "-o", "restore.log", "-v4", "--pidfile", str(Path(work, "pidfile"))]
        argv += criu_option_args(config, tcp_established or config["tcp_established"],
                                 dump=False)
        for key, fd in inherit.items():
            argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
        try:
            proc.run(argv, timeout=timeout, pass_fds=list(inherit.values()),
                     log_file=Path(work, "restore.log"), what=f"criu restore of PID {pid}")
        except CommandError as e:
            if _PID_TAKEN.search(e.stderr or ""):
                raise NameInUseError(
                    f"PID {pid} (or a PID of its tree) is taken: Can't fork for PID",
                    hint="the source process may still run: stop it first, or restore "
                         "on another host", stderr=e.stderr,
                ) from e
            raise RestoreError(f"restore of PID {pid} failed: {error_text(e)}",
                               stderr=e.stderr, hint="see the CRIU log lines in stderr") from e
        return int(Path(work, "pidfile").read_text().strip())
