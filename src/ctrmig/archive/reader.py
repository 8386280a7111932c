"""Read checkpoint archives safely.

An archive is executable state from another machine, so reading is defensive by
construction: only regular files and directories with plain relative names are accepted,
no name twice, a bounded number of members and bytes, every member's size and sha256
checked against manifest.yaml, and extraction only into a fresh private directory that is
removed again on any error. Compression (none, gzip, zstd) is detected from magic bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

import zstandard

from ctrmig.archive.manifest import MANIFEST_NAME, FileEntry, Manifest
from ctrmig.archive.writer import CHUNK, Compression, Progress
from ctrmig.errors import (
    ArchiveCorruptError,
    ArchiveError,
    ChecksumError,
    ManifestError,
    UnsafeArchiveError,
)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_MANIFEST_BYTES = 4 << 20
# What a broken tar or compression stream raises while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile,
                OSError)


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile archive from exhausting the host."""

    max_members: int = 100_000
    max_total_bytes: int = 256 << 30
    # Space to leave free on the extraction filesystem.
    min_free_bytes: int = 256 << 20


DEFAULT_LIMITS = Limits()


def detect_compression(head: bytes) -> Compression:
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"


def decompressed(raw: BinaryIO) -> tuple[BinaryIO, Compression]:
    buffered: Any = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    head = buffered.peek(4)[:4]
    kind = detect_compression(head)
    if kind == "zstd":
        dctx = zstandard.ZstdDecompressor()
        return cast(BinaryIO, dctx.stream_reader(buffered, read_across_frames=True)), kind
    if kind == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=buffered, mode="rb")), kind
    return buffered, kind


def safe_name(name: str) -> str:
    """Return the normalised member name, or raise UnsafeArchiveError."""
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"archive member has an invalid name: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive member has an absolute path: {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member escapes with '..': {name!r}")
    return "/".join(parts)


class _Scan:
    """One pass over an archive's members, checked as they come."""

    def __init__(self, raw: BinaryIO, limits: Limits, progress: Progress | None):
        self.limits, self.progress = limits, progress
        self.stream, self.compression = decompressed(raw)
        self.seen: dict[str, FileEntry] = {}
        self.dirs: set[str] = set()
        self.manifest: Manifest | None = None
        self.total = 0

    def members(self) -> Iterator[tuple[str, tarfile.TarInfo, BinaryIO | None]]:
        """Yield (name, info, data) for files and directories; data is None for dirs."""
        try:
            tar = tarfile.open(fileobj=self.stream, mode="r|", bufsize=CHUNK)
        except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError, zlib.error) as e:
            raise ArchiveCorruptError(f"not a readable tar archive: {e}") from None
        count = 0
        try:
            for info in tar:
                count += 1
                if count > self.limits.max_members:
                    raise UnsafeArchiveError(
                        f"archive has more than {self.limits.max_members} members"
                    )
                if self.manifest is not None:
                    raise UnsafeArchiveError(f"member {info.name!r} follows manifest.yaml")
                name = safe_name(info.name)
                if not name:
                    continue  # the archive's root directory entry
                if name in self.seen or name in self.dirs:
                    raise UnsafeArchiveError(f"archive member {name!r} appears twice")
                if info.isdir():
                    self.dirs.add(name)
                    yield name, info, None
                    continue
                if not info.isfile():
                    kind = _kind(info)
                    raise UnsafeArchiveError(f"archive member {name!r} is a {kind}; refused")
                self.total += info.size
                if self.total > self.limits.max_total_bytes:
                    raise UnsafeArchiveError(
                        f"archive expands past {self.limits.max_total_bytes} bytes"
                    )
                data = tar.extractfile(info)
                assert data is not None
                if name == MANIFEST_NAME:
                    self.manifest = self._read_manifest(info, cast(BinaryIO, data))
                    continue
                yield name, info, cast(BinaryIO, data)
        except _READ_ERRORS as e:
            raise ArchiveCorruptError(f"archive is corrupt or truncated: {e}") from None

    def _read_manifest(self, info: tarfile.TarInfo, data: BinaryIO) -> Manifest:
        if info.size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest.yaml is implausibly large ({info.size} bytes)")
        text = data.read()
        if len(text) != info.size:
            raise ArchiveCorruptError("archive is truncated inside manifest.yaml")
        return Manifest.from_yaml(text)

    def hash_into(self, name: str, info: tarfile.TarInfo, data: BinaryIO,
                  sink: Callable[[bytes], object] | None) -> None:
        sha, got = hashlib.sha256(), 0
        while True:
            try:
                chunk = data.read(CHUNK)
            except _READ_ERRORS as e:
                raise ArchiveCorruptError(
                    f"archive is corrupt or truncated in {name!r}: {e}"
                ) from None
            if not chunk:
                break
            sha.update(chunk)
            got += len(chunk)
            if sink is not None:
                sink(chunk)
            if self.progress:
                self.progress(len(chunk))
        if got != info.size:
            raise ArchiveCorruptError(f"archive is truncated inside {name!r}")
        self.seen[name] = FileEntry(size=got, sha256=sha.hexdigest())

    def check(self) -> Manifest:
        """Compare what was read with the manifest; return the manifest."""
        if self.manifest is None:
            raise ManifestError(
                "archive has no manifest.yaml",
                hint="it was not written by ctrmig, or it is truncated",
            )
        want, got = self.manifest.files, self.seen
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing:
            raise ChecksumError(f"archive lacks files listed in the manifest: {missing[:5]}")
        if extra:
            raise UnsafeArchiveError(f"archive holds files the manifest does not list: {extra[:5]}")
        for name, entry in want.items():
            if got[name].size != entry.size:
                raise ChecksumError(
                    f"{name}: size {got[name].size} differs from the manifest's {entry.size}"
                )
            if got[name].sha256 != entry.sha256:
                raise ChecksumError(
                    f"{name}: sha256 differs from the manifest; archive tampered or corrupt"
                )
        return self.manifest


@contextlib.contextmanager
def _open(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb", buffering=CHUNK)
        except FileNotFoundError:
            raise ArchiveError(f"archive not found: {source}") from None
        except OSError as e:
            raise ArchiveError(f"cannot open archive {source}: {e.strerror}") from None
        with f:
            yield f
    else:
        yield source


def verify(
    source: Path | BinaryIO, *, limits: Limits = DEFAULT_LIMITS, progress: Progress | None = None
) -> Manifest:
    """Read the whole archive, check every member against the manifest, return it."""
    with _open(source) as raw:
        scan = _Scan(raw, limits, progress)
        for name, info, data in scan.members():
            if data is not None:
                scan.hash_into(name, info, data, None)
        return scan.check()


def read_manifest(source: Path | BinaryIO, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Return the manifest without verifying checksums (fast on uncompressed archives)."""
    if isinstance(source, (str, os.PathLike)):
        with _open(source) as raw:
            head = raw.read(4)
        if detect_compression(head) == "none":
            return _read_manifest_seeking(Path(source))
    return verify(source, limits=limits)


def _read_manifest_seeking(path: Path) -> Manifest:
    # An uncompressed tar can be walked header by header, seeking over the data.
    try:
        with tarfile.open(path, mode="r:") as tar:
            info = None
            for member in tar:
                info = member
            if info is None or info.name != MANIFEST_NAME or not info.isfile():
                raise ManifestError(
                    "archive has no manifest.yaml at its end",
                    hint="it was not written by ctrmig, or it is truncated",
                )
            if info.size > MAX_MANIFEST_BYTES:
                raise ManifestError("manifest.yaml is implausibly large")
            data = tar.extractfile(info)
            assert data is not None
            return Manifest.from_yaml(data.read())
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveCorruptError(f"not a readable tar archive: {e}") from None


def extract(
    source: Path | BinaryIO,
    dest: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> Manifest:
    """Extract into the empty directory ``dest`` and verify; raise on anything unsafe.

    Files are created with O_EXCL and O_NOFOLLOW below ``dest`` only; directories are
    created as needed. On error the caller removes ``dest`` (see :func:`extracted`).
    """
    dest = dest.resolve()
    free = shutil.disk_usage(dest).free - limits.min_free_bytes
    limits = Limits(limits.max_members, min(limits.max_total_bytes, max(free, 0)),
                    limits.min_free_bytes)
    with _open(source) as raw:
        scan = _Scan(raw, limits, progress)
        for name, info, data in scan.members():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                target.mkdir(exist_ok=True)
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600 | (info.mode & 0o755))
            with os.fdopen(fd, "wb") as out:
                scan.hash_into(name, info, data, out.write)
        return scan.check()


def copy_member(source: Path, name: str, out: Path) -> None:
    """Copy one member of an already verified archive into the file ``out``."""
    with _open(source) as raw:
        scan = _Scan(raw, DEFAULT_LIMITS, None)
        for member, info, data in scan.members():
            if member == name and data is not None:
                with out.open("wb") as f:
                    scan.hash_into(member, info, data, f.write)
                return
    raise ArchiveError(f"archive has no member {name!r}")


@contextlib.contextmanager
def extracted(
    source: Path | BinaryIO,
    *,
    workdir: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> Iterator[tuple[Path, Manifest]]:
    """Extract and verify into a private temporary directory, removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="ctrmig-archive-", dir=workdir))
    try:
        os.chmod(tmp, 0o700)
        manifest = extract(source, tmp, limits=limits, progress=progress)
        yield tmp, manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symlink to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device node"
    if info.isfifo():
        return "fifo"
    return f"member of tar type {info.type!r}"
