"""The plain-process engine: checkpoint a process tree on this host with CRIU.

A "container" here is a process tree named by the PID of its root. ``checkpoint("1234",
...)`` runs ``criu dump -t 1234`` into a private directory and archives the images
under ``checkpoint/`` plus ``config.dump``, a JSON record of what the process depends on
outside its memory: the executable (path and sha256), argv, cwd, the regular files it
holds open or has mapped (path, size, sha256 when small enough), and how its stdio was
connected.

A process archive always needs ``allow_privileged`` (``--allow-privileged``) to restore:
it runs on the host with the uid and capabilities its CRIU images record, outside any
container (see :mod:`ctrmig.archive.privileges`).

Restore checks those facts before CRIU runs: it refuses a changed executable, a missing
file, a file whose size changed under a saved offset, and PIDs already taken (CRIU
restores a plain process under its original PIDs). Stdio that pointed outside the tree
(a pipe, a socket, a terminal) cannot come back as it was; CRIU is handed new fds for it
(``--inherit-fd``): the ones given to the constructor, else ``/dev/null`` for stdin and
a log file in ``state_dir`` for stdout/stderr; a terminal only by a terminal (the given
one, else ours, else restore refuses). A file opened for writing only that grew (or
shrank) since the checkpoint is handed back opened ``O_APPEND``, so the process goes on
writing at its end instead of over what was added (CRIU itself refuses a size change,
except for files opened ``O_WRONLY|O_APPEND``).

Limits: only the root's stdio is reconnected (a child's own pipe to the outside comes
back dangling); other connections out of the tree (a unix socket to a daemon, TCP
without ``tcp_established``) make CRIU refuse the dump, and its error is quoted. The
process must live in this host's mount and PID namespaces (containers have their
engines).

Without ``leave_running`` CRIU leaves the tree stopped until the archive is complete;
then the tree is killed and the images stay in ``state_dir/checkpoints/PID`` (as podman and
runc keep theirs), so that :meth:`ProcessMigrator.resume` can run it again here if a
migration fails later; ``remove()``, ``resume()`` or a restore of that PID drop them.

``list()`` shows only the processes this engine restored that still run, and the kept
checkpoints: listing every process of the host as a "container" would be noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, ClassVar

from ctrmig import settings
from ctrmig.archive import Archive, ArchiveWriter, ContainerRecord, Manifest
from ctrmig.engines.base import BaseMigrator
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    CommandError,
    ContainerNotFoundError,
    ImageNotFoundError,
    NameInUseError,
    OptionError,
    RestoreError,
)
from ctrmig.host import criu, proc
from ctrmig.protocol import ArchivePath, CheckpointOptions, ContainerInfo, RestoreOptions

log = logging.getLogger(__name__)

CONFIG_NAME = "config.dump"
IMAGES_DIR = "checkpoint"
CONFIG_VERSION = 1
#: Files up to this size get a sha256 in config.dump; larger ones only their size.
HASH_LIMIT = 64 << 20
#: Character-device majors of terminals: tty/console (4, 5) and Unix98 ptys (136-143).
_TTY_MAJORS = frozenset({4, 5, *range(136, 144)})
_PID_TAKEN = re.compile(r"Can't fork for \S+: File exists")
#: How long restore waits for the PIDs of a stopped or dying process to be freed (the
#: source of a same-host migration is killed just after its archive is complete).
PID_GRACE = 5.0

Stdio = int | IO[Any] | None


def _pid(container: str) -> int:
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


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (index 0 is the state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(") ", 1)[1].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_facts(path: str, *, with_hash: bool) -> dict[str, Any]:
    """Size, and sha256 when asked and the file is small enough.

    Files of size 0 get none: empty, or /proc and /sys files, whose content is made up
    on every read."""
    size = os.stat(path).st_size
    facts: dict[str, Any] = {"size": size, "sha256": None}
    if with_hash and 0 < size <= HASH_LIMIT:
        facts["sha256"] = _sha256(path)
    return facts


def _tree(root: int) -> list[int]:
    """The PIDs of ``root`` and all its descendants, root first."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        for task in _tids(pid):
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children if int(c) not in pids)
    return pids


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def _holds_locks(pids: list[int]) -> bool:
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    wanted = {str(p) for p in pids}
    return any(len(ln.split()) > 4 and ln.split()[4] in wanted for ln in lines)


def _criu_flags(config: dict[str, Any], tcp_established: bool, *, dump: bool) -> list[str]:
    """The flags dump and restore must both get (and the dump's --external list)."""
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


@dataclass(frozen=True)
class _Fd:
    """One open fd of a process in the tree, as /proc shows it."""

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


def _fds(pid: int) -> list[_Fd]:
    result = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in sorted(names, key=int):
        link = f"/proc/{pid}/fd/{name}"
        try:
            target = os.readlink(link)
            st = os.stat(link)
            info = Path(f"/proc/{pid}/fdinfo/{name}").read_text()
        except OSError:
            continue  # closed meanwhile
        m = re.search(r"^flags:\s*(\d+)", info, re.M)
        flags = int(m.group(1), 8) if m else 0
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
        result.append(_Fd(pid, int(name), target, flags, kind, key))
    return result


def _unix_inodes() -> set[str]:
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {f"socket:[{ln.split()[6]}]" for ln in lines if len(ln.split()) > 6}


def _mapped_files(pid: int, skip: set[str]) -> list[str]:
    """Paths of the regular files mapped into ``pid`` (libraries, data), minus ``skip``."""
    paths: set[str] = set()
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            paths.add(parts[5])
    return sorted(p for p in paths - skip if os.path.isfile(p))


def _fd_of(target: int | IO[Any]) -> int:
    """A private duplicate (>= 3, clear of criu's own stdio) of a caller's fd or file."""
    fd = target if isinstance(target, int) else target.fileno()
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def _external_stdio(config: dict[str, Any]) -> dict[str, set[int]]:
    """CRIU names of the stdio that led out of the tree -> the stdio fds sharing each
    (one pipe or terminal is often stdout and stderr)."""
    sharing: dict[str, set[int]] = {}
    for n, s in config["stdio"].items():
        if s["kind"] in ("pipe", "socket", "tty"):
            sharing.setdefault(s["key"], set()).add(int(n))
    return sharing


def _criu_error(e: CommandError) -> str:
    """CRIU's first real error line, else the command's own message."""
    return criu.first_error(e.stderr or "") or e.message


def _key(pid: int) -> tuple[int, int]:
    """A checkpoint in progress: its PID and the thread running it."""
    return pid, threading.get_ident()


def _own_terminal() -> int | None:
    """Our stdin, if it is a terminal."""
    return 0 if os.isatty(0) else None


class ProcessMigrator(BaseMigrator):
    """Checkpoint and restore a plain process tree (named by its root PID) with CRIU."""

    engine = "process"
    checkpoint_options: ClassVar[frozenset[str]] = frozenset({"tcp_established", "file_locks"})
    restore_options: ClassVar[frozenset[str]] = frozenset({"tcp_established", "file_locks"})

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 900.0,
        stdin: Stdio = None,
        stdout: Stdio = None,
        stderr: Stdio = None,
        state_dir: str | os.PathLike[str] | None = None,
    ):
        """``stdin``/``stdout``/``stderr`` (an fd or a file object) replace, on restore,
        stdio that was a pipe, socket or terminal; ``state_dir`` holds kept checkpoints
        and the logs and records of restored processes."""
        super().__init__(workdir=workdir, timeout=timeout)
        self.stdio: dict[int, Stdio] = {0: stdin, 1: stdout, 2: stderr}
        self.state_dir = Path(state_dir or settings.current().process_state_dir)
        self.kept_dir = self.state_dir / "checkpoints"
        # Per (PID, thread) being checkpointed: the directory of its images, and the PIDs
        # that CRIU left stopped (empty with leave_running). Keyed by thread too, so that
        # a call refused as busy never touches the checkpoint in progress.
        self._pending: dict[tuple[int, int], tuple[Path, list[int]]] = {}
        # PID -> start time of a process our checkpoint ended: remove(PID) then means that
        # process, not another one now under the same PID (the target of a same-host
        # migration, restored meanwhile by another migrator).
        self._ended: dict[int, int | None] = {}

    # --- facts about this host -------------------------------------------------------------

    def version(self) -> str:
        """CRIU's version: the process engine has no engine of its own."""
        return criu.version()

    def list(self) -> list[ContainerInfo]:
        """The processes this engine restored here that still run, and those it
        checkpointed here whose images it keeps (state "checkpointed")."""
        found: dict[int, ContainerInfo] = {}
        for path in self.kept_dir.glob("*/" + CONFIG_NAME):
            with contextlib.suppress(ArchiveError, ValueError):
                config = self._config(path.parent)
                pid = int(config["pid"])
                found[pid] = ContainerInfo(engine=self.engine, name=str(pid), id=str(pid),
                                           image=str(config["exe"]), state="checkpointed")
        for path in self.state_dir.glob("*.json"):
            data = self._record(path)
            if data is not None:
                pid = int(data["pid"])
                found[pid] = ContainerInfo(engine=self.engine, name=str(pid), id=str(pid),
                                           image=str(data.get("exe", "")), state="running")
        return [found[pid] for pid in sorted(found)]

    def exists(self, container: str) -> bool:
        """Whether a live (not zombie) process has that PID."""
        try:
            return _alive(_pid(container))
        except ContainerNotFoundError:
            return False

    def remove(self, container: str) -> None:
        """Stop a process the caller owns (SIGTERM, then SIGKILL) and drop the checkpoint
        kept of it; no error if it is gone.

        After this migrator's checkpoint ended the process, a different process now under
        that PID (e.g. the one a same-host migration restored) is left alone.
        """
        pid = _pid(container)
        if pid == 1 or pid == os.getpid():
            raise OptionError(f"refusing to stop PID {pid}", hint="it is init or ctrmig itself")
        ended = self._ended.pop(pid, -1)
        if _alive(pid) and (ended == -1 or _start_time(pid) == ended):
            proc.stop_pid(pid)
            (self.state_dir / f"{pid}.json").unlink(missing_ok=True)
        shutil.rmtree(self.kept_dir / str(pid), ignore_errors=True)

    def logs(self, container: str) -> str:
        """Output of a process whose stdout/stderr is a file, or that this engine restored
        with its stdio sent to a log file."""
        pid = _pid(container)
        paths: list[str] = []
        if _alive(pid):
            paths = [f.target for f in _fds(pid) if f.fd in (1, 2) and f.kind == "file"]
        record = self._record(self.state_dir / f"{pid}.json")
        if record and record.get("log") and record["log"] not in paths:
            paths.append(record["log"])
        if not paths:
            if not _alive(pid):
                raise ContainerNotFoundError(f"no process with PID {pid}")
            raise OptionError(
                f"logs of PID {pid} are not captured: its stdout and stderr are not files",
                hint="run it with output to a file, or read the pipe or terminal it writes to",
            )
        texts = []
        for path in dict.fromkeys(paths):
            with contextlib.suppress(FileNotFoundError):
                texts.append(Path(path).read_text(errors="replace"))
        return "".join(texts)

    def _record(self, path: Path) -> dict[str, Any] | None:
        """A restore record whose process still runs (same PID and start time), or None."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _alive(pid) or _start_time(pid) != data.get("start_time"):
            return None
        return data

    # --- checkpoint ------------------------------------------------------------------------

    def checkpoint(
        self,
        container: str,
        archive: ArchivePath | BinaryIO,
        *,
        leave_running: bool = False,
        **options: Any,
    ) -> Archive:
        """Checkpoint the tree rooted at PID ``container``.

        Without ``leave_running`` CRIU leaves the tree stopped; it is killed only once the
        archive is complete (its images are then kept for :meth:`resume`), and let run on
        if anything fails before that.
        """
        pid = _pid(container)
        try:
            result = super().checkpoint(container, archive, leave_running=leave_running,
                                        **options)
        except BaseException:
            self._abort(pid)
            raise
        self._commit(pid)
        return result

    def _describe(self, container: str) -> ContainerRecord:
        pid = _pid(container)
        if not _alive(pid):
            raise ContainerNotFoundError(f"no running process with PID {pid}")
        if pid == 1 or pid == os.getpid():
            raise OptionError(f"refusing to checkpoint PID {pid}", hint="init or ctrmig itself")
        for ns in ("mnt", "pid"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                    raise CheckpointError(
                        f"PID {pid} runs in another {ns} namespace (a container?)",
                        hint="checkpoint containers with their engine (podman, docker, runc)",
                    )
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError as e:
            raise CheckpointError(f"cannot inspect PID {pid}: {e.strerror}",
                                  hint="kernel threads cannot be checkpointed") from None
        if exe.endswith(" (deleted)"):
            raise CheckpointError(
                f"the executable of PID {pid} was deleted or replaced: {exe}",
                hint="restart the process from the current file, then checkpoint it",
            )
        return ContainerRecord(
            name=str(pid), id=str(pid), image=exe, image_id=f"sha256:{_sha256(exe)}",
            command=[a.decode(errors="replace") for a in argv if a],
        )

    def _facts(self, pid: int, opts: CheckpointOptions) -> dict[str, Any]:
        """What config.dump records, gathered from /proc while the tree runs."""
        pids = _tree(pid)
        fields = _stat_fields(pid) or []
        pgid, sid, tty_nr = (int(fields[i]) for i in (2, 3, 4))
        fds = [fd for p in pids for fd in _fds(p)]
        stdio = {fd.fd: fd for fd in fds if fd.pid == pid and fd.fd in (0, 1, 2)}
        has_tty = tty_nr != 0 or any(fd.kind == "tty" for fd in fds)
        unix = _unix_inodes()
        locked = _holds_locks(pids)
        files: dict[str, dict[str, Any]] = {}
        for fd in fds:
            if fd.kind != "file":
                continue
            entry = files.setdefault(fd.target, {"path": fd.target, "access": fd.access,
                                                 "append": fd.append, "fds": []})
            if entry["access"] != fd.access:
                entry["access"] = "rw"
            entry["append"] = entry["append"] and fd.append
            entry["fds"].append(f"{fd.pid}:{fd.fd}")
        return {
            "version": CONFIG_VERSION,
            "pid": pid,
            "tree": {"pids": pids, "tids": sorted({t for p in pids for t in _tids(p)})},
            "exe": os.readlink(f"/proc/{pid}/exe"),
            "cwd": os.readlink(f"/proc/{pid}/cwd"),
            "argv": [a.decode(errors="replace")
                     for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a],
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
            "deleted_files": sorted({fd.target for fd in fds if fd.kind == "deleted"}),
            "mapped": [{"path": p} for p in _mapped_files(pid, {os.readlink(f"/proc/{pid}/exe")})],
        }

    def _dump(
        self, record: ContainerRecord, opts: CheckpointOptions, writer: ArchiveWriter
    ) -> dict[str, Any]:
        pid = _pid(record.name)
        config = self._facts(pid, opts)
        self.kept_dir.mkdir(parents=True, exist_ok=True)
        keep = Path(tempfile.mkdtemp(prefix=f".{pid}-", dir=self.kept_dir))
        self._pending[_key(pid)] = (keep, [])
        images = keep / IMAGES_DIR
        images.mkdir()
        with tempfile.TemporaryDirectory(prefix="ctrmig-process-", dir=self.workdir) as work:
            argv = ["criu", "dump", "-t", str(pid), "-D", str(images), "-W", work,
                    "-o", "dump.log", "-v4",
                    "--leave-running" if opts.leave_running else "--leave-stopped"]
            argv += _criu_flags(config, opts.tcp_established, dump=True)
            try:
                proc.run(argv, timeout=self.timeout, log_file=Path(work, "dump.log"),
                         what=f"criu dump of PID {pid}")
            except CommandError as e:
                state = "left running" if _alive(pid) else "gone (it died meanwhile)"
                raise CheckpointError(
                    f"checkpoint of PID {pid} failed: {_criu_error(e)}", stderr=e.stderr,
                    hint=f"the process is {state}; see the CRIU log lines in stderr",
                ) from e
        if not opts.leave_running:
            self._pending[_key(pid)] = (keep, config["tree"]["pids"])
        self._hash_files(config)  # the tree is stopped (or runs on): sizes as dumped
        (keep / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        writer.add_tree(images, IMAGES_DIR)
        writer.add_file(CONFIG_NAME, keep / CONFIG_NAME)
        return {
            "pid": pid,
            "exe": config["exe"],
            "exe_sha256": config["exe_sha256"],
            "argv": config["argv"],
            "cwd": config["cwd"],
            "shell_job": config["shell_job"],
            "stdio": {n: s["kind"] if s["kind"] != "file" else f"file {s['target']}"
                      for n, s in config["stdio"].items()},
            "files": [f["path"] for f in config["files"]],
        }

    @staticmethod
    def _hash_files(config: dict[str, Any]) -> None:
        """Add size/sha256 to the exe and files: sha256 only for what is read, not written."""
        config["exe_sha256"] = _sha256(config["exe"])
        config["exe_size"] = os.stat(config["exe"]).st_size
        for entry in config["files"]:
            with contextlib.suppress(OSError):
                entry.update(_file_facts(entry["path"], with_hash=entry["access"] == "r"))
        for entry in config["mapped"]:
            with contextlib.suppress(OSError):
                entry.update(_file_facts(entry["path"], with_hash=True))

    def _abort(self, pid: int) -> None:
        """After a failed checkpoint: let the tree CRIU left stopped run on; drop images."""
        keep, stopped = self._pending.pop(_key(pid), (None, []))
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)

    def _rollback_checkpoint(self, record: ContainerRecord, opts: CheckpointOptions) -> None:
        self._abort(_pid(record.name))

    def _commit(self, pid: int) -> None:
        """The archive is complete: end the stopped tree, as a plain ``criu dump`` would,
        and keep its images for resume() (none are kept with leave_running)."""
        pending = self._pending.pop(_key(pid), None)
        if pending is None:
            return
        keep, stopped = pending
        if not stopped:
            shutil.rmtree(keep, ignore_errors=True)
            return
        self._ended[pid] = _start_time(pid)
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while any(_alive(p) for p in stopped) and time.monotonic() < deadline:
            time.sleep(0.02)
        kept = self.kept_dir / str(pid)
        shutil.rmtree(kept, ignore_errors=True)
        keep.rename(kept)

    def resume(self, container: str) -> None:
        """Run a checkpointed process again here, from the images its checkpoint kept
        (the rollback of a failed migration)."""
        pid = _pid(container)
        kept = self.kept_dir / str(pid)
        if not (kept / IMAGES_DIR / "inventory.img").is_file():
            raise CheckpointError(f"no checkpoint of PID {pid} is kept here",
                                  hint="restore it from its archive instead")
        with self._lock(str(pid), "restoring"):
            config = self._config(kept)
            self._check_config(config)
            self._criu_restore(kept, config, tcp_established=False)

    # --- restore ---------------------------------------------------------------------------

    def _check_name_free(self, name: str) -> None:
        # The name is the PID, checked with the archive's whole PID list in _check_archive.
        pass

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)
        config = self._config(source)
        pid = int(config["pid"])
        if opts.name is not None and opts.name != str(pid):
            raise OptionError(
                f"a plain process is restored under its original PID {pid}, not {opts.name!r}",
                hint=f"omit the name, or pass {pid}",
            )
        self._check_config(config)

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse, before CRIU runs, what would make the restore fail or go wrong."""
        pid = int(config["pid"])
        self._check_exe(config)
        cwd = config["cwd"]
        if not os.path.isdir(cwd):
            raise RestoreError(f"the working directory of PID {pid} is missing: {cwd}",
                               hint="create it on this host, then restore")
        for entry in config["files"]:
            self._check_file(pid, entry)
        for entry in config["mapped"]:
            self._check_file(pid, {**entry, "access": "r", "append": False}, what="mapped file")
        self._check_stdio(config)
        self._check_pids_free(config)

    def _check_stdio(self, config: dict[str, Any]) -> None:
        """A terminal can only be replaced by a terminal: refuse if there is none to give."""
        for key, numbers in _external_stdio(config).items():
            given = [n for n in numbers if self.stdio[n] is not None]
            if key.startswith("tty[") and not given and _own_terminal() is None:
                raise OptionError(
                    f"the stdio of PID {config['pid']} was a terminal, and there is no "
                    "terminal to restore it onto",
                    hint="run the restore from a terminal, or give the process engine "
                         "a pty as stdin/stdout/stderr",
                )

    def _config(self, source: Path) -> dict[str, Any]:
        try:
            config: dict[str, Any] = json.loads((source / CONFIG_NAME).read_text())
        except FileNotFoundError:
            raise ArchiveError(f"the archive has no {CONFIG_NAME}",
                               hint="it was not written by the process engine") from None
        except ValueError as e:
            raise ArchiveError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
        if config.get("version") != CONFIG_VERSION:
            raise ArchiveError(f"unsupported {CONFIG_NAME} version {config.get('version')!r}",
                               hint="upgrade ctrmig")
        return config

    @staticmethod
    def _check_exe(config: dict[str, Any]) -> None:
        exe = config["exe"]
        if not os.path.isfile(exe):
            raise ImageNotFoundError(
                f"the executable of PID {config['pid']} is missing on this host: {exe}",
                hint="install the same program at the same path, then restore",
            )
        digest = _sha256(exe)
        if digest != config["exe_sha256"]:
            raise RestoreError(
                f"the executable {exe} differs from the checkpointed one "
                f"(sha256 {digest[:12]}... here, {config['exe_sha256'][:12]}... in the archive)",
                hint="restore needs the very same binary: install that version of the program",
            )

    @staticmethod
    def _check_file(pid: int, entry: dict[str, Any], what: str = "file") -> None:
        path = entry["path"]
        if path.startswith("/proc/"):
            return  # e.g. its own /proc/PID/stat: there once it runs again (CRIU sees to it)
        if not os.path.isfile(path):
            hint = ("it was open for writing only: create it (e.g. touch it) to let the "
                    "process write to a fresh file" if entry["access"] == "w"
                    else "copy it to this host at the same path, then restore")
            raise RestoreError(f"a {what} PID {pid} held open is missing: {path}", hint=hint)
        size = os.stat(path).st_size
        if entry.get("sha256") and entry["access"] == "r" and size <= HASH_LIMIT:
            if _sha256(path) != entry["sha256"]:
                raise RestoreError(f"the {what} {path} changed since the checkpoint",
                                   hint="restore needs the same content it had then")
        elif entry.get("size") is not None and size != entry["size"] and entry["access"] != "w":
            raise RestoreError(
                f"the {what} {path} changed size since the checkpoint "
                f"({entry['size']} -> {size} bytes); CRIU resumes it at its saved offset",
                hint="restore needs the file as it was",
            )

    @staticmethod
    def _check_pids_free(config: dict[str, Any]) -> None:
        tree = config["tree"]
        wanted = [int(n) for n in [*tree["pids"], *tree["tids"]]]
        deadline = time.monotonic() + PID_GRACE
        while True:
            taken = {n: f[0] for n in wanted if (f := _stat_fields(n)) is not None}
            # A stopped or dead holder may be a checkpointed source on its way out.
            if not taken or any(st not in "TtZX" for st in taken.values()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for n, st in taken.items():
            state = {"Z": "a zombie not yet reaped by its parent", "T": "stopped",
                     "t": "stopped"}.get(st, "running")
            raise NameInUseError(
                f"PID {n}, which the checkpointed process needs, is taken ({state})",
                hint="a plain process is restored under its original PIDs: if the source "
                     "still runs, stop it first (or checkpoint without --leave-running); "
                     "else restore on another host",
            )

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        return self._criu_restore(source, self._config(source), opts.tcp_established)

    def _criu_restore(self, source: Path, config: dict[str, Any], tcp_established: bool) -> str:
        """``criu restore -d`` from ``source`` (an extracted archive or a kept checkpoint)."""
        pid = int(config["pid"])
        with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(
            prefix="ctrmig-process-", dir=self.workdir
        ) as work:
            inherit, logfile = self._inherited_fds(config, stack)
            argv = ["criu", "restore", "-d", "-D", str(source / IMAGES_DIR), "-W", work,
                    "-o", "restore.log", "-v4", "--pidfile", str(Path(work, "pidfile"))]
            argv += _criu_flags(config, tcp_established or config["tcp_established"], dump=False)
            for key, fd in inherit.items():
                argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
            try:
                proc.run(argv, timeout=self.timeout, pass_fds=list(inherit.values()),
                         log_file=Path(work, "restore.log"), what=f"criu restore of PID {pid}")
            except CommandError as e:
                if _PID_TAKEN.search(e.stderr or ""):
                    raise NameInUseError(
                        f"PID {pid} (or a PID of its tree) is taken: Can't fork for PID",
                        hint="the source process may still run: stop it first, or restore "
                             "on another host", stderr=e.stderr,
                    ) from e
                raise RestoreError(f"restore of PID {pid} failed: {_criu_error(e)}",
                                   stderr=e.stderr, hint="see the CRIU log lines in stderr") from e
            restored = int(Path(work, "pidfile").read_text().strip())
        self._write_record(restored, config, logfile)
        # It runs again: a checkpoint kept of it here must not run it a second time.
        shutil.rmtree(self.kept_dir / str(pid), ignore_errors=True)
        self._ended.pop(pid, None)
        return str(restored)

    def _inherited_fds(
        self, config: dict[str, Any], stack: contextlib.ExitStack
    ) -> tuple[dict[str, int], str | None]:
        """CRIU resource name -> fd to hand it, for stdio and for files that changed size."""
        inherit: dict[str, int] = {}
        logfile = None
        for key, numbers in _external_stdio(config).items():
            given = next((self.stdio[n] for n in (1, 2, 0)
                          if n in numbers and self.stdio[n] is not None), None)
            if given is None and key.startswith("tty["):
                given = _own_terminal()  # what criu --shell-job itself would use
            if given is not None:
                fd = _fd_of(given)
            elif numbers == {0}:
                fd = os.open(os.devnull, os.O_RDONLY)
            else:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                logfile = str(self.state_dir / f"{config['pid']}.log")
                fd = os.open(logfile, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            stack.callback(os.close, fd)
            inherit[key] = fd
        for entry in config["files"]:
            if entry["access"] != "w" or entry["append"] or entry.get("size") is None:
                continue
            if os.stat(entry["path"]).st_size != entry["size"]:
                log.info("%s changed size since the checkpoint: reopened O_APPEND",
                         entry["path"])
                fd = os.open(entry["path"], os.O_WRONLY | os.O_APPEND)
                stack.callback(os.close, fd)
                inherit[entry["path"].lstrip("/")] = fd
        return inherit, logfile

    def _write_record(self, pid: int, config: dict[str, Any], logfile: str | None) -> None:
        """Remember a restored process for list() and logs()."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            record = {"pid": pid, "start_time": _start_time(pid), "exe": config["exe"],
                      "argv": config["argv"], "log": logfile, "restored": time.time()}
            path = self.state_dir / f"{pid}.json"
            path.with_suffix(".tmp").write_text(json.dumps(record))
            path.with_suffix(".tmp").replace(path)
        except OSError as e:  # the process runs; a missing record only hides it from list()
            log.warning("cannot record restored PID %d in %s: %s", pid, self.state_dir, e)

