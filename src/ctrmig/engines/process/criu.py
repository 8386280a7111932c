"""``criu dump`` and ``criu restore`` of a plain process tree: their argv, written once,
and what their failures say."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ctrmig.engines.process.tree import alive
from ctrmig.errors import CheckpointError, CommandError, NameInUseError, RestoreError
from ctrmig.host import criu, proc

#: A restore's lazy-pages daemon, given the restore's work dir (see :func:`restore`).
LazyPages = Callable[[Path], AbstractContextManager[None]]
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


def dump_argv(pid: int, images: Path, work: Path, config: dict[str, Any], *,
              leave_running: bool, tcp_established: bool,
              page_server: int | None = None, lazy: bool = False) -> list[str]:
    """``criu dump`` of the tree rooted at ``pid``. ``page_server``: a loopback port the
    pages go to (pre-copy), or with ``lazy`` the port the dump serves them on until the
    last one was fetched (post-copy; CRIU then ends the tree)."""
    argv = ["criu", "dump", "-t", str(pid), "-D", str(images), "-W", str(work),
            "-o", "dump.log", criu.log_flag()]
    if not lazy:
        argv.append("--leave-running" if leave_running else "--leave-stopped")
    argv += criu_option_args(config, tcp_established, dump=True)
    if page_server is not None:
        argv += [*([] if lazy else ["--page-server"]), "--address", "127.0.0.1",
                 "--port", str(page_server)]
    if lazy:
        argv.append("--lazy-pages")
    return argv


def dump(pid: int, images: Path, config: dict[str, Any], *, leave_running: bool,
         tcp_established: bool, workdir: Path | None, timeout: float) -> None:
    """``criu dump`` the tree rooted at ``pid`` into ``images``: left stopped, or running
    with ``leave_running``. On failure CRIU lets the tree run on; CheckpointError."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-process-", dir=workdir) as work:
        argv = dump_argv(pid, images, Path(work), config, leave_running=leave_running,
                         tcp_established=tcp_established)
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
            inherit: Mapping[str, int], workdir: Path | None, timeout: float,
            lazy_pages: LazyPages | None = None) -> int:
    """``criu restore -d`` the tree ``config`` describes from ``images``, handing it the
    fds ``inherit`` (CRIU's name of a resource -> our fd); return the root's PID.
    ``lazy_pages(work)``: the lazy-pages daemon serving the restore (``--lazy-pages``);
    when it fails after the restore, the restored tree is killed (its memory is not
    whole) and the daemon's error raised."""
    pid = int(config["pid"])
    restored: list[int] = []
    try:
        _restore(pid, images, config, tcp_established, inherit, workdir, timeout, lazy_pages,
                 restored)
    except BaseException:
        for p in reversed(proc.tree(restored[0]) if restored else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)  # lazy pages failed: its memory is not whole
        raise
    return restored[0]


def _restore(pid: int, images: Path, config: dict[str, Any], tcp_established: bool,
             inherit: Mapping[str, int], workdir: Path | None, timeout: float,
             lazy_pages: LazyPages | None,
             restored: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="ctrmig-process-", dir=workdir) as work, \
            (lazy_pages(Path(work)) if lazy_pages else contextlib.nullcontext()):
        argv = ["criu", "restore", "-d", "-D", str(images), "-W", work,
                "-o", "restore.log", criu.log_flag(), "--pidfile", str(Path(work, "pidfile"))]
        if lazy_pages is not None:
            argv.append("--lazy-pages")
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
        restored.append(int(Path(work, "pidfile").read_text().strip()))
