"""Verified archive files: an archive as a plaintext file (for engines that import the
file themselves), and members read again from such a file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from ctrmig.archive.manifest import Manifest
from ctrmig.archive.reader import DEFAULT_LIMITS, MAX_MANIFEST_BYTES, _Scan, verify
from ctrmig.archive.sources import Identities, is_encrypted, plaintext
from ctrmig.archive.streams import CHUNK, Progress, read_into
from ctrmig.errors import ArchiveError, ChecksumError
from ctrmig.host.files import open_private


@contextlib.contextmanager
def spooled(
    source: Path | BinaryIO,
    *,
    workdir: Path | None = None,
    progress: Progress | None = None,
    identities: Identities = (),
    trusted_keys: str | Path | None = None,
) -> Iterator[tuple[Path, Manifest]]:
    """The archive as a verified plaintext file, and its manifest: a plain file as it is;
    a stream, or an encrypted file, verified (and decrypted) while it is saved to a
    private temp file (0600), removed on exit. One pass, hashing while it arrives."""
    if isinstance(source, (str, os.PathLike)) and not is_encrypted(Path(source)):
        yield Path(source), verify(Path(source), progress=progress, trusted_keys=trusted_keys)
        return
    fd, name = tempfile.mkstemp(prefix="ctrmig-spool-", suffix=".tar", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as out, plaintext(source, identities) as plain:
            manifest = verify(cast(BinaryIO, _Tee(plain, out)), progress=progress,
                              trusted_keys=trusted_keys)
            shutil.copyfileobj(plain, out, CHUNK)  # any zero padding after the end
        yield Path(name), manifest
    finally:
        os.unlink(name)


class _Tee:
    """A read stream that also writes what it reads to ``copy``."""

    def __init__(self, src: BinaryIO, copy: BinaryIO):
        self.src, self.copy = src, copy

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.copy.write(data)
        return data

    def readinto(self, buf: Any) -> int:
        n = read_into(self.src, buf)
        self.copy.write(memoryview(buf)[:n])
        return n


def copy_member(source: Path, name: str, out: Path) -> None:
    """Copy one member of an already verified archive into the file ``out``."""
    with plaintext(source) as raw:
        scan = _Scan(raw, DEFAULT_LIMITS, None)
        for member, info, data in scan.members():
            if member == name and data is not None:
                with open_private(out) as f:
                    scan.hash_into(member, info, data, f.write)
                return
    raise ArchiveError(f"archive has no member {name!r}")


def read_members(
    source: Path, manifest: Manifest, names: Iterable[str], *, max_bytes: int = MAX_MANIFEST_BYTES
) -> dict[str, bytes]:
    """The contents of small members of a verified archive, each checked against
    ``manifest`` again (the file may have changed since it was verified).

    Names the manifest does not list are left out; the scan stops once all are read.
    """
    wanted = {n for n in names if n in manifest.files}
    for name in sorted(wanted):
        if manifest.files[name].size > max_bytes:
            raise ArchiveError(f"{name} is implausibly large ({manifest.files[name].size} bytes)")
    found: dict[str, bytes] = {}
    if not wanted:
        return found
    with plaintext(source) as raw:
        scan = _Scan(raw, DEFAULT_LIMITS, None)
        for member, info, data in scan.members():
            if member in wanted and data is not None:
                chunks: list[bytes] = []
                scan.hash_into(member, info, data, chunks.append)
                if scan.seen[member] != manifest.files[member]:
                    raise ChecksumError(f"{member} changed since the archive was verified")
                found[member] = b"".join(chunks)
                if len(found) == len(wanted):
                    return found
    raise ChecksumError(f"archive lacks {sorted(wanted - set(found))} since it was verified")
