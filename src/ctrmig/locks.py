"""The per-container lock, and what it tells others about operations under way.

One lock file per container of one engine instance (the ``scope``: a podman or docker
API address, a runc state dir), held with ``flock`` for the whole of a checkpoint or
restore. The holder writes its PID and operation into the file, so that ``ctrmig ls``
and ``ctrmig recover`` can see that a container is being checkpointed or restored even
before the engine knows it: a restore receiving its archive over ssh, say.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ctrmig import settings
from ctrmig.errors import BusyError
from ctrmig.host import proc, scratch
from ctrmig.host.files import FILE_MODE, private_dir


def lock_dir() -> Path:
    """The lock directory (a private temp one where /run is not writable)."""
    directory = settings.current().lock_dir
    try:
        return private_dir(directory)
    except OSError:
        return private_dir(scratch.base() / "ctrmig-locks")


def _prefix(engine: str, scope: str) -> str:
    if not scope:
        return f"{engine}-"
    return f"{engine}-{hashlib.sha256(scope.encode()).hexdigest()[:8]}-"


def lock_path(engine: str, container: str, scope: str = "") -> Path:
    """Where the lock of ``container`` on that engine instance lives."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", container)[:200]
    return lock_dir() / f"{_prefix(engine, scope)}{safe}.lock"


@contextlib.contextmanager
def container_lock(engine: str, container: str, scope: str = "",
                   operation: str = "busy") -> Iterator[None]:
    """Hold an exclusive lock on one container; BusyError if another ctrmig holds it.

    The lock file is removed on release. Whoever locks a file that was removed meanwhile
    (its inode is no longer the one at the path) retries, so two holders never overlap.
    """
    path = lock_path(engine, container, scope)
    while True:
        # 0600 from the start: "a+" without O_TRUNC, so a holder's file is never emptied.
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                              FILE_MODE), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise BusyError(
                f"{engine} container {container!r} is busy: another ctrmig operation holds it",
                hint="wait for it to finish, then try again",
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = -1
        if current == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # we locked a file its previous holder had already removed
    try:
        f.truncate(0)
        f.write(json.dumps({"container": container, "operation": operation,
                            "pid": os.getpid(), "start": proc.start_time(os.getpid())}))
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def operations(engine: str, scope: str = "") -> dict[str, str]:
    """Containers of that engine instance a live ctrmig holds locked: name -> operation.

    Read from the lock files alone (their holder's PID still runs, and is the same
    process), so looking never disturbs a holder.
    """
    found: dict[str, str] = {}
    for path in lock_dir().glob(f"{_prefix(engine, scope)}*.lock"):
        try:
            info = json.loads(path.read_text() or "{}")
            pid, start = int(info["pid"]), info.get("start")
            container, operation = str(info["container"]), str(info["operation"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if path.name != lock_path(engine, container, scope).name:
            continue  # another instance of the engine (a glob of "podman-" finds all)
        if proc.running(pid, start):
            found[container] = operation
    return found
