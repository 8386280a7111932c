"""runc's and docker's archives restored by podman: the foreign dialect of the podman engine.

podman's import (``POST /containers/import/restore``) creates the container from the
archive's config.dump (libpod's ContainerConfig) and spec.dump, and restores it with the
spec.dump as its runtime spec, adding its own bind mounts (/etc/hosts, /etc/resolv.conf,
/etc/hostname, /run/.containerenv, /dev/shm) where the spec has none
(libpod's restore(), podman 4.3 and 5.x alike). So ctrmig sends podman an archive in
podman's dialect: a config.dump made from the neutral description, and the source's
spec.dump without what belonged to its engine (those binds, hooks, cgroup path, the
security labels of another host); the CRIU images, rootfs diff and volumes as they are.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrmig.archive import ArchiveWriter, Manifest
from ctrmig.archive.layout import (
    CONFIG_DUMP,
    IMAGE_DIR,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SPEC_DUMP,
    volume_member,
)
from ctrmig.archive.portable import ENGINE_FILES, Portable, covers, provided_by
from ctrmig.archive.reader import decompressed
from ctrmig.archive.streams import CHUNK
from ctrmig.errors import UntranslatableError
from ctrmig.protocol import RestoreOptions

if TYPE_CHECKING:
    from ctrmig.engines.podman.migrator import PodmanMigrator

#: The members podman's import gets as they are: all but the two made here, ctrmig's
#: own (manifest, its signature, a carried image, podman's runtime spec of the source).
_LEFT_OUT = (CONFIG_DUMP, SPEC_DUMP, MANIFEST_NAME, SIGNATURE_NAME)
_LEFT_OUT_DIRS = (f"{IMAGE_DIR}/", "ctrmig/")
#: podman's default /dev/shm size (64 MB, as `podman run` without --shm-size).
SHM_SIZE = 65536000
#: podman's default storage (rootful), where it keeps named volumes.
DEFAULT_STORE = "/var/lib/containers/storage"


def check(foreign: Portable, opts: RestoreOptions) -> None:
    """Refuse what podman cannot give the foreign archive, before any podman call."""
    spec = spec_dump(foreign)
    provided = provided_by(spec["mounts"], foreign.masked_paths) | set(ENGINE_FILES)
    missing = [k for k in foreign.external if not covers(provided, k)]
    if missing:
        raise UntranslatableError(
            f"the {foreign.writer} archive's memory image needs mounts podman cannot "
            f"provide: {', '.join(missing)}", hint=f"restore it with --engine {foreign.home}")


def spec_dump(foreign: Portable, volumes_dir: str = "/volumes") -> dict[str, Any]:
    """The spec.dump podman restores with: the source's, without its engine's parts;
    named volumes bound from podman's ``volumes_dir`` (podman binds them as they are in
    the spec)."""
    spec: dict[str, Any] = json.loads(json.dumps(foreign.spec))  # a deep copy
    for key in ("hooks", "annotations"):
        spec.pop(key, None)
    spec["hostname"] = foreign.hostname
    spec["root"] = {"path": "", "readonly": bool((spec.get("root") or {}).get("readonly"))}
    process = spec.setdefault("process", {})
    for key in ("apparmorProfile", "selinuxLabel"):
        process.pop(key, None)
    process["terminal"] = False
    linux = spec.setdefault("linux", {})
    for key in ("cgroupsPath", "mountLabel"):
        linux.pop(key, None)
    # podman joins the network namespace it makes (the path replaced on restore).
    linux["namespaces"] = [ns if ns.get("type") != "network" else {"type": "network"}
                           for ns in linux.get("namespaces") or []]
    sources = {b.destination: b.source if b.kind == "host"
               else f"{volumes_dir}/{b.source}/_data" for b in foreign.binds}
    engine = {b.destination for b in foreign.binds if b.kind == "engine"}
    spec["mounts"] = [m for m in foreign.oci_mounts({**sources, **dict.fromkeys(engine, "")})
                      if m["destination"] not in engine]
    return spec


def config_dump(foreign: Portable, name: str, image_id: str, volumes_dir: str,
                container_id: str = "") -> dict[str, Any]:
    """libpod's ContainerConfig for the new container (the fields podman 4.3 and 5.x read
    on import; podman fills in the rest as for a new container). ``container_id`` empty:
    podman makes one (it must, for a restore under a new name); a restore under the
    recorded name refuses any other ID than the recorded one."""
    volumes = [b for b in foreign.binds if b.kind == "volume"]
    return {
        "id": container_id,
        "name": name,
        "rootfsImageID": image_id,
        "rootfsImageName": foreign.image,
        "idMappingsOptions": {"HostUIDMapping": True, "HostGIDMapping": True},
        "shmSize": SHM_SIZE,
        "createWorkingDir": True,
        "passwd": False,  # podman 5 would bind an /etc/passwd the dump never saw
        "namedVolumes": [{"volumeName": b.source, "dest": b.destination,
                          "options": ["ro"] if b.readonly else []} for b in volumes],
        "createNetNS": True,
        "networkMode": "bridge",
        "newNetworks": {"podman": {"interface_name": "eth0"}},
        "command": foreign.args,
        "user": foreign.user,
        "stopSignal": 15,
        "stopTimeout": 10,
        "createdTime": _dt.datetime.now(_dt.UTC).isoformat(),
        "logDriver": "k8s-file",
        "umask": "0022",
        "spec": spec_dump(foreign, volumes_dir),
    }


def members(foreign: Portable, name: str, image_id: str, volumes_dir: str,
            container_id: str = "") -> dict[str, bytes]:
    """The members podman reads in place of the foreign archive's: config.dump and
    spec.dump in its dialect, and the CRIU images edited for it (files.img without the
    root directory's mode, mount trees without sharing outside the dump)."""
    config = config_dump(foreign, name, image_id, volumes_dir, container_id)
    return {CONFIG_DUMP: json.dumps(config).encode(),
            SPEC_DUMP: json.dumps(config["spec"]).encode(), **foreign.images}


def restore(m: PodmanMigrator, source: Path, manifest: Manifest, foreign: Portable,
            opts: RestoreOptions) -> str:
    """Import the verified foreign archive ``source`` (extracted directory or archive
    file) into podman as ``opts.name``."""
    assert opts.name is not None
    m._ensure_foreign_image(source, manifest, foreign)
    image_id = str(m._get(f"/images/{foreign.image}/json", "podman image inspect")["Id"])
    store = (m.info().get("store") or {}).get("graphRoot") or DEFAULT_STORE
    replaced = members(foreign, opts.name, image_id, f"{store}/volumes")
    carried = {volume_member(b.source) for b in foreign.binds if b.kind == "volume"}

    def keep(name: str) -> bool:
        if name in _LEFT_OUT or name.startswith(_LEFT_OUT_DIRS):
            return False
        if name in foreign.images:
            return False
        return not name.startswith("volumes/") or (name in carried and not opts.ignore_volumes)

    read_fd, write_fd = os.pipe()
    failed: list[BaseException] = []

    def pack() -> None:
        try:
            with os.fdopen(write_fd, "wb", CHUNK) as out:
                writer = ArchiveWriter(out)
                for member, data in replaced.items():
                    writer.add_bytes(member, data)
                if source.is_dir():
                    for name in sorted(n for n in manifest.files if keep(n)):
                        writer.add_file(name, source / name)
                else:
                    with source.open("rb") as f:
                        writer.copy_tar(decompressed(f)[0], keep=keep)
                writer.close()
        except OSError:
            pass  # podman stopped reading: its answer says why
        except BaseException as e:
            failed.append(e)

    packer = threading.Thread(target=pack, name="ctrmig-pack-foreign", daemon=True)
    packer.start()
    try:
        with os.fdopen(read_fd, "rb", CHUNK) as body:
            name = m._import(body, opts)
    finally:
        packer.join()
    if failed:
        with contextlib.suppress(Exception):
            m.remove(name)
        raise failed[0]
    return name
