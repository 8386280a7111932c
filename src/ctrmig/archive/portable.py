"""The engine-neutral description of a checkpointed container, for cross-engine restore.

Every engine's archive carries spec.dump, the OCI runtime spec the container ran with,
and CRIU's images of its mount tree. :func:`describe` reads those (never the writer's
config.dump) plus the manifest's container record and volume records into a
:class:`Portable`: the process, the hostname, and each mount sorted by who must provide
it on the target. Each engine's ``foreign`` module turns a Portable into its own dialect.

What cannot be carried across engines is refused here, before any engine call
(:class:`~ctrmig.errors.UntranslatableError`): a plain process, a terminal, namespaces
joined from a pod or another container, a mount CRIU recorded that no rule provides.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ctrmig.archive import foreign
from ctrmig.archive.criu_images import (
    FILES_IMAGE,
    MAX_FILES_BYTES,
    MOUNTPOINTS_NAME,
    MountPoint,
    read_mountpoints,
    root_mode,
    without_outside_masters,
    without_root_mode,
)
from ctrmig.archive.jsondoc import as_dict as _dict
from ctrmig.archive.jsondoc import json_object as _json
from ctrmig.archive.layout import CHECKPOINT_DIR, DEVSHM, SPEC_DUMP
from ctrmig.archive.manifest import Manifest
from ctrmig.archive.spool import read_members
from ctrmig.errors import ArchiveError, RestoreError, UntranslatableError

#: The container engines a Portable translates between.
CONTAINER_ENGINES = ("podman", "docker", "runc")
#: Writers of archives a Portable is read from but that no engine here writes: CRI-O's
#: (and the kubelet's) checkpoint archives, restored natively by podman.
READ_ONLY_WRITERS = (foreign.CRIO,)
#: Where the kubelet keeps what it binds into a pod's containers (the service account's
#: token, /dev/termination-log, emptyDir and other volumes): nothing outside that pod
#: provides them.
KUBELET_DIR = "/var/lib/kubelet/"
#: Files and directories an engine makes for each container and binds in: the target
#: makes its own. podman binds all five; docker all but .containerenv.
ENGINE_FILES: dict[str, Literal["file", "dir"]] = {
    "/etc/hosts": "file", "/etc/resolv.conf": "file", "/etc/hostname": "file",
    "/run/.containerenv": "file", "/dev/shm": "dir",
}
#: runc binds /dev/null over each masked file; CRIU records it under this key.
MASK_KEY = "/dev/null"
CGROUP_ROOT = "/sys/fs/cgroup"
#: Namespaces a Portable may name by path: the network one, which every engine treats as
#: external to the checkpoint (CRIU neither dumps nor restores it), and the target joins
#: a namespace of its own. Any other joined namespace belongs to a pod or a container.
EXTERNAL_NAMESPACES = frozenset({"network"})

BindKind = Literal["engine", "host", "volume"]


@dataclass(frozen=True)
class Bind:
    """A bind mount of the source container, by who provides it on the target:
    ``engine`` (a file the target makes: :data:`ENGINE_FILES`), ``host`` (a host path,
    bound as is) or ``volume`` (a named volume of the manifest, by ``source`` = name)."""

    destination: str
    kind: BindKind
    source: str = ""
    readonly: bool = False

    @property
    def is_dir(self) -> bool:
        return self.kind != "engine" or ENGINE_FILES[self.destination] == "dir"


@dataclass(frozen=True)
class Portable:
    """A checkpointed container as every engine can restore it."""

    writer: str
    name: str
    image: str
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]
    hostname: str
    #: The spec's mounts that are not binds (proc, sysfs, tmpfs, cgroup, ...), as OCI.
    mounts: list[dict[str, Any]]
    binds: list[Bind]
    masked_paths: list[str]
    readonly_paths: list[str]
    #: The external mounts CRIU recorded (its keys): the target must provide each.
    external: list[str]
    #: The archive member holding /dev/shm's content (podman's), if any.
    devshm: str | None = None
    #: The mode CRIU expects of the root directory (the target's rootfs must match).
    root_mode: int | None = None
    #: CRIU images to restore from in place of the archive's (member -> bytes): files.img
    #: without the root directory's mode, for targets that cannot set it; mount trees
    #: without sharing outside the dump (see :mod:`~ctrmig.archive.criu_images`).
    images: dict[str, bytes] = field(default_factory=dict)
    #: The spec.dump itself (judged for privileges as the writer's own restore would).
    spec: dict[str, Any] = field(default_factory=dict)
    volumes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def home(self) -> str:
        """The engine that restores the archive without translating it."""
        return "podman" if self.writer in READ_ONLY_WRITERS else self.writer

    @property
    def user(self) -> str:
        return f"{self.uid}:{self.gid}"

    def engine_files(self) -> list[Bind]:
        return [b for b in self.binds if b.kind == "engine"]

    def require(self, provided: Iterable[str], target: str) -> None:
        """Refuse unless every external mount CRIU recorded is in ``provided`` (keys the
        target's restore maps), naming the ones missing."""
        have = set(provided)
        missing = [k for k in self.external if k not in have]
        if missing:
            raise UntranslatableError(
                f"the {self.writer} archive's memory image needs mounts the {target} "
                f"engine cannot provide: {', '.join(missing)}",
                hint=f"restore it with --engine {self.home}")

    def oci_mounts(self, sources: Mapping[str, str]) -> list[dict[str, Any]]:
        """The spec's mounts for the target: the non-bind ones as recorded, each bind
        from ``sources`` (destination -> the target's host path)."""
        out = [dict(m) for m in self.mounts]
        for b in self.binds:
            opts = ["rbind", "ro" if b.readonly else "rw"]
            out.append({"destination": b.destination, "type": "bind",
                        "source": sources[b.destination], "options": opts})
        return out


def provided_by(mounts: Iterable[Mapping[str, Any]], masked: Iterable[str]) -> set[str]:
    """The external-mount keys an OCI runtime's restore maps for a spec with ``mounts``
    and ``masked`` paths (runc's rules: each bind by its destination, /dev/null once any
    path is masked, each cgroup v1 hierarchy under a cgroup mount)."""
    keys: set[str] = set()
    for m in mounts:
        dest = str(m.get("destination", ""))
        if m.get("type") == "bind" or "bind" in (m.get("options") or ()) \
                or "rbind" in (m.get("options") or ()):
            keys.add(dest)
        elif m.get("type") == "cgroup":
            keys.add(f"{dest}/*")
    if list(masked):
        keys.add(MASK_KEY)
    return keys


def covers(provided: set[str], key: str) -> bool:
    """Whether ``provided`` (from :func:`provided_by`) maps external mount ``key``."""
    return key in provided or f"{posixpath.dirname(key)}/*" in provided


def describe(manifest: Manifest, members: Mapping[str, bytes]) -> Portable:
    """The Portable of an archive, from its small members' bytes (spec.dump and the
    mountpoints images); UntranslatableError or ArchiveError if there is none."""
    writer = manifest.engine
    home = foreign.restore_engine(manifest)
    if writer not in CONTAINER_ENGINES + READ_ONLY_WRITERS:
        raise UntranslatableError(
            f"a {writer} archive holds no container, so no container engine can restore it",
            hint=f"restore it with --engine {writer}")
    if SPEC_DUMP not in members:
        raise UntranslatableError(f"the {writer} archive has no {SPEC_DUMP}: nothing says "
                                  "how its container ran", hint=f"restore it with --engine "
                                  f"{home}")
    if not manifest.container.image:
        raise UntranslatableError(f"the {writer} archive names no image")
    spec = _json(SPEC_DUMP, members[SPEC_DUMP])
    if writer == foreign.CRIO:
        spec = _outside_the_pod(spec)
    process, linux = _dict(spec.get("process")), _dict(spec.get("linux"))
    if process.get("terminal"):
        raise UntranslatableError(
            "the container ran with a terminal, which only its own engine can hand back",
            hint=f"restore it with --engine {home}")
    _refuse_joined(linux.get("namespaces"), home)
    args = _strings(process.get("args"), "process.args")
    if not args:
        raise ArchiveError(f"{SPEC_DUMP} has no process.args")
    user = _dict(process.get("user"))
    volumes = [v for v in _list(manifest.extra.get("volumes")) if isinstance(v, dict)]
    by_dest = {str(v.get("destination")): v for v in volumes if v.get("kind", "volume")
               == "volume"}
    tree = [m for name, data in members.items()
            if MOUNTPOINTS_NAME.fullmatch(posixpath.basename(name))
            for m in read_mountpoints(data, name)]
    files = f"{CHECKPOINT_DIR}/{FILES_IMAGE}"
    mounts, binds = [], []
    for m in map(_dict, _list(spec.get("mounts"))):
        dest = posixpath.normpath(str(m.get("destination", "")))
        if not dest.startswith("/"):
            raise ArchiveError(f"{SPEC_DUMP} has a mount at {dest!r}, not an absolute path")
        options = _strings(m.get("options") or [], "mount options")
        if m.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            mounts.append({**m, "destination": dest})
            continue
        readonly = "ro" in options
        if ":" in dest or "," in dest:  # docker's Binds and podman's -v split on them
            raise ArchiveError(f"{SPEC_DUMP} has a mount at {dest[:100]!r}: no engine binds it")
        if dest in ENGINE_FILES:
            binds.append(Bind(dest, "engine", readonly=readonly))
        elif dest in by_dest:
            binds.append(Bind(dest, "volume", _checked_volume(by_dest[dest].get("name")),
                              readonly))
        elif volume := _volume_name(str(m.get("source", ""))):
            binds.append(Bind(dest, "volume", volume, readonly))
        else:
            source = posixpath.normpath(str(m.get("source", "")))
            if not source.startswith("/") or ":" in source or "," in source:
                raise ArchiveError(f"{SPEC_DUMP} binds {source[:100]!r}, not a plain host path")
            binds.append(Bind(dest, "host", source, readonly))
    return Portable(
        writer=writer, name=manifest.container.name, image=manifest.container.image,
        args=args, env=_strings(process.get("env") or [], "process.env"),
        cwd=str(process.get("cwd") or "/"), uid=_int(user.get("uid")),
        gid=_int(user.get("gid")),
        additional_gids=[_int(g) for g in _list(user.get("additionalGids"))],
        hostname=str(spec.get("hostname") or manifest.container.name)[:63],
        mounts=mounts, binds=binds,
        masked_paths=_strings(linux.get("maskedPaths") or [], "maskedPaths"),
        readonly_paths=_strings(linux.get("readonlyPaths") or [], "readonlyPaths"),
        external=sorted({m.external for m in tree if m.external}),
        root_mode=root_mode(members[files], tree) if files in members else None,
        images=_images(members, tree),
        devshm=DEVSHM if DEVSHM in manifest.files else None,
        spec=spec, volumes=volumes,
    )


def _outside_the_pod(spec: dict[str, Any]) -> dict[str, Any]:
    """A CRI-O container's spec without its pod: the paths of the pod's namespaces gone
    (as for podman, :func:`~ctrmig.archive.foreign.podman_spec`; a shared PID namespace
    refused), and refused if the kubelet bound anything in but the files every engine
    makes (/etc/hosts: the kubelet's; /etc/hostname, /etc/resolv.conf, /dev/shm:
    CRI-O's)."""
    try:
        spec = foreign.podman_spec(spec)
    except RestoreError as e:
        raise UntranslatableError(e.message, hint=e.hint) from None
    kubelet = [f"{m.get('destination')} (from {m.get('source')})"
               for m in map(_dict, _list(spec.get("mounts")))
               if str(m.get("source", "")).startswith(KUBELET_DIR)
               and posixpath.normpath(str(m.get("destination", ""))) not in ENGINE_FILES]
    if kubelet:
        raise UntranslatableError(
            "the CRI-O container has mounts only its kubelet provides: "
            f"{', '.join(kubelet[:4])}{' ...' if len(kubelet) > 4 else ''}",
            hint="restore it into its pod with CRI-O (kubectl), or checkpoint a container "
                 "without service account token, termination log or kubelet volumes")
    return spec


def members_wanted(manifest: Manifest) -> list[str]:
    """The archive members :func:`describe` reads."""
    trees = [n for n in manifest.files if n.startswith(f"{CHECKPOINT_DIR}/")
             and MOUNTPOINTS_NAME.fullmatch(posixpath.basename(n))]
    return [SPEC_DUMP, f"{CHECKPOINT_DIR}/{FILES_IMAGE}", *trees]


def load(source: Path, manifest: Manifest, *, extracted: bool) -> Portable:
    """:func:`describe` of a verified archive: ``source`` is the extracted directory
    (``extracted``) or the archive file."""
    wanted = [n for n in members_wanted(manifest) if n in manifest.files]
    if extracted:
        members = {}
        for n in wanted:
            with (source / n).open("rb") as f:
                members[n] = f.read(MAX_FILES_BYTES + 1)
            if len(members[n]) > MAX_FILES_BYTES:
                raise ArchiveError(f"{n} is implausibly large")
    else:
        members = read_members(source, manifest, wanted, max_bytes=MAX_FILES_BYTES)
    return describe(manifest, members)


def _images(members: Mapping[str, bytes], tree: list[MountPoint]) -> dict[str, bytes]:
    images = {name: without_outside_masters(data, name) for name, data in members.items()
              if MOUNTPOINTS_NAME.fullmatch(posixpath.basename(name))}
    files = f"{CHECKPOINT_DIR}/{FILES_IMAGE}"
    if files in members:
        images[files] = without_root_mode(members[files], tree)
    return {n: data for n, data in images.items() if data != members[n]}


def write_images(foreign: Portable, images: Path) -> None:
    """Put ``foreign``'s replaced CRIU images into the image directory ``images`` (a copy
    the restore owns, e.g. the extracted archive's checkpoint/)."""
    for member, data in foreign.images.items():
        path = images / posixpath.basename(member)
        path.unlink(missing_ok=True)  # a new file: never write through a link
        path.write_bytes(data)


#: A named volume of podman's or docker's local driver, as a bind source in the spec:
#: podman records its volumes nowhere else that ctrmig reads (only in its config.dump).
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VOLUME_SOURCE = re.compile(rf"/.+/volumes/({VOLUME_NAME.pattern})/_data")


def _checked_volume(name: object) -> str:
    if not isinstance(name, str) or not VOLUME_NAME.fullmatch(name):
        raise ArchiveError(f"the manifest names an invalid volume: {str(name)[:100]!r}")
    return name


def _volume_name(source: str) -> str:
    match = _VOLUME_SOURCE.fullmatch(posixpath.normpath(source))
    return match.group(1) if match else ""


def joined_namespaces(namespaces: object) -> list[str]:
    """The namespaces an OCI spec's ``linux.namespaces`` joins that another engine cannot
    recreate (those of a pod or another container; the network one is external)."""
    return [str(ns.get("type")) for ns in map(_dict, _list(namespaces))
            if ns.get("path") and ns.get("type") not in EXTERNAL_NAMESPACES]


def _refuse_joined(namespaces: object, writer: str) -> None:
    joined = joined_namespaces(namespaces)
    if joined:
        raise UntranslatableError(
            f"the container shared its {', '.join(joined)} namespace(s) with a pod or "
            "another container, which another engine cannot recreate",
            hint=f"restore it with --engine {writer}, into the same pod")


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArchiveError(f"{SPEC_DUMP}: {what} must be a list of strings")
    return list(value)


def _int(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArchiveError(f"{SPEC_DUMP}: bad id {value!r}")
    return value
