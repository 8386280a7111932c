"""Where an archive's bytes come from: a file or a stream, decrypted on the fly when it
is encrypted (age, see :mod:`ctrmig.archive.crypto`). Every reader of archives opens
them here.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

from ctrmig.archive import crypto
from ctrmig.archive.foreign import tree_stream
from ctrmig.archive.streams import CHUNK, read_into
from ctrmig.errors import ArchiveError

#: Identity files (age identities, ssh private keys) that may decrypt an archive.
Identities = Sequence[str | Path]


@contextlib.contextmanager
def plaintext(source: Path | BinaryIO, identities: Identities = ()) -> Iterator[BinaryIO]:
    """The archive's bytes (opened, if ``source`` is a path), decrypted on the fly with
    ``identities`` if it is encrypted."""
    if isinstance(source, (str, os.PathLike)):
        with open_plain(Path(source)) as f:
            if not crypto.is_encrypted(cast(io.BufferedReader, f).peek(crypto.HEAD_BYTES)):
                yield f
                return
        with crypto.decrypting(Path(source), identities) as plain:  # age reads the file
            yield plain
        return
    head = _head(source)
    stream = cast(BinaryIO, _Prefixed(head, source))
    if not crypto.is_encrypted(head):
        yield stream
        return
    with crypto.decrypting(stream, identities) as plain:
        yield plain


def _head(src: BinaryIO) -> bytes:
    """The first bytes of a stream, enough to tell whether it is encrypted."""
    head = b""
    while len(head) < crypto.HEAD_BYTES and (more := src.read(crypto.HEAD_BYTES - len(head))):
        head += more
    return head


class _Prefixed:
    """A stream whose first bytes (``head``) were already read from it."""

    def __init__(self, head: bytes, src: BinaryIO):
        self.head, self.src = head, src

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.src.read(size)
        n = len(self.head) if size < 0 else min(size, len(self.head))
        data, self.head = self.head[:n], self.head[n:]
        return data

    def readinto(self, buf: Any) -> int:
        if not self.head:
            return read_into(self.src, buf)
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def is_encrypted(path: Path) -> bool:
    """Whether the archive file at ``path`` is encrypted (age)."""
    with open_plain(path) as f:
        return crypto.is_encrypted(f.read(crypto.HEAD_BYTES))


def open_plain(path: Path) -> BinaryIO:
    """Open the archive file ``path`` as it is (no decryption), with a clear error; a
    directory (a docker checkpoint's) reads as a tar of it (:func:`.foreign.tree_stream`)."""
    if path.is_dir():
        return tree_stream(path)
    try:
        return open(path, "rb", buffering=CHUNK)
    except FileNotFoundError:
        raise ArchiveError(f"archive not found: {path}") from None
    except OSError as e:
        raise ArchiveError(f"cannot open archive {path}: {e.strerror}") from None
