"""An engine on another host, driven over ssh by running ctrmig there.

runc and plain processes have no API to reach remotely, and docker's restore must place
checkpoint files on the target's own disk: for those, ctrmig on the target host does the
work, and the archive streams through ssh's stdin (restore) or stdout (checkpoint).

Address: ``ssh://[user@]host[:port]``. The remote command is ``ctrmig`` unless
``remote_command`` (or CTRMIG_REMOTE_COMMAND) says otherwise, e.g.
``/opt/ctrmig/.venv/bin/ctrmig``; ``remote_args`` are added to every engine-facing call
(e.g. ``["--url", "unix:///run/docker.sock"]``). ssh reads its usual configuration;
``ssh_options`` adds more (e.g. ``["-i", "key"]``).
"""

from __future__ import annotations

import builtins
import json
import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

from ctrmig import settings
from ctrmig.archive import Archive, read_manifest
from ctrmig.archive.streams import CHUNK, Progress, pieces
from ctrmig.archive.writer import atomic_output
from ctrmig.errors import (
    ERROR_LINE,
    READY_LINE,
    RUNNING_LINE,
    CommandError,
    CtrmigError,
    EngineError,
    OptionError,
    RestoreError,
    named,
)
from ctrmig.host import proc
from ctrmig.host.ssh import SSH_FLAGS, ssh_destination
from ctrmig.options import CheckpointOptions, RestoreOptions, build, cli_args
from ctrmig.protocol import ArchivePath, ArchiveSource, ContainerInfo, as_path

SSH_TIMEOUT = 60.0


class RemoteMigrator:
    """The Migrator protocol for engine ``engine`` on the host at ``address`` (ssh://)."""

    #: A restore calls ``on_ready`` once ctrmig there reads the archive (and a lazy-pages
    #: one ``on_running`` once it runs: RestoreOptions).
    signals_ready = True

    def __init__(
        self,
        engine: str,
        address: str,
        *,
        remote_command: str | None = None,
        remote_args: Sequence[str] = (),
        ssh_options: Sequence[str] = (),
        timeout: float = 900.0,
    ):
        port, self._dest, _ = ssh_destination(address)
        self.engine = engine
        self.address = address
        self.timeout = timeout
        # Keep-alives (SSH_FLAGS): a link that dies without a reset would otherwise hang a
        # migration (with its source stopped) until TCP gives up, many minutes later.
        self._ssh = ["ssh", *SSH_FLAGS, *ssh_options, *port]
        command = remote_command or settings.current().remote_command
        self._remote = shlex.split(command)
        self._remote_args = list(remote_args)

    # --- one place for every remote call -------------------------------------------------

    def _argv(self, *args: str, engine_args: bool = True) -> list[str]:
        remote = [*self._remote, "--json-errors", *args]
        if engine_args:
            remote += ["--engine", self.engine, *self._remote_args]
        # ssh hands the remote side one command line for its shell: quote every word.
        return [*self._ssh, self._dest, "--", shlex.join(remote)]

    def _run(self, *args: str, stdin: BinaryIO | None = None, timeout: float = SSH_TIMEOUT,
             engine_args: bool = True) -> str:
        argv = self._argv(*args, engine_args=engine_args)
        try:
            res = proc.run(argv, timeout=timeout, stdin=stdin,
                           what=f"ctrmig {args[0]} on {self.address}")
        except CommandError as e:
            raise _remote_error(e.stderr or "", e.message) from None
        return res.stdout.decode(errors="replace").strip()

    def call(self, *args: str, input: bytes) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctrmig ARGS`` (with the engine's arguments) there, ``input`` on its stdin;
        not checked: ssh exits 255 on its own failures, the remote ctrmig otherwise."""
        return proc.run(self._argv(*args), input=input, timeout=SSH_TIMEOUT, check=False,
                        what=f"ctrmig {args[0]} on {self.address}")

    # --- helpers the direct route runs there (ctrmig.direct) --------------------------------

    def helper_argv(self, *args: str) -> list[str]:
        """ssh argv running ``ctrmig ARGS`` on the remote host (no engine flags)."""
        return self._argv(*args, engine_args=False)

    @staticmethod
    def error(stderr: str, what: str) -> CtrmigError:
        """The error a remote ctrmig reported on ``stderr``, as its own class."""
        return _remote_error(stderr, what)

    # --- protocol ----------------------------------------------------------------------------

    def version(self) -> str:
        return self._run("--version", engine_args=False)

    def list(self) -> list[ContainerInfo]:
        rows = json.loads(self._run("ls", "--all", "--json") or "[]")
        return [ContainerInfo(self.engine, r["name"], r["id"], r.get("image", ""),
                              r.get("state", "")) for r in rows]

    def exists(self, container: str) -> bool:
        return any(container in (c.name, c.id) for c in self.list())

    def remove(self, container: str) -> None:
        self._run("rm", container)

    def logs(self, container: str) -> str:
        return self._run("logs", container)

    def resume(self, container: str) -> None:
        self._run("resume", container, timeout=self.timeout)

    def has_image(self, ref: str) -> bool | None:
        """Not asked over ssh: None (unknown), so a migration carries the image."""
        return None

    def checkpoint(
        self,
        container: str,
        archive: ArchivePath | BinaryIO,
        options: CheckpointOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> Archive:
        """Checkpoint on the remote host, the archive streamed back over ssh to a file."""
        opts = build(CheckpointOptions, options, overrides)
        if opts.encrypt_to or opts.sign:
            raise OptionError("a remote checkpoint cannot be encrypted or signed from here",
                              hint="run `ctrmig checkpoint --encrypt-to/--sign` on that host "
                                   "(key files are read where ctrmig runs)")
        if not isinstance(archive, (str, os.PathLike)):
            raise OptionError(
                "a remote checkpoint can only be written to a file",
                hint="run `ctrmig migrate` on the source host, or checkpoint to a file",
            )
        # Every option as a flag of the remote `ctrmig checkpoint` (the same table makes
        # both); the compression always, so that the remote default cannot differ.
        args = ["checkpoint", container, "-o", "-", *cli_args(opts)]
        if "--compress" not in args:
            args += ["--compress", opts.compression]
        path = as_path(archive)
        with atomic_output(path) as out:
            self._stream(args, stdin=None, stdout=out, progress=progress)
        return Archive(path, read_manifest(path))

    def restore(
        self,
        archive: ArchiveSource,
        options: RestoreOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> str:
        """Stream the archive to ctrmig on the remote host, which verifies and restores it.

        ``on_commit`` (see :class:`~ctrmig.protocol.RestoreOptions`) is told the ssh
        client's PID before the archive's last bytes go: from then on the remote ctrmig may
        finish the restore even if this process dies, and that ssh lives until it has.
        """
        opts = build(RestoreOptions, options, overrides)
        on_commit = opts.on_commit
        args = ["restore", "-", "--json", *cli_args(opts)]
        if isinstance(archive, (str, os.PathLike)):
            with open(archive, "rb") as f:
                out = self._stream(args, stdin=f, stdout=None, progress=progress,
                                   before_last=on_commit, on_ready=opts.on_ready,
                                   on_running=opts.on_running)
        else:
            out = self._stream(args, stdin=archive, stdout=None, progress=progress,
                               before_last=on_commit, on_ready=opts.on_ready,
                               on_running=opts.on_running)
        try:
            return str(json.loads(out)["name"])
        except (ValueError, KeyError):
            raise RestoreError(f"unexpected answer from ctrmig on {self.address}: {out!r}") \
                from None

    def restore_image(self, ref: str, options: RestoreOptions | None = None) -> str:
        """Restore checkpoint image ``ref`` there: the remote ctrmig pulls it from its
        registry itself (``migrate --via``); ``on_commit`` gets the ssh PID at once."""
        opts = build(RestoreOptions, options)
        out = self._stream(["restore", "--image", ref, "--json", *cli_args(opts)],
                           stdin=None, stdout=None, progress=None, before_last=opts.on_commit)
        try:
            return str(json.loads(out)["name"])
        except (ValueError, KeyError):
            raise RestoreError(f"unexpected answer from ctrmig on {self.address}: {out!r}") \
                from None

    def checkpoint_image(self, container: str, ref: str,
                         options: CheckpointOptions | None = None) -> None:
        """Checkpoint there into checkpoint image ``ref``: the remote ctrmig pushes it
        (and resumes the container if the push fails)."""
        opts = build(CheckpointOptions, options)
        self._run("checkpoint", container, "--image", ref, *cli_args(opts),
                  timeout=self.timeout)

    def close(self) -> None:
        """Nothing to release: every call is its own ssh session."""

    # --- streaming ---------------------------------------------------------------------------

    def _stream(self, args: builtins.list[str], *, stdin: BinaryIO | None, stdout: BinaryIO | None,
                progress: Progress | None,
                before_last: Callable[[Sequence[int]], None] | None = None,
                on_ready: Callable[[], None] | None = None,
                on_running: Callable[[], None] | None = None) -> str:
        """Run a remote ctrmig with an archive flowing through stdin or stdout;
        ``before_last`` gets the ssh PID before the last piece of stdin is written (with
        no stdin, at once: the remote side goes on alone from its start); ``on_ready`` and
        ``on_running`` are called when the remote ctrmig says it is ready for stdin, and
        that its lazy-pages restore runs."""
        argv = self._argv(*args)
        child = proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.PIPE if stdin is not None else None)
        if stdin is None and before_last is not None:
            before_last([child.pid])
        errors: list[bytes] = []
        assert child.stderr is not None
        err_pipe = child.stderr

        signals = {READY_LINE.encode(): on_ready, RUNNING_LINE.encode(): on_running}

        def read_errors() -> None:
            for line in err_pipe:
                said = line.rstrip(b"\n")
                if said not in signals:
                    errors.append(line)
                elif (callback := signals[said]) is not None:
                    callback()

        reader = threading.Thread(target=read_errors, daemon=True)
        reader.start()
        answer = b""
        try:
            if stdin is not None:
                assert child.stdin is not None
                last = None if before_last is None else lambda: before_last([child.pid])
                try:
                    for chunk in pieces(stdin, last):
                        child.stdin.write(chunk)
                        if progress:
                            progress(len(chunk))
                except BrokenPipeError:
                    pass  # the remote side stopped reading: its error explains why
                child.stdin.close()
            assert child.stdout is not None
            while chunk := child.stdout.read(CHUNK):
                if stdout is not None:
                    stdout.write(chunk)
                    if progress:
                        progress(len(chunk))
                else:
                    answer += chunk
            child.wait(timeout=self.timeout)
        except BaseException:
            proc.kill_group(child)
            raise
        reader.join()
        stderr = b"".join(errors).decode(errors="replace")
        if child.returncode != 0:
            raise _remote_error(stderr, f"ctrmig {args[0]} on {self.address} failed "
                                        f"(exit {child.returncode})")
        return answer.decode(errors="replace").strip()


def _remote_error(stderr: str, what: str) -> CtrmigError:
    """The error the remote ctrmig reported, as the same class here (NameInUseError stays
    NameInUseError), with its message and hint; EngineError when it said nothing usable."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(ERROR_LINE):
            try:
                data = json.loads(line[len(ERROR_LINE):])
                cls = named(str(data["type"]))
                return cls(f"{what}: {data['message']}", hint=data.get("hint"),
                           stderr=proc.tail(stderr))
            except (ValueError, KeyError, TypeError):
                break
    return EngineError(f"{what}: {_first_error(stderr)}", stderr=proc.tail(stderr),
                       hint=_hint(stderr))


def _first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("ctrmig: error:"):
            return line.removeprefix("ctrmig: error:").strip()
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "no output"


def _hint(stderr: str | None) -> str | None:
    for line in (stderr or "").splitlines():
        if line.startswith("hint:"):
            return line.removeprefix("hint:").strip()
    if stderr and ("command not found" in stderr or "No such file" in stderr):
        return "install ctrmig on the remote host, or set CTRMIG_REMOTE_COMMAND"
    return None


def is_remote(endpoint: object) -> bool:
    """Whether ``endpoint`` (a migrator, or an address) is reached over ssh."""
    if isinstance(endpoint, RemoteMigrator):
        return True
    return isinstance(endpoint, str) and "ssh://" in endpoint


__all__ = ["RemoteMigrator", "is_remote"]
