"""Files and directories that only their owner may read, made so from the start.

A checkpoint holds a container's whole memory (its keys, tokens, passwords), and ctrmig's
state, journals, logs and spools describe or hold the same: everything ctrmig creates is
``0600`` (files) or ``0700`` (directories) when it is created, whatever the umask (a umask
can only take bits away), never chmod'ed afterwards: there is no moment in which another
user could open it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, cast

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents as ``0700`` directories (existing ones are
    left as they are); return it."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another ctrmig
            os.mkdir(directory, DIR_MODE)
    return path


def open_private(path: Path, *, append: bool = False, exclusive: bool = False) -> BinaryIO:
    """Open ``path`` for binary writing, created ``0600`` if it does not exist (truncated
    unless ``append``; ``exclusive``: it must not exist). A symlink at ``path`` is refused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    if exclusive:
        flags |= os.O_EXCL
    fd = os.open(path, flags, FILE_MODE)
    return cast(BinaryIO, os.fdopen(fd, "ab" if append else "wb"))


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` into ``path``, created ``0600``."""
    with open_private(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
