"""A docker container's filesystem changes, out of the container and into a new one.

Out: ``docker diff`` (GET /changes) names what changed; the files come from the local
overlay2 upper layer when it is readable here, else through GET /archive. The archive
gets rootfs-diff.tar (changed and added files) and deleted.files (podman's layout). In:
PUT /archive extracts the tar; deletions become whiteouts in the new container's overlay2
layer (:func:`ctrmig.archive.layers.overlay_whiteout`).
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from ctrmig.archive import ArchiveWriter
from ctrmig.archive.layers import overlay_whiteout, read_deleted
from ctrmig.archive.layout import DELETED_FILES, ROOTFS_DIFF
from ctrmig.engines.docker.api import EngineAPI
from ctrmig.errors import RestoreError

# The Kind of an entry of GET /containers/{id}/changes.
_MODIFIED, _ADDED, _DELETED = 0, 1, 2


def write_diff(api: EngineAPI, cid: str, data: dict[str, Any], writer: ArchiveWriter, *,
               workdir: Path | None = None) -> dict[str, Any]:
    """Add rootfs-diff.tar and deleted.files of container ``cid`` (inspected: ``data``);
    return the facts for the manifest."""
    changes = api.changes(cid)
    deleted = sorted(c["Path"] for c in changes if c["Kind"] == _DELETED)
    changed = sorted(c["Path"] for c in changes if c["Kind"] != _DELETED)
    upper = upper_dir(data)
    fetched = 0
    with tempfile.TemporaryFile(dir=workdir) as tmp:
        with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in changed:
                local = upper / path.lstrip("/") if upper else None
                if local is not None and os.path.lexists(local):
                    tar.add(local, arcname=path.lstrip("/"), recursive=False)
                elif not _has_children(path, changes):
                    fetched += 1
                    _copy_from_container(api, cid, path, tar)
        size = tmp.tell()
        tmp.seek(0)
        writer.add_stream(ROOTFS_DIFF, tmp, size)
    writer.add_bytes(DELETED_FILES, json.dumps(deleted).encode())
    return {"changed": len(changed), "deleted": len(deleted),
            "method": "overlay2-upperdir" if upper and not fetched else "archive-api"}


def apply_diff(api: EngineAPI, cid: str, source: Path) -> None:
    """Apply the extracted archive ``source``'s filesystem changes to the new ``cid``."""
    diff = source / ROOTFS_DIFF
    if diff.is_file() and diff.stat().st_size > 0:
        with diff.open("rb") as f:
            api.put_archive(cid, "/", f)
    deleted = read_deleted(source / DELETED_FILES)
    if not deleted:
        return
    upper = upper_dir(api.inspect(cid))
    if upper is None:
        raise RestoreError(
            f"cannot delete {len(deleted)} recorded path(s) in the new container",
            hint="only the overlay2 storage driver is supported for deletions; "
                 "or restore with ignore_rootfs",
        )
    for path in deleted:
        overlay_whiteout(upper, path)


def upper_dir(data: dict[str, Any]) -> Path | None:
    """The writable overlay2 layer of a container, when it is on this host."""
    driver = data.get("GraphDriver") or {}
    upper = (driver.get("Data") or {}).get("UpperDir")
    if driver.get("Name") != "overlay2" or not upper or not Path(upper).is_dir():
        return None
    return Path(upper)


def _copy_from_container(api: EngineAPI, cid: str, path: str, tar: tarfile.TarFile) -> None:
    """Add ``path`` of the container (GET /archive) to ``tar`` under its full path."""
    parent = PurePosixPath(path).parent.as_posix().lstrip("/")
    with api.get_archive(cid, path) as src:
        for member in src:
            member.name = f"{parent}/{member.name}" if parent else member.name
            body = src.extractfile(member) if member.isfile() else None
            tar.addfile(member, body)


def _has_children(path: str, changes: list[dict[str, Any]]) -> bool:
    prefix = path.rstrip("/") + "/"
    return any(c["Path"].startswith(prefix) for c in changes)
