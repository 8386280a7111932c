"""The files of podman's checkpoints: read from a bundle, placed into a new one.

See :mod:`.direct` for the route they serve.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrmig.archive import ArchiveWriter
from ctrmig.archive.layout import (
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    DELETED_FILES,
    DEVSHM,
    IMAGE_DIR,
    MANIFEST_NAME,
    NETWORK_STATUS,
    ROOTFS_DIFF,
    SPEC_DUMP,
    STATS_DUMP,
)
from ctrmig.errors import RestoreError

log = logging.getLogger(__name__)

#: The bundle's runtime spec (podman's generated config.json: every mount, the rootfs
#: path). Below a directory of its own: podman's import extracts all members into the
#: bundle, and must not take this for its own config.json.
RUNTIME_SPEC = "ctrmig/runtime-spec.json"
#: podman's answer to an import of config.dump and spec.dump alone, once it created the
#: container (libpod's restore(), after importing).
CREATED_ONLY = "a complete checkpoint for this container cannot be found"
#: What podman's export takes from the bundle besides checkpoint/ and artifacts/.
EXPORT_FILES = (CONFIG_DUMP, SPEC_DUMP, NETWORK_STATUS, STATS_DUMP, DEVSHM, ROOTFS_DIFF,
                DELETED_FILES, "ctr.log")
#: The Kind of an entry of GET /containers/{id}/changes.
_MODIFIED, _ADDED, _DELETED = 0, 1, 2
#: The facts of a container's paths that its runtime spec names.
PATH_KEYS = ("static_dir", "run_dir", "layer_dir")


@dataclass(frozen=True)
class Storage:
    """Where one podman keeps its containers (its ``/info`` store)."""

    graph_root: Path
    run_root: Path

    @classmethod
    def of(cls, info: Mapping[str, Any]) -> Storage | None:
        store = info.get("store") or {}
        graph, run = store.get("graphRoot"), store.get("runRoot")
        return cls(Path(graph), Path(run)) if graph and run else None

    @property
    def local(self) -> bool:
        """Whether this storage looks readable here (proved per container: :func:`paths`)."""
        return os.access(self.graph_root, os.W_OK) and self.graph_root.is_dir()

    @property
    def incoming(self) -> Path:
        """Where archives are extracted: the storage's filesystem, so that placing the
        verified files into a bundle is a rename."""
        path = self.graph_root / "ctrmig-incoming"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def paths(self, data: Mapping[str, Any]) -> dict[str, str] | None:
        """The container's paths (``data``: podman inspect), if its bundle is here: the
        bundle's name holds the container's random ID, so finding it proves the storage
        is this host's."""
        cid = str(data.get("Id", ""))
        driver = data.get("GraphDriver") or {}
        static = str(data.get("StaticDir") or
                     self.graph_root / f"{driver.get('Name', 'overlay')}-containers" / cid /
                     "userdata")
        upper = (driver.get("Data") or {}).get("UpperDir")
        if not cid or not upper or not Path(static).is_dir():
            return None
        return {
            "static_dir": static,
            "run_dir": str(self.run_root / f"{driver.get('Name')}-containers" / cid /
                           "userdata"),
            "layer_dir": os.path.dirname(str(upper)),
        }


def missing(bundle: Path, data: Mapping[str, Any], *, ignore_volumes: bool,
            changes: Callable[[], list[dict[str, Any]]] | None, since: float) -> str:
    """Why the bundle lacks something podman's export (begun at ``since``) carried: ""
    if nothing. ``changes`` (None: rootfs changes are left out) lists the rootfs changes."""
    for name in (f"{CHECKPOINT_DIR}/inventory.img", CONFIG_DUMP, SPEC_DUMP, "config.json"):
        if not (bundle / name).is_file():
            return f"no {name} in {bundle}"
    if changes is not None:
        for name, needed in _rootfs_members(changes()).items():
            path = bundle / name
            fresh = path.is_file() and path.stat().st_mtime >= since - 1
            if needed and not fresh:
                return f"podman removed {name} after its export"
            if fresh and not needed:
                return f"{name} in the bundle is not this export's"
    if not ignore_volumes and any(m.get("Type") == "volume" for m in data.get("Mounts") or []):
        return "named volumes: podman removes their export from the bundle"
    return ""


def _rootfs_members(changes: list[dict[str, Any]]) -> dict[str, bool]:
    """Which rootfs members podman's export writes for ``changes`` (its
    CRCreateRootFsDiffTar: added files, modified files but not directories, deletions;
    it judges "directory" on this host's path, and so does this)."""
    files = any(c.get("Kind") == _ADDED or (
        c.get("Kind") == _MODIFIED and os.path.exists(c.get("Path", ""))
        and not os.path.isdir(c.get("Path", ""))) for c in changes)
    return {ROOTFS_DIFF: files, DELETED_FILES: any(c.get("Kind") == _DELETED for c in changes)}


def write_bundle(writer: ArchiveWriter, bundle: Path) -> None:
    """Add what podman's export holds, from the bundle, in podman's layout (small files
    first); and the runtime spec, for a restore without import."""
    for name in EXPORT_FILES:
        if (bundle / name).is_file():
            writer.add_file(name, bundle / name)
    writer.add_bytes(RUNTIME_SPEC, (bundle / "config.json").read_bytes())
    if (bundle / "artifacts").is_dir():
        writer.add_tree(bundle / "artifacts", "artifacts")
    writer.add_tree(bundle / CHECKPOINT_DIR, CHECKPOINT_DIR)


def config_tar(root: Path) -> bytes:
    """config.dump and spec.dump of the extracted archive ``root`` as a tar: what podman
    creates a container from."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (CONFIG_DUMP, SPEC_DUMP):
            tar.add(root / name, arcname=name, recursive=False)
    return buf.getvalue()


def place(root: Path, bundle: Path, spec: bytes) -> None:
    """Move the verified files of ``root`` into the new container's ``bundle`` (renames,
    on one filesystem) and write its runtime spec ``spec``.

    network.status stays out: podman's import with a name (ctrmig always names the
    container) does not ask for the recorded addresses either."""
    skip = {MANIFEST_NAME, IMAGE_DIR, RUNTIME_SPEC.split("/")[0], CONFIG_DUMP, SPEC_DUMP,
            NETWORK_STATUS}
    for entry in sorted(root.iterdir()):
        if entry.name in skip:
            continue
        dest = bundle / entry.name
        if entry.is_dir() and dest.is_dir():  # artifacts/: podman made it already
            for child in entry.iterdir():
                shutil.move(child, dest / child.name)
        else:
            shutil.move(entry, dest)
    tmp = bundle / "config.json.ctrmig"
    tmp.write_bytes(spec)
    tmp.replace(bundle / "config.json")


def runtime_spec(text: bytes, old: Mapping[str, Any], new: Mapping[str, str]) -> bytes:
    """The source's runtime spec with the source container's own directories (bundle,
    run dir, rootfs layer) replaced by the new container's."""
    moves = [(str(old[k]), new[k]) for k in PATH_KEYS if old.get(k) and new.get(k)]

    def moved(path: str) -> str:
        path = posixpath.normpath(path)  # no "..": a moved path stays below its new dir
        for before, after in moves:
            if path == before or path.startswith(before + "/"):
                return after + path[len(before):]
        return path

    spec = json.loads(text)  # judged a dict already (DirectTarget._check_archive)
    root = spec.get("root") if isinstance(spec.get("root"), dict) else {}
    if not isinstance(root.get("path"), str) or moved(root["path"]) == posixpath.normpath(
            root["path"]):
        raise RestoreError(f"the archive's rootfs path {root.get('path')!r} is not below "
                           "the source container's layer; cannot restore it in place")
    root["path"] = moved(root["path"])
    for mount in spec.get("mounts") or []:
        if isinstance(mount, dict) and isinstance(mount.get("source"), str):
            mount["source"] = moved(mount["source"])
    return json.dumps(spec).encode()
