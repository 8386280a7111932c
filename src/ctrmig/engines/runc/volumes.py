"""Volumes and bind mounts of runc containers, written the way podman and docker users do.

``NAME:/path[:ro]`` is a named volume ctrmig manages: its content lives in the state dir at
``volumes/NAME/_data`` (0700 above it), outlives the container, and travels in archives as
``volumes/NAME.tar`` (podman's layout). ``/host/path:/path[:ro]`` is a bind mount of a host
path: never carried, only listed, and a restore needs it present. Both become bind mounts
in the bundle's config.json; runc declares them to CRIU as external mounts.

A restore never overwrites a volume holding other content unless asked
(``replace_volumes``); it prepares every volume before anything is started and undoes
what it made if the restore fails (:class:`Prepared`).
"""

from __future__ import annotations

import filecmp
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ctrmig.archive.layers import extract_volume, write_volume
from ctrmig.archive.layout import volume_member
from ctrmig.errors import CtrmigError, OptionError, RestoreError, VolumeConflictError

#: docker's rule for volume names (it also serves as a directory name here).
VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
Kind = Literal["volume", "bind"]


@dataclass(frozen=True)
class Mount:
    """One ``-v`` of a container: a named volume (``name``) or a host path (``source``)."""

    kind: Kind
    destination: str
    name: str = ""
    source: str = ""
    readonly: bool = False

    def record(self, source: str) -> dict[str, Any]:
        """How meta.json and config.dump hold it (``source``: where it is mounted from)."""
        return {"kind": self.kind, "name": self.name, "source": source,
                "destination": self.destination, "readonly": self.readonly}

    def __str__(self) -> str:
        return f"{self.name or self.source}:{self.destination}{':ro' if self.readonly else ''}"


def parse(spec: str) -> Mount:
    """``NAME:/path[:ro|rw]`` or ``/host/path:/path[:ro|rw]``, as ``podman run -v``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise OptionError(f"volume {spec!r} is not SOURCE:DESTINATION[:ro]",
                          hint="e.g. data:/data or /srv/www:/www:ro")
    flags = parts[2].split(",") if len(parts) == 3 else []
    if not set(flags) <= {"ro", "rw"} or {"ro", "rw"} <= set(flags):
        raise OptionError(f"volume {spec!r}: options are ro or rw, not {parts[2]!r}")
    source, dest = parts[:2]
    readonly = "ro" in flags
    if source.startswith("/"):
        return checked(Mount("bind", dest, source=posixpath.normpath(source),
                             readonly=readonly))
    return checked(Mount("volume", dest, name=source, readonly=readonly))


def checked(m: Mount) -> Mount:
    """``m`` if its name, source and destination are plain; else OptionError."""
    dest = m.destination
    if (not dest.startswith("/") or posixpath.normpath(dest) != dest or dest == "/"
            or "\0" in dest or "," in dest):
        raise OptionError(f"volume destination {dest!r} must be a plain absolute path, "
                          "not /")
    if m.kind == "volume" and not VOLUME_NAME_RE.fullmatch(m.name):
        raise OptionError(f"invalid volume name {m.name!r}",
                          hint="letters, digits, '_', '.', '-'; at most 128")
    if m.kind == "bind" and (not m.source.startswith("/") or "\0" in m.source
                             or "," in m.source):
        raise OptionError(f"bind mount source {m.source!r} must be an absolute path")
    return m


def from_records(records: object) -> list[Mount]:
    """The mounts meta.json or an archive's config.dump lists (checked: archives come
    from elsewhere); none when it lists none."""
    if records is None:
        return []
    if not isinstance(records, list):
        raise OptionError("volumes must be a list")
    mounts = []
    for r in records:
        if not isinstance(r, dict) or r.get("kind") not in ("volume", "bind"):
            raise OptionError(f"malformed volume record {str(r)[:200]!r}")
        mounts.append(checked(Mount(
            r["kind"], str(r.get("destination") or ""), name=str(r.get("name") or ""),
            source=str(r.get("source") or "") if r["kind"] == "bind" else "",
            readonly=r.get("readonly") is True)))
    return _one_per_destination(mounts)


def parse_all(specs: Iterable[str]) -> list[Mount]:
    """The mounts of ``-v`` specs (see :func:`parse`)."""
    return _one_per_destination([parse(s) for s in specs])


def _one_per_destination(mounts: list[Mount]) -> list[Mount]:
    dests = [m.destination for m in mounts]
    if len(set(dests)) != len(dests):
        raise OptionError(f"two volumes at one destination: {sorted(dests)}")
    return mounts


def spec_mounts(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config.json mounts of a container's volume records."""
    return [{"destination": r["destination"], "type": "bind", "source": r["source"],
             "options": ["rbind", "rprivate", *(["ro"] if r.get("readonly") else [])]}
            for r in records]


def missing_binds(mounts: Iterable[Mount], error: type[CtrmigError] = RestoreError) -> None:
    """Refuse bind mounts whose host path does not exist, naming them all."""
    missing = [m for m in mounts if m.kind == "bind" and not os.path.lexists(m.source)]
    if missing:
        raise error(
            "bind mount source(s) missing on this host: "
            + ", ".join(f"{m.source} (for {m.destination})" for m in missing),
            hint="create them first: host paths are never carried in archives")


@dataclass
class Prepared:
    """Volumes one run or restore made or replaced: kept on :meth:`commit`, undone on
    :meth:`rollback` (a replaced volume gets its old content back)."""

    created: list[Path] = field(default_factory=list)
    #: (volume, the directory holding its old self as ``old``)
    replaced: list[tuple[Path, Path]] = field(default_factory=list)

    def commit(self) -> None:
        for _, holder in self.replaced:
            shutil.rmtree(holder, ignore_errors=True)
        self.created, self.replaced = [], []

    def rollback(self) -> None:
        for path in self.created:
            shutil.rmtree(path, ignore_errors=True)
        for path, holder in self.replaced:
            shutil.rmtree(path, ignore_errors=True)
            os.rename(holder / "old", path)
            holder.rmdir()
        self.created, self.replaced = [], []


class Volumes:
    """The named volumes of one runc state dir: ``root/NAME/_data``."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def data(self, name: str) -> Path:
        """Where volume ``name``'s content lives (what containers mount)."""
        return self.root / name / "_data"

    def exists(self, name: str) -> bool:
        return self.data(name).is_dir()

    def remove(self, name: str) -> None:
        """Delete volume ``name`` and its content (no error if there is none)."""
        if VOLUME_NAME_RE.fullmatch(name):
            shutil.rmtree(self.path(name), ignore_errors=True)

    def sources(self, mounts: Iterable[Mount]) -> list[dict[str, Any]]:
        """The records of ``mounts`` with where each is mounted from here."""
        return [m.record(str(self.data(m.name)) if m.kind == "volume" else m.source)
                for m in mounts]

    def create(self, mounts: Iterable[Mount], done: Prepared) -> None:
        """Make the named volumes of ``mounts`` that do not exist yet (empty)."""
        for m in mounts:
            if m.kind == "volume" and not self.exists(m.name):
                path = self._new()
                os.rename(path, self.path(m.name))
                done.created.append(self.path(m.name))

    def pack(self, mounts: Iterable[Mount], work: Path, *,
             ignore: bool) -> list[dict[str, Any]]:
        """Pack each named volume's content as podman's volume tar into ``work`` (unless
        ``ignore``; see :meth:`packed`); return every mount's facts for the manifest."""
        facts = []
        for m in mounts:
            carried = m.kind == "volume" and not ignore
            size = write_volume(self.data(m.name), self.packed(work, m.name)) if carried \
                else None
            source = str(self.data(m.name)) if m.kind == "volume" else m.source
            facts.append({"name": m.name or None, "destination": m.destination,
                          "kind": m.kind, "source": source, "bytes": size,
                          "carried": carried, "readonly": m.readonly})
        return facts

    @staticmethod
    def packed(work: Path, name: str) -> Path:
        """Where :meth:`pack` put volume ``name``'s tar."""
        return work / f"volume-{name}.tar"

    def restore(self, mounts: Sequence[Mount], source: Path, carried: Callable[[str], bool],
                *, replace: bool, users: Callable[[str], list[str]]) -> Prepared:
        """Give the named volumes of ``mounts`` the content the extracted archive
        ``source`` carries (``carried(name)``): a missing volume is created, one with the
        same content reused, one with other content refused (all named) unless
        ``replace`` and no running container (``users(name)``) holds it. Nothing is
        changed before every volume was judged."""
        staged: dict[str, Path] = {}
        done = Prepared()
        try:
            conflicts, busy = [], []
            for m in mounts:
                if m.kind != "volume" or not carried(m.name) or m.name in staged:
                    continue
                path = staged[m.name] = self._new()
                extract_volume(source / volume_member(m.name), path / "_data",
                               volume_member(m.name))
                if not self.exists(m.name):
                    continue
                if same_tree(path / "_data", self.data(m.name)):
                    shutil.rmtree(staged.pop(m.name))  # the volume holds it already
                elif not replace:
                    conflicts.append(m.name)
                elif users(m.name):
                    busy.append(f"{m.name} (used by {', '.join(users(m.name))})")
            if conflicts:
                raise VolumeConflictError(
                    f"volume(s) {', '.join(conflicts)} exist here with other content than "
                    "the archive's", hint="pass --replace-volumes to replace them with the "
                    "archive's content, or remove them first")
            if busy:
                raise RestoreError(f"cannot replace volume(s) in use: {', '.join(busy)}",
                                   hint="stop those containers first")
            for name, path in staged.items():
                if self.exists(name):
                    holder = self._new(empty=True)
                    os.rename(self.path(name), holder / "old")
                    done.replaced.append((self.path(name), holder))
                else:
                    done.created.append(self.path(name))
                os.rename(path, self.path(name))
            self.create(mounts, done)
        except BaseException:
            done.rollback()
            for path in staged.values():
                shutil.rmtree(path, ignore_errors=True)
            raise
        return done

    def _new(self, *, empty: bool = False) -> Path:
        """A fresh directory (0700) beside the volumes, holding an empty ``_data`` unless
        ``empty``: renamed into place, so that a volume appears whole or not at all."""
        path = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        if not empty:
            (path / "_data").mkdir(mode=0o755)
        return path


def same_tree(a: Path, b: Path) -> bool:
    """Whether two directory trees hold the same names, types, owners, modes (less
    setuid/setgid, which extraction drops), file bytes and link targets."""
    def entries(root: Path) -> dict[str, os.stat_result]:
        found = {".": root.lstat()}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                path = Path(dirpath) / n
                found[path.relative_to(root).as_posix()] = path.lstat()
        return found

    ea, eb = entries(a), entries(b)
    if ea.keys() != eb.keys():
        return False
    for rel, sa in ea.items():
        sb = eb[rel]
        if (stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode)
                or stat.S_IMODE(sa.st_mode) & ~0o6000 != stat.S_IMODE(sb.st_mode) & ~0o6000
                or (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid)):
            return False
        pa, pb = a / rel, b / rel
        if stat.S_ISLNK(sa.st_mode) and os.readlink(pa) != os.readlink(pb):
            return False
        if stat.S_ISREG(sa.st_mode) and (sa.st_size != sb.st_size
                                         or not filecmp.cmp(pa, pb, shallow=False)):
            return False
    return True
