"""podman's and docker's archives restored by runc: the foreign dialect of the runc engine.

The bundle is ctrmig's own (overlay rootfs on the unpacked image, a network namespace of
its own, a cgroup of its own), its process the archive's (:class:`~ctrmig.archive.portable.
Portable`), and its mounts the source's spec.dump ones: CRIU rebuilds the mount tree it
recorded and needs each external mount it saw there. The files the source engine bound in
(/etc/hosts, /etc/resolv.conf, /etc/hostname, podman's /run/.containerenv, /dev/shm) are
made fresh in the bundle, named volumes become the runc engine's volumes, host paths stay.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrmig.archive import Manifest
from ctrmig.archive.layers import apply_deleted, read_deleted
from ctrmig.archive.layout import CHECKPOINT_DIR, DELETED_FILES, volume_member
from ctrmig.archive.portable import (
    ENGINE_FILES,
    Portable,
    covers,
    provided_by,
    write_images,
)
from ctrmig.engines.runc.volumes import Mount, missing_binds
from ctrmig.errors import ArchiveError, UntranslatableError
from ctrmig.protocol import RestoreOptions

if TYPE_CHECKING:
    from ctrmig.engines.runc.migrator import RuncMigrator

#: Where the bundle keeps the files it binds in place of the source engine's.
FILES_DIR = "foreign"


def check(foreign: Portable, opts: RestoreOptions) -> None:
    """Refuse what a runc bundle cannot give the foreign archive, before any runc call."""
    mounts = foreign.oci_mounts({b.destination: "-" for b in foreign.binds})
    provided = provided_by(mounts, foreign.masked_paths)
    missing = [k for k in foreign.external if not covers(provided, k)]
    if missing:
        raise UntranslatableError(
            f"the {foreign.writer} archive's memory image needs mounts that its spec.dump "
            f"does not name: {', '.join(missing)}",
            hint=f"restore it with --engine {foreign.home}")
    if opts.lazy_pages or opts.page_images:
        raise UntranslatableError("the direct route and lazy pages need a runc archive")


def restore(m: RuncMigrator, source: Path, manifest: Manifest, foreign: Portable,
            opts: RestoreOptions) -> str:
    """Restore the verified, extracted foreign archive ``source`` as runc container
    ``opts.name``; nothing of it is left if this fails."""
    from ctrmig.engines.runc.migrator import _volume_users  # it imports this module

    assert opts.name is not None
    name = opts.name
    img = _image(m, source, manifest, foreign)
    volumes = [Mount("volume", b.destination, name=b.source, readonly=b.readonly)
               for b in foreign.binds if b.kind == "volume"]
    hosts = [Mount("bind", b.destination, source=b.source, readonly=b.readonly)
             for b in foreign.binds if b.kind == "host"]
    missing_binds(hosts)
    prepared = m.volumes.restore(
        volumes, source, lambda v: not opts.ignore_volumes and volume_member(v) in
        manifest.files, replace=opts.replace_volumes,
        users=lambda v: _volume_users(m, v))
    sources = {r["destination"]: r["source"] for r in m.volumes.sources(volumes)}
    process = {"args": foreign.args, "env": foreign.env, "cwd": foreign.cwd,
               "uid": foreign.uid, "gid": foreign.gid, "hostname": foreign.hostname}
    meta = {"name": name, "image": foreign.image, "transport_ref": img.transport_ref,
            "digest": img.digest, "process": process, "created": manifest.created,
            "restored_from": f"{foreign.name} ({foreign.writer})",
            "volumes": [*m.volumes.sources(volumes), *m.volumes.sources(hosts)]}

    def adjust(spec: dict[str, Any], bundle: Path) -> None:
        files = bundle / FILES_DIR
        files.mkdir(mode=0o755)
        binds = dict(sources)
        for b in foreign.binds:
            if b.kind == "engine":
                binds[b.destination] = str(_engine_file(files, b.destination, foreign))
            elif b.kind == "host":
                binds[b.destination] = b.source
        spec["mounts"] = foreign.oci_mounts(binds)
        linux = spec.setdefault("linux", {})
        linux["maskedPaths"] = foreign.masked_paths
        linux["readonlyPaths"] = foreign.readonly_paths
        if foreign.additional_gids:
            spec["process"]["user"]["additionalGids"] = foreign.additional_gids

    def prepare(bundle: Path) -> None:
        write_images(foreign, source / CHECKPOINT_DIR)  # the extracted copy is ours
        apply_deleted(read_deleted(source / DELETED_FILES), bundle / "rootfs")
        if foreign.root_mode is not None:  # CRIU checks it ("File . has bad mode")
            os.chmod(bundle / "rootfs", stat.S_IMODE(foreign.root_mode))
        if foreign.devshm and (source / foreign.devshm).is_file():
            _extract_devshm(source / foreign.devshm, bundle / FILES_DIR / "shm")

    return m._restore_bundle(source, manifest, opts, img.rootfs, meta, prepared,
                             adjust=adjust, prepare=prepare)


def _image(m: RuncMigrator, source: Path, manifest: Manifest, foreign: Portable) -> Any:
    """The unpacked image: from the archive if it carries one (podman's oci-archive,
    docker's docker-archive: skopeo reads both), else from the local stores."""
    carried = manifest.extra.get("image_archive")
    if (isinstance(carried, dict) and carried.get("member") in manifest.files
            and not m.images.has(foreign.image)):
        fmt = str(carried.get("format"))
        if fmt not in ("oci-archive", "docker-archive"):
            raise ArchiveError(f"the archive carries its image as {fmt!r}, which skopeo "
                               "cannot read")
        return m.images.get(foreign.image, f"{fmt}:{source / str(carried['member'])}")
    return m.images.get(foreign.image)


def _engine_file(files: Path, destination: str, foreign: Portable) -> Path:
    """A fresh file (or /dev/shm's directory) for ``destination``, owned by the bundle."""
    name = destination.rsplit("/", 1)[-1].lstrip(".") or "root"
    path = files / name
    if ENGINE_FILES[destination] == "dir":
        path.mkdir(mode=0o1777)
        path.chmod(0o1777)
        return path
    content = {
        "/etc/hostname": f"{foreign.hostname}\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{foreign.hostname}\n",
        "/etc/resolv.conf": _host_resolv_conf(),
        "/run/.containerenv": "",
    }[destination]
    path.write_text(content)
    path.chmod(0o644)
    return path


def _host_resolv_conf() -> str:
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""


def _extract_devshm(member: Path, dest: Path) -> None:
    """podman's /dev/shm content into the new /dev/shm (tarfile's data filter: nothing
    lands outside ``dest``, no devices)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(member) as tar:
        tar.extractall(tmp, filter="data")
        for child in Path(tmp).iterdir():
            shutil.move(str(child), dest / child.name)

