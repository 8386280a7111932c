"""Read checkpoint archives safely.

An archive is executable state from another machine, so reading is defensive by
construction: only regular files and directories with plain relative names are accepted,
no name twice, a bounded number of members and bytes, every member's size and sha256
checked against manifest.yaml, and extraction only into a fresh private directory that is
removed again on any error. Compression (none, gzip, zstd) is detected from magic bytes.

What is refused, and as what (every error is an :class:`ArchiveError`):

* UnsafeArchiveError: absolute names, ``..``, NUL or backslash in a name, names too long;
  symlinks, hard links, devices, fifos, sparse members, pax global headers; a name twice,
  a file below a file; a directory entry carrying data; extended headers (pax, GNU long
  names) over 1 MiB; more than ``Limits.max_members`` members or ``max_total_bytes``
  bytes; a decompression bomb (see :class:`Limits`); any member after manifest.yaml,
  and any non-zero data after the end of the tar.
* ArchiveCorruptError: not a tar, broken compression, truncation, malformed headers.
* ManifestError: no manifest.yaml, not YAML (``yaml.safe_load`` only), YAML anchors or
  nesting deeper than 32, or not the schema.
* ChecksumError: a member's size or sha256 differs from the manifest (a member bigger
  than its entry is read to the end, within the caps, then refused), or a listed member
  is missing.
* EncryptedArchiveError: an age-encrypted archive (decrypted on the fly with the
  ``identities`` given, see :mod:`ctrmig.archive.crypto`) that none of them opens.
* SignatureError (with ``trusted_keys``): no signature, a signer not trusted, or a
  manifest that differs from what was signed. The signature, over the manifest's bytes as
  stored, is the one member allowed after manifest.yaml.

Each member's size is only known to be right once the manifest, the last member, is read:
until then the total cap and free disk space bound what a hostile archive can write.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

import yaml
import zstandard

from ctrmig.archive import crypto, foreign
from ctrmig.archive.layout import MANIFEST_NAME, SIGNATURE_NAME
from ctrmig.archive.manifest import FileEntry, Manifest
from ctrmig.archive.sources import Identities, open_plain, plaintext
from ctrmig.archive.streams import CHUNK, ForwardOnly, Progress, read_into
from ctrmig.archive.writer import Compression
from ctrmig.errors import (
    ArchiveCorruptError,
    ArchiveError,
    ChecksumError,
    ManifestError,
    NoManifestError,
    SignatureError,
    UnsafeArchiveError,
)
from ctrmig.host.files import private_dir

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_MANIFEST_BYTES = 4 << 20
MAX_YAML_DEPTH = 32
MAX_EXTENDED_HEADER_BYTES = 1 << 20
MAX_NAME_CHARS = 1024
MAX_NAME_PART_BYTES = 255
# What a broken tar or compression stream raises while being read. tarfile lets some
# malformed headers through as ValueError (pax sparse maps, numbers), and chained extended
# headers recurse.
_READ_ERRORS = (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile,
                OSError, ValueError, RecursionError)
_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                   tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile archive from exhausting the host.

    The decompression-bomb guard: once a compressed archive has expanded past
    ``ratio_after_bytes``, it must not have expanded more than ``max_ratio`` times the
    compressed bytes read so far. It only starts past several GiB because real checkpoints
    can compress extremely well: memory that was written but is all zeros compresses about
    32000:1 with zstd (CRIU skips pages never touched, not touched zero pages), so a ratio
    alone cannot tell a bomb from an idle heap; but a multi-GiB archive that is nearly all
    zeros is rare and worth a refusal that names the fix. ``max_ratio=0`` disables the
    guard; gzip cannot go past about 1030:1, so this mainly catches zstd. Beyond it,
    ``max_total_bytes`` and (when extracting) the free disk space bound every archive.
    """

    max_members: int = 100_000
    max_total_bytes: int = 256 << 30
    # Space to leave free on the extraction filesystem.
    min_free_bytes: int = 256 << 20
    max_ratio: float = 1000.0
    ratio_after_bytes: int = 8 << 30


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
        raise UnsafeArchiveError(f"archive member has an invalid name: {name[:200]!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive member has an absolute path: {name[:200]!r}")
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member escapes with '..': {name[:200]!r}")
    if len(name) > MAX_NAME_CHARS or any(
        len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_PART_BYTES for p in parts
    ):
        raise UnsafeArchiveError(f"archive member name is too long: {name[:100]!r}...")
    return "/".join(parts)


class _SafeTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses what must not even be parsed, before tarfile reads it.

    tarfile reads an extended header's whole body into memory, walks GNU sparse maps of
    any length and applies pax global headers to every later member: all refused here.
    """

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise ArchiveCorruptError(f"tar header of {self.name[:200]!r} has a negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchiveError(f"archive member {self.name[:200]!r} is sparse; refused")
        if self.type == tarfile.XGLTYPE:
            raise UnsafeArchiveError("archive has a pax global header; refused")
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise UnsafeArchiveError(
                f"archive has an extended tar header of {self.size} bytes; refused"
            )
        return cast(tarfile.TarInfo, super()._proc_member(tar))  # type: ignore[misc]


class _Counting(io.RawIOBase):
    """Counts the (compressed) bytes read from ``raw``, for the bomb guard."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = read_into(self.raw, buf)
        self.count += n
        return n


class _MemberData:
    """A regular member's data, read straight from the archive stream: tarfile's own
    member file copies every chunk twice more (extracting 1 GiB: ~1 s of CPU, measured).
    A stream that ends early just reads short; the caller checks the size."""

    def __init__(self, stream: ForwardOnly, info: tarfile.TarInfo):
        stream.seek(info.offset_data)
        self.stream, self.left = stream, info.size

    def read(self, size: int = -1) -> bytes:
        n = self.left if size < 0 else min(size, self.left)
        data = self.stream.read(n) if n > 0 else b""
        self.left -= len(data)
        return data


class _Scan:
    """One pass over an archive's members, checked as they come."""

    def __init__(self, raw: BinaryIO, limits: Limits, progress: Progress | None):
        self.limits, self.progress = limits, progress
        self.counting = _Counting(raw)
        self.stream, self.compression = decompressed(io.BufferedReader(self.counting, CHUNK))
        self.names: set[str] = set()
        self.parents: set[str] = set()
        self.seen: dict[str, FileEntry] = {}
        self.kept: dict[str, bytes] = {}  # foreign.KEPT members, for a manifest if none
        self.dirs: set[str] = set()
        self.manifest: Manifest | None = None
        self.manifest_bytes = b""
        self.signature: bytes | None = None
        self.total = 0
        self.expanded = 0

    def members(self) -> Iterator[tuple[str, tarfile.TarInfo, BinaryIO | None]]:
        """Yield (name, info, data) for files and directories; data is None for dirs."""
        stream = ForwardOnly(self.stream)
        try:
            tar = tarfile.open(fileobj=cast(BinaryIO, stream), mode="r:", tarinfo=_SafeTarInfo)
        except _READ_ERRORS as e:
            raise ArchiveCorruptError(f"not a readable tar archive: {e}",
                                      hint=foreign.EXPECTED) from None
        count = 0
        try:
            for info in tar:
                count += 1
                if count > self.limits.max_members:
                    raise UnsafeArchiveError(
                        f"archive has more than {self.limits.max_members} members"
                    )
                if self.manifest is not None:
                    if self._is_signature(info):
                        self.signature = self._read_small(info, _MemberData(stream, info))
                        continue
                    raise UnsafeArchiveError(
                        f"member {info.name[:200]!r} follows manifest.yaml"
                    )
                name = self._check_member(info)
                if not name:
                    continue  # the archive's root directory entry
                if info.isdir():
                    self.dirs.add(name)
                    yield name, info, None
                    continue
                self.total += info.size
                if self.total > self.limits.max_total_bytes:
                    raise UnsafeArchiveError(
                        f"archive expands past {self.limits.max_total_bytes} bytes"
                    )
                data = cast(BinaryIO, _MemberData(stream, info))
                if name == MANIFEST_NAME:
                    self.manifest = self._read_manifest(info, data)
                    continue
                yield name, info, data
            self._check_end(tar)
        except _READ_ERRORS as e:
            raise ArchiveCorruptError(f"archive is corrupt or truncated: {e}") from None

    def _check_member(self, info: tarfile.TarInfo) -> str:
        """The member's safe name; refuse what it is not, or where it would land."""
        name = safe_name(info.name)
        if not name:
            return name
        if name in self.names or name in self.dirs:
            raise UnsafeArchiveError(f"archive member {name!r} appears twice")
        if info.size < 0:
            raise ArchiveCorruptError(f"archive member {name!r} has a negative size")
        if info.sparse is not None:
            raise UnsafeArchiveError(f"archive member {name!r} is sparse; refused")
        if info.isdir():
            if info.size:
                raise UnsafeArchiveError(f"directory entry {name!r} carries data; refused")
        elif not info.isfile():
            raise UnsafeArchiveError(f"archive member {name!r} is a {_kind(info)}; refused")
        elif name in self.parents:
            raise UnsafeArchiveError(f"archive member {name!r} is both a file and a directory")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self.names:
                raise UnsafeArchiveError(f"archive member {name!r} is below the file {parent!r}")
            self.parents.add(parent)
        if not info.isdir():
            self.names.add(name)
        return name

    def _check_end(self, tar: tarfile.TarFile) -> None:
        """After the end of the tar only zero padding may follow: nothing hides there."""
        fileobj = cast(Any, tar.fileobj)
        while chunk := fileobj.read(CHUNK):
            self._count(len(chunk))
            if chunk.count(0) != len(chunk):
                raise UnsafeArchiveError("archive has data after the end of the tar")

    def _count(self, n: int) -> None:
        """Account ``n`` expanded bytes; refuse past the total cap or the bomb guard."""
        self.expanded += n
        limits = self.limits
        if self.expanded > limits.max_total_bytes:
            raise UnsafeArchiveError(f"archive expands past {limits.max_total_bytes} bytes")
        if (self.compression != "none" and limits.max_ratio > 0
                and self.expanded > limits.ratio_after_bytes
                and self.expanded > limits.max_ratio * max(self.counting.count, 1)):
            raise UnsafeArchiveError(
                f"archive expands more than {limits.max_ratio:g}:1 past "
                f"{limits.ratio_after_bytes} bytes: a decompression bomb?",
                hint="if you trust it (e.g. gigabytes of zeroed memory), read it with "
                "Limits(max_ratio=0)",
            )

    def _read_manifest(self, info: tarfile.TarInfo, data: BinaryIO) -> Manifest:
        if info.size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest.yaml is implausibly large ({info.size} bytes)")
        self.manifest_bytes = self._read_small(info, data)
        return parse_manifest(self.manifest_bytes)

    def _is_signature(self, info: tarfile.TarInfo) -> bool:
        """Whether ``info`` is the manifest's signature (once, a plain small file)."""
        if self.signature is not None or not info.isfile() or info.sparse is not None:
            return False
        if safe_name(info.name) != SIGNATURE_NAME:
            return False
        if info.size > crypto.MAX_SIGNATURE_BYTES:
            raise UnsafeArchiveError(f"the signature is implausibly large ({info.size} bytes)")
        return True

    def _read_small(self, info: tarfile.TarInfo, data: Any) -> bytes:
        text: bytes = data.read()
        if len(text) != info.size:
            raise ArchiveCorruptError(f"archive is truncated inside {info.name[:200]!r}")
        self._count(len(text))
        return text

    def hash_into(self, name: str, info: tarfile.TarInfo, data: BinaryIO,
                  sink: Callable[[bytes], object] | None) -> None:
        sha, got = hashlib.sha256(), 0
        keep: list[bytes] | None = [] if (
            name in foreign.KEPT and info.size <= MAX_MANIFEST_BYTES) else None
        while True:
            try:
                chunk = data.read(CHUNK)
            except _READ_ERRORS as e:
                raise ArchiveCorruptError(
                    f"archive is corrupt or truncated in {name!r}: {e}"
                ) from None
            if not chunk:
                break
            self._count(len(chunk))
            sha.update(chunk)
            got += len(chunk)
            if sink is not None:
                sink(chunk)
            if keep is not None:
                keep.append(chunk)
            if self.progress:
                self.progress(len(chunk))
        if got != info.size:
            raise ArchiveCorruptError(f"archive is truncated inside {name!r}")
        self.seen[name] = FileEntry(size=got, sha256=sha.hexdigest())
        if keep is not None:
            self.kept[name] = b"".join(keep)

    def check(self, trusted_keys: str | Path | None = None) -> Manifest:
        """Compare what was read with the manifest, and (``trusted_keys``) check that a
        trusted key signed it; return the manifest."""
        if self.manifest is None:  # not ctrmig's: a known foreign layout, or refused
            self.manifest = foreign.synthesize(self.seen, self.kept)
            if trusted_keys is not None:
                raise SignatureError(f"{foreign.note(self.manifest)}, nor any signature: "
                                     "nothing a trusted key signed")
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
        if trusted_keys is not None:
            crypto.verify_signature(self.manifest_bytes, self.signature, trusted_keys)
        return self.manifest


_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def parse_manifest(text: bytes) -> Manifest:
    """Parse manifest.yaml text with YAML's safe loader (libyaml's when available: the pure
    Python one takes seconds per MiB), after refusing anchors and aliases (a "billion
    laughs" expands them exponentially) and nesting deeper than 32 (the composer recurses).
    """
    # Flow collections first, counted naively (brackets in strings included): the YAML
    # scanners are quadratic in their nesting, so they must not even see "[[[[...".
    depth = 0
    for char in text.translate(None, _NOT_BRACKETS):
        depth += 1 if char in b"[{" else -1
        if depth > MAX_YAML_DEPTH:
            raise ManifestError("manifest.yaml is nested too deeply; refused")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ManifestError("manifest.yaml uses YAML anchors or aliases; refused")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ManifestError("manifest.yaml is nested too deeply; refused")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        data = yaml.load(text, Loader=_YAML_LOADER)  # a SafeLoader: plain YAML tags only
    except yaml.YAMLError as e:
        raise ManifestError(f"manifest.yaml is not valid YAML: {e}") from None
    return Manifest.from_dict(data)


def verify(
    source: Path | BinaryIO, *, limits: Limits = DEFAULT_LIMITS, progress: Progress | None = None,
    identities: Identities = (), trusted_keys: str | Path | None = None,
) -> Manifest:
    """Read the whole archive, check every member against the manifest (and, with
    ``trusted_keys``, the manifest's signature), return it."""
    with plaintext(source, identities) as raw:
        scan = _Scan(raw, limits, progress)
        for name, info, data in scan.members():
            if data is not None:
                scan.hash_into(name, info, data, None)
        return scan.check(trusted_keys)


def read_manifest(source: Path | BinaryIO, *, limits: Limits = DEFAULT_LIMITS,
                  identities: Identities = ()) -> Manifest:
    """Return the manifest without verifying checksums (fast on uncompressed archives).

    An archive without one (podman's, CRI-O's, a docker checkpoint directory) is read
    whole, for the manifest :mod:`.foreign` makes of it."""
    try:
        return parse_manifest(read_signed(source, limits=limits, identities=identities)[0])
    except NoManifestError:
        if not isinstance(source, (str, os.PathLike)):
            raise
        return verify(source, limits=limits, identities=identities)


def read_signed(source: Path | BinaryIO, *, limits: Limits = DEFAULT_LIMITS,
                identities: Identities = ()) -> tuple[bytes, bytes | None]:
    """The manifest's bytes as stored and its signature (None if unsigned), unverified."""
    if isinstance(source, (str, os.PathLike)):
        with open_plain(Path(source)) as raw:
            head = raw.read(crypto.HEAD_BYTES)
        if detect_compression(head) == "none" and not crypto.is_encrypted(head) \
                and not Path(source).is_dir():
            return _read_manifest_seeking(Path(source), limits)
    # Compressed, encrypted or a stream: walk every header, decompressing the data but
    # neither hashing it nor keeping it (half of a verify's CPU).
    with plaintext(source, identities) as raw:
        scan = _Scan(raw, limits, None)
        for _member in scan.members():
            pass
    if scan.manifest is None:
        raise NoManifestError("archive has no manifest.yaml",
                              hint="it was not written by ctrmig, or it is truncated")
    return scan.manifest_bytes, scan.signature


def _read_manifest_seeking(path: Path, limits: Limits) -> tuple[bytes, bytes | None]:
    # An uncompressed tar can be walked header by header, seeking over the data.
    try:
        with tarfile.open(path, mode="r:", tarinfo=_SafeTarInfo) as tar:
            info = signature = None
            for count, member in enumerate(tar, 1):
                if count > limits.max_members:
                    raise UnsafeArchiveError(f"archive has more than {limits.max_members} members")
                if member.name == SIGNATURE_NAME and info is not None \
                        and info.name == MANIFEST_NAME and member.isfile() \
                        and member.size <= crypto.MAX_SIGNATURE_BYTES:
                    signature = member
                    continue
                info = member
            if info is None or info.name != MANIFEST_NAME or not info.isfile():
                raise NoManifestError(
                    "archive has no manifest.yaml at its end",
                    hint="it was not written by ctrmig, or it is truncated",
                )
            if info.size > MAX_MANIFEST_BYTES:
                raise ManifestError("manifest.yaml is implausibly large")
            data = tar.extractfile(info)
            assert data is not None
            text = data.read()
            sig = tar.extractfile(signature) if signature is not None else None
            return text, sig.read() if sig is not None else None
    except (tarfile.TarError, EOFError, OSError, ValueError, RecursionError) as e:
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveCorruptError(f"not a readable tar archive: {e}") from None


def extract(
    source: Path | BinaryIO,
    dest: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    identities: Identities = (),
    trusted_keys: str | Path | None = None,
) -> Manifest:
    """Extract into the empty directory ``dest`` and verify; raise on anything unsafe.

    Files are created with O_EXCL and O_NOFOLLOW below ``dest`` only; directories are
    created as needed. On error the caller removes ``dest`` (see :func:`extracted`).
    """
    dest = dest.resolve()
    free = shutil.disk_usage(dest).free - limits.min_free_bytes
    cap = limits.max_total_bytes
    limits = dataclasses.replace(limits, max_total_bytes=min(cap, max(free, 0)))
    with plaintext(source, identities) as raw:
        scan = _Scan(raw, limits, progress)
        try:
            return _extract_members(scan, dest, trusted_keys)
        except UnsafeArchiveError:
            # Past the disk's room but within what any archive may hold: say "space".
            if limits.max_total_bytes < scan.total <= cap:
                raise ArchiveError(
                    f"not enough free space in {dest} for this archive "
                    f"({max(free, 0) >> 20} MiB usable, keeping "
                    f"{limits.min_free_bytes >> 20} MiB spare)",
                    hint="free some space, or point the work directory elsewhere "
                         "(workdir=, or TMPDIR)",
                ) from None
            raise


def _extract_members(scan: _Scan, dest: Path, trusted_keys: str | Path | None) -> Manifest:
    """Write every member of ``scan`` below ``dest``; return the checked manifest."""
    for name, info, data in scan.members():
        target = dest / name
        try:
            private_dir(target.parent)
            if data is None:
                private_dir(target)
                continue
            # Owner-only, whatever the archive says: the members are a container's memory.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o700 if info.mode & 0o100 else 0o600)
            with os.fdopen(fd, "wb") as out:
                scan.hash_into(name, info, data, out.write)
        except OSError as e:
            raise ArchiveError(f"cannot extract {name!r} into {dest}: {e.strerror}") from None
    return scan.check(trusted_keys)


@contextlib.contextmanager
def extracted(
    source: Path | BinaryIO,
    *,
    workdir: Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    identities: Identities = (),
    trusted_keys: str | Path | None = None,
) -> Iterator[tuple[Path, Manifest]]:
    """Extract and verify into a private temporary directory, removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="ctrmig-archive-", dir=workdir))  # made 0700
    try:
        manifest = extract(source, tmp, limits=limits, progress=progress,
                           identities=identities, trusted_keys=trusted_keys)
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
