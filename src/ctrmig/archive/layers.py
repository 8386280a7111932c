"""Layer diffs: a container's rootfs changes as an OCI layer tar, and back.

An overlay upper directory marks a deletion with a 0/0 character device (and an opaque
directory with an xattr); an OCI layer marks them with ``.wh.NAME`` and ``.wh..wh..opq``
entries. Every engine's ``rootfs-diff.tar`` is such a layer, read and written only here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ctrmig.archive.layout import DELETED_FILES, ROOTFS_DIFF
from ctrmig.errors import ArchiveError, UnsafeArchiveError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def write_rootfs_diff(upper: Path, out: Path) -> list[str]:
    """Pack an overlay upper directory as a layer tar (OCI whiteouts for deletions).

    Returns the deleted paths (the archive also lists them in ``deleted.files``, as
    podman's archives do).
    """
    deleted: list[str] = []
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(upper)
            if rel_dir != Path(".") and _opaque(Path(dirpath)):
                info = tarfile.TarInfo((rel_dir / OPAQUE).as_posix())
                tar.addfile(info)
            for entry in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / entry
                rel = (rel_dir / entry).as_posix()
                st = path.lstat()
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.append("/" + rel)
                    tar.addfile(tarfile.TarInfo((rel_dir / (WHITEOUT + entry)).as_posix()))
                    continue
                tar.add(path, arcname=rel, recursive=False)
    return deleted


def apply_rootfs_diff(diff: Path, rootfs: Path) -> None:
    """Apply a layer tar onto a mounted rootfs: whiteouts delete, the rest is extracted
    with tarfile's "tar" filter (nothing lands outside ``rootfs``), device nodes refused."""
    root = rootfs.resolve()
    with tarfile.open(diff, "r:") as tar:
        members = tar.getmembers()
        keep: list[tarfile.TarInfo] = []
        for m in members:
            parts = Path(m.name).parts
            if not parts:
                continue
            base = parts[-1]
            if base == OPAQUE:
                target = _inside(root, Path(*parts[:-1]))
                if target.is_dir() and not target.is_symlink():
                    for child in target.iterdir():
                        _remove(child)
            elif base.startswith(WHITEOUT):
                target = _inside(root, Path(*parts[:-1], base[len(WHITEOUT):]))
                _remove(target)
            else:
                keep.append(m)
        _extract(tar, root, keep, ROOTFS_DIFF)


def _extract(tar: tarfile.TarFile, dest: Path, members: list[tarfile.TarInfo], what: str,
             *, volume: bool = False) -> None:
    """Extract ``members`` of the archive's inner tar ``what`` with :func:`_safe_filter`."""
    def safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        return _safe_filter(member, path, what, volume=volume)

    try:
        tar.extractall(dest, members=members, filter=safe, numeric_owner=volume)
    except tarfile.FilterError as e:
        raise UnsafeArchiveError(f"{what}: {e}") from None


def _safe_filter(member: tarfile.TarInfo, dest: str, what: str, *,
                 volume: bool = False) -> tarfile.TarInfo | None:
    """tarfile's "tar" filter (nothing outside ``dest``), no device nodes (deletions travel
    as whiteout names, so an archive has no reason to create devices), and no hard link to
    a file outside ``dest``: Python 3.11's "tar" filter lets ``/etc/shadow`` through.

    A ``volume`` keeps its group/other write and sticky bits (shared directories are what
    volumes are for); setuid and setgid bits are dropped either way.
    """
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"{what}: {member.name!r} is a device node")
    if member.islnk():
        root = os.path.realpath(dest)
        target = os.path.realpath(os.path.join(root, member.linkname))
        if os.path.isabs(member.linkname) or os.path.commonpath([root, target]) != root:
            raise UnsafeArchiveError(
                f"{what}: {member.name!r} is a hard link to {member.linkname!r}, outside")
    filtered = tarfile.tar_filter(member, dest)
    if volume and filtered is not None and not member.issym():
        return filtered.replace(mode=member.mode & ~(stat.S_ISUID | stat.S_ISGID),
                                deep=False)
    return filtered


def write_volume(data: Path, out: Path) -> int:
    """Pack a named volume's ``_data`` directory as podman's volume tar (``./``,
    ``./sub/f``, ...); return the bytes of its regular files.

    Device nodes are refused (a restore would refuse them too); sockets are left out, as
    tar leaves them out.
    """
    total = 0

    def check(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal total
        if info.ischr() or info.isblk():
            raise UnsafeArchiveError(f"volume {data}: {info.name!r} is a device node",
                                     hint="leave volumes out with --ignore-volumes")
        total += info.size if info.isfile() else 0
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(data, arcname=".", filter=check)
    return total


def extract_volume(volume_tar: Path, dest: Path, what: str) -> None:
    """Extract a volume tar (from the archive, member ``what``) into the empty directory
    ``dest``: nothing lands outside it, no device nodes, numeric owners kept."""
    with tarfile.open(volume_tar, "r:") as tar:
        _extract(tar, dest, tar.getmembers(), what, volume=True)


def _inside(root: Path, rel: Path) -> Path:
    """``root/rel`` with its parent resolved inside ``root`` (the last part not followed)."""
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafeArchiveError(f"rootfs-diff.tar: path {rel} escapes the rootfs")
    parent = (root / rel).parent.resolve()
    if parent != root and root not in parent.parents:
        raise UnsafeArchiveError(f"rootfs-diff.tar: path {rel} escapes the rootfs")
    return parent / rel.name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def overlay_whiteout(upper: Path, path: str) -> None:
    """Delete ``path`` in an (unmounted) overlay2 layer: a 0/0 character device.

    ``path`` comes from the archive: refuse '..' and never follow a symlink in the layer.
    """
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafeArchiveError(f"deleted.files: refusing path {path!r}")
    current = upper
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeArchiveError(f"deleted.files: {path!r} crosses a non-directory")
    leaf = current / parts[-1]
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(leaf)
        if stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            shutil.rmtree(leaf)
        else:
            os.unlink(leaf)
    os.mknod(leaf, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def apply_deleted(paths: Iterable[str], rootfs: Path) -> None:
    """Delete ``paths`` (deleted.files of podman's and docker's archives: absolute paths
    in the container) from a mounted rootfs; nothing outside it is touched."""
    root = rootfs.resolve()
    for path in paths:
        rel = Path(path.lstrip("/"))
        if rel.parts:
            _remove(_inside(root, rel))


def read_deleted(path: Path) -> list[str]:
    """The paths a ``deleted.files`` lists (none if there is no such file)."""
    if not path.is_file():
        return []
    try:
        deleted = json.loads(path.read_text())
    except ValueError:
        raise ArchiveError(f"{DELETED_FILES} is not valid JSON") from None
    if not isinstance(deleted, list) or not all(isinstance(p, str) for p in deleted):
        raise ArchiveError(f"{DELETED_FILES} must be a list of paths")
    return deleted
