"""A docker container's volumes, carried in the archive and recreated before it starts.

The layout is podman's (seen in podman 4.3's ``checkpoint --export``): one member
``volumes/<volume name>.tar`` per volume, a tar of the volume's root (``./`` and below),
named and anonymous volumes alike (an anonymous one under its generated name). ctrmig's
manifest adds ``extra["volumes"]``, one entry per mounted volume (:class:`Volume`): where
it is mounted, whether it is anonymous, its driver, and, when its content is inside, the
member, the bytes of its files and a digest of its content (names, types, modes without
setuid/setgid, owners, data, link targets; no times), so a restore can tell an existing
volume of the same name that holds the same content from one that does not.

Out: after the dump (the container stopped, or paused for ``leave_running``) the content
is read from the directory of a plain local volume on this host, else through dockerd
(GET /archive: a volume with options is mounted only while in use). A volume another
running container mounts read-write cannot be read consistently: the checkpoint refuses
it (``ignore_volumes`` leaves all content out).

In: named volumes missing here are created with their recorded driver and options
(anything but a plain local volume is a privilege request:
:func:`ctrmig.archive.privileges.volume_requests`); the new container's anonymous ones are
dockerd's, matched by mount point. Each is emptied and filled from its member before the
start (through PUT /archive where it is not a local directory here). An existing volume
with other content is refused unless ``replace_volumes``. Extraction refuses devices,
hard links out and paths that leave the volume, keeps owners by number and drops
setuid/setgid bits (a volume's directory is reachable on the host).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, BinaryIO

from ctrmig.archive import ArchiveWriter, Manifest
from ctrmig.archive.layout import volume_member
from ctrmig.archive.streams import CHUNK
from ctrmig.engines.docker.api import EngineAPI
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    EngineError,
    RestoreError,
    UnsafeArchiveError,
    VolumeConflictError,
)

log = logging.getLogger(__name__)

#: dockerd's own rule for volume names (and no name of a volume may hold a "/").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
#: The manifest's key.
EXTRA_KEY = "volumes"
IGNORE_HINT = "or checkpoint with --ignore-volumes (their content stays out of the archive)"


@dataclass(frozen=True)
class Volume:
    """One volume a container mounts, as the manifest records it (see :meth:`to_dict`)."""

    name: str
    destination: str
    anonymous: bool = False
    rw: bool = True
    driver: str = "local"
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    #: The archive member with its content; None: the content is not in the archive.
    member: str | None = None
    #: Bytes of regular files, entries (files, directories, links) and the content digest.
    size: int = 0
    entries: int = 0
    digest: str = ""

    @classmethod
    def from_dict(cls, data: object) -> Volume:
        """An entry of a (possibly hostile) manifest, checked."""
        if not isinstance(data, dict) or data.get("kind", "volume") != "volume":
            raise ArchiveError("the manifest's volumes entry is not a volume")
        name, dest = data.get("name"), data.get("destination")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ArchiveError(f"the manifest names an invalid volume: {str(name)[:100]!r}")
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise ArchiveError(f"volume {name}: invalid mount point {str(dest)[:100]!r}")
        member = data.get("member")
        if member is not None and member != volume_member(name):
            raise ArchiveError(f"volume {name}: unexpected member {str(member)[:100]!r}")
        if (member is not None) != (data.get("carried") is True):
            raise ArchiveError(f"volume {name}: carried and member disagree")
        return cls(
            name=name, destination=dest, anonymous=data.get("anonymous") is True,
            rw=data.get("readonly") is not True, driver=str(data.get("driver") or "local"),
            options=_strings(data.get("options")), labels=_strings(data.get("labels")),
            member=member, size=_int(data.get("bytes")), entries=_int(data.get("entries")),
            digest=str(data.get("digest") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest's entry. Its common keys are those of the runc engine's entries
        (kind, name, destination, readonly, carried, bytes), so one reader serves both."""
        return {"kind": "volume", "name": self.name, "destination": self.destination,
                "anonymous": self.anonymous, "readonly": not self.rw,
                "carried": self.member is not None, "member": self.member,
                "bytes": self.size, "entries": self.entries, "digest": self.digest,
                "driver": self.driver, "options": self.options, "labels": self.labels}


# --- checkpoint ------------------------------------------------------------------------------


def mounted(data: dict[str, Any]) -> list[Volume]:
    """The volumes of an inspected container; anonymous: no bind or mount names it."""
    host = data.get("HostConfig") or {}
    named = {str(b).split(":", 1)[0] for b in host.get("Binds") or [] if ":" in str(b)}
    named |= {str(m.get("Source")) for m in host.get("Mounts") or []
              if m.get("Type") == "volume" and m.get("Source")}
    found: dict[str, Volume] = {}  # a volume mounted twice is carried once
    for m in data.get("Mounts") or []:
        if m.get("Type") == "volume" and m.get("Name"):
            found.setdefault(str(m["Name"]), Volume(
                name=str(m["Name"]), destination=str(m.get("Destination") or ""),
                anonymous=str(m["Name"]) not in named, rw=bool(m.get("RW", True)),
                driver=str(m.get("Driver") or "local")))
    return list(found.values())


def require_consistent(api: EngineAPI, cid: str, volumes: Iterable[Volume], label: str) -> None:
    """Refuse volumes another running container mounts read-write: their content would
    change while, or after, this container's state is taken."""
    shared = []
    for v in volumes:
        for row in api.using(v.name):
            if row.get("Id") == cid or row.get("State") not in ("running", "paused"):
                continue
            rw = any(m.get("Name") == v.name and m.get("RW", True) for m in row.get("Mounts") or [])
            if rw:
                shared.append(f"{v.name} (with {_name(row)})")
    if shared:
        raise CheckpointError(
            f"docker container {label!r}: volume(s) {', '.join(shared)} are mounted "
            "read-write by another running container: their content cannot be captured "
            "consistently",
            hint=f"stop the other container(s), {IGNORE_HINT}",
        )


@contextlib.contextmanager
def captured(api: EngineAPI, cid: str, volumes: list[Volume], *,
             workdir: Path | None = None) -> Iterator[list[tuple[Volume, Path]]]:
    """Each volume's content packed into a private temporary tar (removed on exit), with
    its facts (driver, options, labels, size, digest) filled in."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-volumes-", dir=workdir) as tmp:
        packed = []
        for v in volumes:
            info = api.volume(v.name) or {}
            out = Path(tmp) / f"{v.name}.tar"
            directory = local_dir(info)
            with out.open("wb") as f:
                if directory is not None:
                    size, entries, digest = pack_dir(directory, f, v.name)
                else:  # mounted by dockerd only in use, or not on this host: dockerd reads it
                    with api.get_archive(cid, v.destination) as src:
                        size, entries, digest = pack_tar(src, f, v.name)
            packed.append((replace(
                v, driver=str(info.get("Driver") or v.driver),
                options=_strings(info.get("Options")), labels=_strings(info.get("Labels")),
                member=volume_member(v.name), size=size, entries=entries, digest=digest,
            ), out))
        yield packed


def local_dir(info: dict[str, Any]) -> Path | None:
    """The directory of a plain local volume (``GET /volumes/NAME``) when it is on this
    host. Not for a volume with options (tmpfs, nfs, a bind): dockerd mounts that at its
    Mountpoint only while a container uses it, so ctrmig goes through dockerd instead."""
    mountpoint = Path(str(info.get("Mountpoint") or ""))
    if (info.get("Driver") or "local") != "local" or info.get("Options") \
            or not mountpoint.is_absolute() or not mountpoint.is_dir():
        return None
    return mountpoint


def add(writer: ArchiveWriter, packed: list[tuple[Volume, Path]]) -> None:
    for v, path in packed:
        assert v.member is not None
        writer.add_file(v.member, path)


# --- the content: packing, digests, extraction -----------------------------------------------


class _Digest:
    """A content digest that does not depend on member order, times or setuid bits."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}
        self.size = 0

    def add(self, name: str, info: tarfile.TarInfo, sha: str = "") -> None:
        if info.islnk():  # a hard link: the same content as the file it links to
            line = self.lines.get(_rel(info.linkname), f"h {_rel(info.linkname)}")
        else:
            what = sha if info.isreg() else info.linkname if info.issym() else ""
            kind = ("f" if info.isreg() else "d" if info.isdir() else "l" if info.issym()
                    else "p" if info.isfifo() else info.type.decode(errors="replace"))
            line = f"{kind} {info.mode & 0o1777:o} {info.uid} {info.gid} {what}"
            self.size += info.size if info.isreg() else 0
        self.lines[name] = line

    def result(self) -> tuple[int, int, str]:
        sha = hashlib.sha256()
        for name in sorted(self.lines):
            sha.update(f"{name}\0{self.lines[name]}\n".encode("utf-8", "surrogateescape"))
        return self.size, len(self.lines), f"sha256:{sha.hexdigest()}"


class _Hashing:
    """A file read through a sha256."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        return data


def _rel(name: str) -> str:
    """A member name relative to the volume's root ("" for the root)."""
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path == "." else path


def _walk(root: Path, tar: tarfile.TarFile, volume: str) -> Iterator[tuple[str, tarfile.TarInfo,
                                                                             Path]]:
    """Every entry below ``root`` (itself first) as tarfile describes it, sorted, never
    following symlinks; sockets are left out (meaningless copied), devices refused."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        rel = base.relative_to(root).as_posix()
        prefix = "." if rel == "." else f"./{rel}"
        entries = [(prefix, base)] if rel == "." else []
        entries += [(f"{prefix}/{e}", base / e) for e in sorted(dirnames + filenames)]
        for arc, path in entries:
            info = tar.gettarinfo(str(path), arcname=arc)
            if info is None:
                continue  # a socket
            if info.ischr() or info.isblk():
                raise CheckpointError(f"volume {volume} holds a device node ({arc}): ctrmig "
                                      "does not carry devices", hint=IGNORE_HINT)
            yield arc, info, path


def pack_dir(root: Path, out: BinaryIO, volume: str) -> tuple[int, int, str]:
    """Write the tar of the directory ``root`` to ``out``; return (bytes of files,
    entries, digest)."""
    digest = _Digest()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for arc, info, path in _walk(root, tar, volume):
            if info.isreg():
                with path.open("rb") as f:
                    body = _Hashing(f)
                    tar.addfile(info, body)
                digest.add(_rel(arc), info, body.sha.hexdigest())
            else:
                tar.addfile(info)
                digest.add(_rel(arc), info)
    return digest.result()


def pack_tar(src: tarfile.TarFile, out: BinaryIO, volume: str) -> tuple[int, int, str]:
    """Re-root dockerd's GET /archive tar (named after the mount point's last part) at
    ``./`` into ``out``; return what :func:`pack_dir` does."""
    digest = _Digest()

    def rerooted(name: str) -> str:
        rest = name.split("/", 1)[1] if "/" in name.strip("/") else ""
        return f"./{rest}" if rest else "."

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in src:
            if member.ischr() or member.isblk():
                raise CheckpointError(f"volume {volume} holds a device node ({member.name}): "
                                      "ctrmig does not carry devices", hint=IGNORE_HINT)
            member.name = rerooted(member.name)
            if member.islnk():
                member.linkname = rerooted(member.linkname)
            if member.isreg():
                body = _Hashing(src.extractfile(member))  # type: ignore[arg-type]
                tar.addfile(member, body)
                digest.add(_rel(member.name), member, body.sha.hexdigest())
            else:
                tar.addfile(member)
                digest.add(_rel(member.name), member)
    return digest.result()


def digest_dir(root: Path, volume: str) -> str:
    """The content digest of the directory ``root`` (as :func:`pack_dir` computes it)."""
    digest = _Digest()
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:  # for gettarinfo only
        for arc, info, path in _walk(root, tar, volume):
            sha = ""
            if info.isreg():
                h = hashlib.sha256()
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                sha = h.hexdigest()
            digest.add(_rel(arc), info, sha)
    return digest.result()[2]


def extract(member: Path, dest: Path, volume: str) -> None:
    """Extract a volume member into the (empty) directory ``dest``, safely.

    Refused: device nodes, sparse and unknown members, names that are absolute or leave
    ``dest`` (through ``..`` or a symlink extracted before), hard links to anything outside
    it. Symlinks themselves are kept (a volume's own, resolved inside the container, never
    followed here); owners are kept by number; setuid/setgid bits are dropped.
    """
    root = os.path.realpath(dest)

    def checked(info: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        _refuse_unsafe(info, volume)
        if info.islnk():
            target = os.path.realpath(os.path.join(root, info.linkname))
            if os.path.commonpath([target, root]) != root:
                raise _refused(info, volume, f"links to {info.linkname[:200]!r} outside it")
        try:
            safe = tarfile.tar_filter(info, path)  # through a symlink extracted before
        except tarfile.FilterError as e:
            raise _refused(info, volume, f"leaves the volume ({type(e).__name__})") from None
        return safe.replace(mode=info.mode & ~0o6000, deep=False)

    try:
        with tarfile.open(member, "r:") as tar:
            tar.extractall(dest, numeric_owner=True, filter=checked)
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(f"volumes/{volume}.tar cannot be extracted: {e}") from None


def vet(member: Path, volume: str) -> None:
    """Refuse a volume member dockerd is to extract (PUT /archive, chrooted in the
    container) for what :func:`extract` refuses before it writes: devices, absolute names,
    ``..``, hard links out, setuid/setgid bits."""
    try:
        with tarfile.open(member, "r:") as tar:
            for info in tar:
                _refuse_unsafe(info, volume)
                if info.mode & 0o6000:
                    raise _refused(info, volume, "is setuid or setgid")
    except tarfile.TarError as e:
        raise ArchiveError(f"volumes/{volume}.tar is not a readable tar: {e}") from None


def _refuse_unsafe(info: tarfile.TarInfo, volume: str) -> None:
    if info.ischr() or info.isblk():
        raise _refused(info, volume, "is a device node")
    if info.issparse() or not (info.isreg() or info.isdir() or info.issym()
                               or info.islnk() or info.isfifo()):
        raise _refused(info, volume, "is not a file, directory, link or fifo")
    for name in (info.name, info.linkname if info.islnk() else ""):
        if name.startswith("/") or ".." in name.split("/"):
            raise _refused(info, volume, f"names {name[:200]!r}: absolute or with '..'")


def _refused(info: tarfile.TarInfo, volume: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"volumes/{volume}.tar: {info.name[:200]!r} {why}; refused")


def _empty(root: Path) -> None:
    """Remove everything below ``root``, following no symlink."""
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# --- restore ---------------------------------------------------------------------------------


def recorded(manifest: Manifest) -> list[Volume]:
    """The volumes the archive records (none for archives from before volumes)."""
    entries = manifest.extra.get(EXTRA_KEY) or []
    if not isinstance(entries, list):
        raise ArchiveError("the manifest's volumes are not a list")
    volumes = [Volume.from_dict(e) for e in entries]
    for v in volumes:
        if v.member is not None and v.member not in manifest.files:
            raise ArchiveError(f"volume {v.name}: {v.member} is not in the archive")
    return volumes


class Restorer:
    """The archive's volumes on this dockerd: checked, created, filled."""

    def __init__(self, api: EngineAPI, source: Path, volumes: list[Volume], *,
                 replace: bool, label: str):
        """Refuse an existing named volume with other content (``replace``: empty it)."""
        self.api, self.source, self.label = api, source, label
        self.carried = [v for v in volumes if v.member is not None]
        self.made: list[str] = []
        self.fill_named: list[Volume] = []
        if len(self.carried) < len(volumes):
            log.warning("%s: the archive holds no content of volume(s) %s; the new container "
                        "gets them by name (empty if new)", label,
                        ", ".join(v.name for v in volumes if v.member is None))
        conflicts, self.missing = [], []
        for v in self.carried:
            if v.anonymous:
                continue
            info = api.volume(v.name)
            if info is None:
                self.missing.append(v)
            elif self._same(v, info):
                log.info("%s: volume %s exists with the archive's content; kept", label, v.name)
            else:
                conflicts.append(v)
        if conflicts and not replace:
            raise VolumeConflictError(
                f"volume(s) {', '.join(v.name for v in conflicts)} exist here with other "
                "content than the archive's",
                hint="remove them, restore with --replace-volumes (their content is "
                     "replaced), or with --ignore-volumes (kept as they are)",
            )
        for v in conflicts:
            busy = [r for r in api.using(v.name) if r.get("State") in ("running", "paused")]
            if busy:
                raise VolumeConflictError(
                    f"volume {v.name} is in use by running container(s) "
                    f"{', '.join(_name(r) for r in busy)}: "
                    "ctrmig does not replace its content under them",
                    hint="stop them first")
        self.fill_named = self.missing + conflicts

    def _same(self, v: Volume, info: dict[str, Any]) -> bool:
        directory = local_dir(info)
        if directory is None:
            return False  # cannot tell: counted as different
        return bool(v.digest) and digest_dir(directory, v.name) == v.digest

    @contextlib.contextmanager
    def created(self) -> Iterator[None]:
        """Create the missing named volumes; remove them again if the block fails."""
        try:
            for v in self.missing:
                self.api.create_volume(v.name, v.driver, v.options, v.labels)
                self.made.append(v.name)
            yield
        except BaseException:
            for name in reversed(self.made):
                with contextlib.suppress(EngineError):
                    self.api.remove_volume(name)
            raise

    def fill(self, cid: str) -> None:
        """Fill the created container ``cid``'s volumes with the archive's content."""
        mounts = {str(m.get("Destination")): m for m in self.api.inspect(cid).get("Mounts") or []
                  if m.get("Type") == "volume"}
        for v in self.fill_named + [v for v in self.carried if v.anonymous]:
            name = v.name
            if v.anonymous:  # dockerd made a new one at create, with the image's files
                name = str((mounts.get(v.destination) or {}).get("Name") or "")
                if not name:
                    raise RestoreError(f"the new container has no volume at {v.destination}")
            assert v.member is not None
            member = self.source / v.member
            directory = local_dir(self.api.volume(name) or {})
            if directory is not None:
                _empty(directory)
                extract(member, directory, v.name)
            else:  # dockerd mounts it for the copy; what it held already stays beside
                vet(member, v.name)
                with member.open("rb") as f:
                    self.api.put_archive(cid, v.destination, f)
            log.info("%s: volume %s at %s filled (%d bytes%s)", self.label, name,
                     v.destination, v.size, "" if directory else ", through dockerd")


def moved(manifest: Manifest) -> list[str]:
    """The named volumes whose content the archive carries (a migration took them)."""
    return [v.name for v in recorded(manifest) if v.member is not None and not v.anonymous]


def _name(row: dict[str, Any]) -> str:
    """A container's name in a GET /containers/json row."""
    return str((row.get("Names") or [str(row.get("Id", ""))[:12]])[0]).lstrip("/")


def _strings(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
