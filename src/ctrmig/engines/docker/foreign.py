"""podman's and runc's archives restored by docker: the foreign dialect of the docker engine.

The new container is created from a body made of the neutral description (the process,
hostname, masked paths, binds) instead of a recorded inspect document, then filled and
started from the checkpoint like every docker restore. dockerd makes its own /etc/hosts,
/etc/resolv.conf, /etc/hostname and (with a shareable IPC namespace) /dev/shm; podman's
/run/.containerenv, which docker has no file for, is bound from /dev/null.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrmig.archive import Manifest
from ctrmig.archive.criu_images import NETNS_NAME, external_netns
from ctrmig.archive.layout import CHECKPOINT_DIR, volume_member
from ctrmig.archive.portable import ENGINE_FILES, Portable, covers, provided_by, write_images
from ctrmig.engines.docker import config, volumes
from ctrmig.errors import UntranslatableError
from ctrmig.protocol import RestoreOptions

if TYPE_CHECKING:
    from ctrmig.engines.docker.migrator import DockerMigrator

CONTAINERENV = "/run/.containerenv"


def check(foreign: Portable, opts: RestoreOptions) -> None:
    """Refuse what docker cannot give the foreign archive, before any dockerd call."""
    mounts = foreign.oci_mounts({b.destination: "-" for b in foreign.binds})
    provided = provided_by(mounts, foreign.masked_paths or ["/proc/keys"]) | set(ENGINE_FILES)
    missing = [k for k in foreign.external if not covers(provided, k)]
    if missing:
        raise UntranslatableError(
            f"the {foreign.writer} archive's memory image needs mounts docker cannot "
            f"provide: {', '.join(missing)}", hint=f"restore it with --engine {foreign.home}")


def create_body(foreign: Portable, publish: tuple[str, ...] = ()) -> dict[str, Any]:
    """The POST /containers/create body of the new container; ``publish`` as for
    ``docker run -p`` (the source's own ports are not translated)."""
    binds = [f"{b.source}:{b.destination}:{'ro' if b.readonly else 'rw'}"
             for b in foreign.binds if b.kind in ("host", "volume")]
    if any(b.destination == CONTAINERENV for b in foreign.engine_files()):
        binds.append(f"/dev/null:{CONTAINERENV}:ro")
    host: dict[str, Any] = {"Binds": binds, "MaskedPaths": foreign.masked_paths,
                            "ReadonlyPaths": foreign.readonly_paths}
    if "/dev/shm" in foreign.external:  # dockerd binds /dev/shm only for a shareable IPC
        host["IpcMode"] = "shareable"
    if foreign.additional_gids:
        host["GroupAdd"] = [str(g) for g in foreign.additional_gids]
    body = {"Image": foreign.image, "Entrypoint": foreign.args[:1], "Cmd": foreign.args[1:],
            "Env": foreign.env, "WorkingDir": foreign.cwd, "User": foreign.user,
            "Hostname": foreign.hostname, "HostConfig": host}
    if publish:
        body["ExposedPorts"], host["PortBindings"] = config.port_bindings(publish)
    return body


def restore(m: DockerMigrator, source: Path, manifest: Manifest, foreign: Portable,
            opts: RestoreOptions) -> str:
    """Restore the verified, extracted foreign archive ``source`` as ``opts.name``."""
    assert opts.name is not None
    m._ensure_foreign_image(source, manifest, foreign)
    carried = [] if opts.ignore_volumes else [
        volumes.Volume(name=b.source, destination=b.destination, rw=not b.readonly,
                       member=volume_member(b.source)
                       if volume_member(b.source) in manifest.files else None)
        for b in foreign.binds if b.kind == "volume"]
    images = source / CHECKPOINT_DIR
    write_images(foreign, images)  # the extracted copy is ours
    for netns in images.glob("netns-*.img"):
        # dockerd's runc makes the container's network namespace itself and restores
        # into it as into an empty one: an external one recorded would wait for a
        # namespace nobody hands over ("criu failed: type NOTIFY errno 0", seen).
        if NETNS_NAME.fullmatch(netns.name) and external_netns(netns.read_bytes()):
            netns.unlink()
    vols = volumes.Restorer(m.api, source, carried, replace=opts.replace_volumes,
                            label=opts.name)
    with vols.created():
        return m._restore_into(source, create_body(foreign, opts.publish_ports), opts.name,
                               vols, opts)
