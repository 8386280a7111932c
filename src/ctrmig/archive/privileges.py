"""What a checkpointed container asks of the host it is restored on.

A restore runs the archive's configuration with the target's root privileges, so an
archive from elsewhere must not quietly get more than an ordinary container:
:func:`requests` lists what reaches beyond one, :func:`check` refuses it unless the
caller passed ``allow_privileged``. The choices, deliberately:

* **privileged**: podman's ``privileged`` (config.dump or its spec annotation), docker's
  ``HostConfig.Privileged``.
* **capability**: any capability outside the default set below, in any of the spec's
  capability sets (docker: ``CapAdd``). The default set is podman's (containers.conf, the
  same as the OCI runtime spec's template plus SETFCAP/SETPCAP...) united with docker's
  three extras, AUDIT_WRITE, MKNOD and NET_RAW, so that an ordinary docker container is
  not flagged; MKNOD is harmless under the device cgroup, NET_RAW is the one docker
  default that podman dropped.
* **host path**: a bind mount whose source is a host path, i.e. not the container's own
  storage (``.../overlay-containers/<its id>/userdata`` for podman, ``.../containers/<its
  id>/`` for docker: hosts, resolv.conf, shm) and not a named volume (``.../volumes/<name>/
  _data``, of a volume the config names, or under podman's or docker's default roots);
  also a mount of any filesystem type that is not a kernel pseudo filesystem (an ``ext4``
  mount of ``/dev/vda1`` is the host's disk), and a writable ``/sys`` or cgroup mount.
* **namespace**: network, pid, ipc, uts or mount namespace missing from
  ``linux.namespaces`` (the host's is used), or joined by a ``/proc/...`` path (another
  process's). A missing user namespace is not flagged: rootful podman and docker run
  without one by default.
* **device**: a device node other than null, zero, full, random, urandom, tty, console
  and ptmx (judged by type and major:minor, not by path), or a device-cgroup rule
  allowing more than the runtimes' default rules (all devices, say).
* **unconfined**: no seccomp filter (or one allowing everything), AppArmor
  ``unconfined``, docker's ``seccomp=unconfined``/``apparmor=unconfined``/``label=disable``,
  and no masked /proc paths. SELinux labels are not judged (hosts differ too much).
* **group**: supplementary group 0 for a process that is not root already.

Which members count depends on the engine that restores (see :data:`RESTORE_MEMBERS`):
what the engine actually builds the container from, nothing else. runc takes only the
process and the volumes from its config.dump: each bind mount of a host path there is a
**host path**; a named volume is the container's own (ctrmig keeps it in runc's state dir,
and its content is whatever the archive carries).

What an archive declares is not all: CRIU restores every task's credentials from its
core-<pid>.img image, whatever the spec says (see :mod:`ctrmig.archive.criu_images`). So,
for every engine:

* **capability** (from the images): a task whose effective, permitted, inheritable or
  bounding set holds a capability outside the default set, unless the declared config
  asks for it already (a privileged container, or that capability).
* **host process**: a plain-process archive (engine ``process``) always: it runs on the
  host, outside any container, as whatever uid and capabilities its images hold.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrmig.archive.criu_images import (
    ALL_CAPABILITIES,
    CAPABILITY_NAMES,
    MAX_CORE_IMAGE_BYTES,
    Creds,
    capability_names,
    core_pid,
    read_core_creds,
)
from ctrmig.archive.jsondoc import as_dict as _dict
from ctrmig.archive.jsondoc import json_object as _json
from ctrmig.archive.layout import CONFIG_DUMP, SPEC_DUMP
from ctrmig.archive.manifest import Manifest
from ctrmig.archive.portable import Portable
from ctrmig.archive.reader import MAX_MANIFEST_BYTES, read_manifest
from ctrmig.archive.spool import read_members
from ctrmig.errors import ArchiveError, CriuImageError, PrivilegeError

log = logging.getLogger(__name__)

HINT = "pass --allow-privileged (allow_privileged=True) if you trust this archive"

#: The members each engine builds the restored container from. podman runs spec.dump
#: (config.dump says whether it was privileged); docker creates the container from
#: config.dump (its inspect document); runc restores on its own bundle template, taking
#: only the process and the volumes from config.dump (see :func:`runc_requests`), and the
#: process engine a plain process, which takes no privilege from the archive.
#: Engines not listed here: both members.
RESTORE_MEMBERS: dict[str, tuple[str, ...]] = {
    "podman": (SPEC_DUMP, CONFIG_DUMP),
    "docker": (CONFIG_DUMP,),
    "runc": (CONFIG_DUMP,),
    "process": (),
}

#: Podman's default capabilities (containers.conf) plus docker's AUDIT_WRITE, MKNOD, NET_RAW.
DEFAULT_CAPABILITIES = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    "AUDIT_WRITE", "MKNOD", "NET_RAW",
})
# Capabilities that amount to root on the host, worst first (listed first in errors).
_HOST_ROOT_CAPABILITIES = ("ALL", "SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE",
                           "DAC_READ_SEARCH", "NET_ADMIN", "BPF", "SYS_BOOT")
#: The same, as a bit mask of linux/capability.h bits.
DEFAULT_CAPABILITY_MASK = sum(1 << CAPABILITY_NAMES.index(c) for c in DEFAULT_CAPABILITIES)
#: All core images of one archive together (a task's is about 2 KiB).
MAX_CORE_IMAGES_BYTES = 128 << 20
#: Engines that restore a plain process on the host, not a container.
HOST_ENGINES = frozenset({"process"})
#: Namespaces a container must have of its own (missing = the host's).
OWN_NAMESPACES = ("network", "pid", "ipc", "uts", "mount")
#: (type, major, minor) of the device nodes every runtime creates.
DEFAULT_DEVICES = frozenset({("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                             ("c", 5, 0), ("c", 5, 1), ("c", 5, 2)})
#: Device-cgroup rules runc/crun/docker allow by default (minor None: any), beyond those.
DEFAULT_DEVICE_RULES = DEFAULT_DEVICES | {("c", 136, None), ("c", 10, 200)}
#: Kernel pseudo filesystems a container may mount (no host data behind them).
PSEUDO_FILESYSTEMS = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup",
                                "cgroup2", "shm", "none"})
DEFAULT_VOLUME_ROOTS = ("/var/lib/containers/storage/volumes/", "/var/lib/docker/volumes/")
_VOLUME = re.compile(r"/volumes/([^/]+)/_data(?:/|$)")
_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PrivilegeRequest:
    """One thing the container asks beyond an ordinary container, e.g. ("capability",
    "SYS_ADMIN")."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}"


def requests(spec: dict[str, Any], config: dict[str, Any] | None) -> list[PrivilegeRequest]:
    """What the OCI runtime ``spec`` (empty: none) and the engine's container ``config``
    (podman's config.dump or docker's inspect document) ask beyond an ordinary container.
    """
    config = config if isinstance(config, dict) else {}
    found: list[PrivilegeRequest] = []
    if spec:
        found += _spec_requests(spec, config)
    if isinstance(config.get("HostConfig"), dict):
        found += _docker_requests(config)
    elif config.get("privileged") is True:
        found.append(PrivilegeRequest("privileged", "podman --privileged"))
    return list(dict.fromkeys(found))  # unique, in order


def check(found: Iterable[PrivilegeRequest], allow_privileged: bool) -> None:
    """Raise PrivilegeError listing ``found`` unless it is empty or ``allow_privileged``."""
    found = list(found)
    if not found:
        return
    listed = summary(found)
    if not allow_privileged:
        raise PrivilegeError(f"the archive asks for more than an ordinary container: {listed}",
                             hint=HINT)
    log.warning("restoring an archive that asks for: %s (allowed)", listed)


def summary(found: Iterable[PrivilegeRequest], per_kind: int = 6) -> str:
    """One line: the requests grouped by kind, e.g. "capability SYS_ADMIN, NET_ADMIN;
    namespace host network"."""
    kinds: dict[str, list[str]] = {}
    for req in found:
        kinds.setdefault(req.kind, []).append(req.detail)
    parts = []
    for kind, details in kinds.items():
        more = f" and {len(details) - per_kind} more" if len(details) > per_kind else ""
        parts.append(f"{kind} {', '.join(details[:per_kind])}{more}")
    return "; ".join(parts)


def archive_requests(source: Path, manifest: Manifest, *, extracted: bool) -> list[
        PrivilegeRequest]:
    """What a verified archive asks of the engine that will restore it.

    ``source`` is the extracted directory (``extracted``) or the archive file.
    """
    names = RESTORE_MEMBERS.get(manifest.engine, (SPEC_DUMP, CONFIG_DUMP))
    cores = _core_members(manifest)
    wanted = [n for n in names if n in manifest.files]
    if extracted:
        raw = {n: _read_file(source / n) for n in wanted}
        images = {n: _read_file(source / n, MAX_CORE_IMAGE_BYTES) for n in cores}
    else:
        both = read_members(source, manifest, [*wanted, *cores])
        raw = {n: both[n] for n in wanted}
        images = {n: both[n] for n in cores}
    spec = _json(SPEC_DUMP, raw[SPEC_DUMP]) if SPEC_DUMP in raw else {}
    config = _json(CONFIG_DUMP, raw[CONFIG_DUMP]) if CONFIG_DUMP in raw else None
    declared = runc_requests(config) if manifest.engine == "runc" else requests(spec, config)
    declared += volume_requests(manifest.extra.get("volumes"))
    read = {n: read_core_creds(data, n) for n, data in images.items()}
    creds = {n: c for n, c in read.items() if c is not None}  # zombies hold nothing
    return declared + image_requests(creds, manifest.engine, declared)


def host_binds(foreign: Portable) -> list[PrivilegeRequest]:
    """The host paths a cross-engine restore of ``foreign`` binds into the container
    (its writer's engine files are made fresh, its volumes are volumes)."""
    return [PrivilegeRequest("host path", f"{b.source} at {b.destination}")
            for b in foreign.binds if b.kind == "host"]


def volume_requests(entries: object) -> list[PrivilegeRequest]:
    """Named volumes the manifest (``extra["volumes"]``, docker's) asks to create that are
    more than plain local ones: a driver plugin, or driver options (``local`` with
    ``o=bind,device=/`` mounts the host's root)."""
    found = []
    for v in map(_dict, _list(entries)):
        driver, options = str(v.get("driver") or "local"), _dict(v.get("options"))
        if v.get("kind", "volume") == "volume" and not v.get("anonymous") and (
                driver != "local" or options):
            listed = f", options {','.join(sorted(map(str, options)))}" if options else ""
            found.append(PrivilegeRequest("volume", f"{v.get('name')} ({driver} driver"
                                                    f"{listed})"))
    return found


def image_requests(creds: dict[str, Creds], engine: str,
                   declared: Iterable[PrivilegeRequest] = ()) -> list[PrivilegeRequest]:
    """What the tasks' credentials in the CRIU images (core image name -> creds) ask
    beyond an ordinary container, less what the ``declared`` requests cover already."""
    if engine in HOST_ENGINES:
        return [PrivilegeRequest("host process", _host_process(creds))]
    declared = list(declared)
    if any(r.kind == "privileged" for r in declared):
        return []  # a privileged container holds every capability anyway
    covered = {r.detail for r in declared if r.kind == "capability"}
    tasks: dict[tuple[str, ...], list[int]] = {}
    for name, c in sorted(creds.items(), key=lambda item: (core_pid(item[0]) or 0, item[0])):
        pid = core_pid(name) or 0
        held = c.cap_eff | c.cap_prm | c.cap_inh | c.cap_bnd
        caps = tuple(sorted(set(capability_names(held & ~DEFAULT_CAPABILITY_MASK)) - covered,
                            key=_cap_order))
        if caps and held & ALL_CAPABILITIES == ALL_CAPABILITIES:
            caps = ("ALL",)
        if caps:
            tasks.setdefault(caps, []).append(pid)
    found = []
    for caps, pids in tasks.items():
        who = (f"task {pids[0]} holds" if len(pids) == 1
               else f"tasks {_listed([str(p) for p in pids], 'more')} hold")
        where = "its CRIU image" if len(pids) == 1 else "their CRIU images"
        what = "all capabilities" if caps == ("ALL",) else _caps(caps)
        found.append(PrivilegeRequest("capability", f"{who} {what} in {where}"))
    return found


def _host_process(creds: dict[str, Creds]) -> str:
    """"runs on the host as uid 0 with all capabilities", from every task's creds."""
    if not creds:
        return "runs on the host"
    uids = sorted(set().union(*(c.uids for c in creds.values())))
    held = 0
    for c in creds.values():
        held |= c.cap_prm | c.cap_eff
    if held & ALL_CAPABILITIES == ALL_CAPABILITIES:
        caps = "all capabilities"
    elif not held:
        caps = "no capabilities"
    else:
        caps = _caps(tuple(sorted(capability_names(held), key=_cap_order)))
    return f"runs on the host as uid {_listed([str(u) for u in uids], 'more')} with {caps}"


def _caps(caps: tuple[str, ...]) -> str:
    return _listed([c if c.startswith("CAP_") else f"CAP_{c}" for c in caps], "more")


def _listed(items: list[str], more: str, limit: int = 4) -> str:
    """"a", "a and b", "a, b, c and 2 more"."""
    if len(items) > limit:
        return f"{', '.join(items[:limit - 1])} and {len(items) - limit + 1} {more}"
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _core_members(manifest: Manifest) -> list[str]:
    """The archive's CRIU core images (any directory), bounded in size."""
    names = sorted(n for n in manifest.files if core_pid(n) is not None)
    total = 0
    for name in names:
        size = manifest.files[name].size
        if size > MAX_CORE_IMAGE_BYTES:
            raise CriuImageError(f"{name} is implausibly large ({size} bytes)")
        total += size
    if total > MAX_CORE_IMAGES_BYTES:
        raise CriuImageError(f"the archive's {len(names)} CRIU core images hold {total} bytes; "
                             "implausibly many")
    return names


def archive_privileges(path: Path) -> list[PrivilegeRequest]:
    """What the archive at ``path`` asks of the host it is restored on (for inspect)."""
    return archive_requests(Path(path), read_manifest(Path(path)), extracted=False)


# --- the OCI runtime spec ----------------------------------------------------------------


def _spec_requests(spec: dict[str, Any], config: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    process, linux = _dict(spec.get("process")), _dict(spec.get("linux"))
    annotations = _dict(spec.get("annotations"))
    if str(annotations.get("io.podman.annotations.privileged", "")).upper() == "TRUE":
        yield PrivilegeRequest("privileged", "podman --privileged")
    caps = _dict(process.get("capabilities"))
    extra = {_cap(c) for kind in ("bounding", "effective", "permitted", "inheritable",
                                  "ambient") for c in _list(caps.get(kind))}
    for cap in sorted(extra - DEFAULT_CAPABILITIES, key=_cap_order):
        yield PrivilegeRequest("capability", cap)
    yield from _namespaces(linux)
    yield from _mounts(spec, config)
    yield from _devices(linux)
    yield from _confinement(process, linux, annotations)
    user = _dict(process.get("user"))
    if (user.get("uid") != 0 and user.get("gid") != 0
            and 0 in _list(user.get("additionalGids"))):
        yield PrivilegeRequest("group", "supplementary group 0 (root)")


def _namespaces(linux: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    present: dict[str, str] = {}
    for ns in _list(linux.get("namespaces")):
        ns = _dict(ns)
        present[str(ns.get("type"))] = str(ns.get("path") or "")
    for kind in OWN_NAMESPACES:
        if kind not in present:
            yield PrivilegeRequest("namespace", f"host {kind}")
        elif present[kind].startswith("/proc/"):
            yield PrivilegeRequest("namespace", f"{kind} of another process ({present[kind]})")


def _mounts(spec: dict[str, Any], config: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    own_ids = _own_ids(spec, config)
    volumes = {str(_dict(v).get("volumeName")) for v in _list(config.get("namedVolumes"))}
    for mount in _list(spec.get("mounts")):
        mount = _dict(mount)
        kind, source = str(mount.get("type") or ""), str(mount.get("source") or "")
        options = [str(o) for o in _list(mount.get("options"))]
        dest = str(mount.get("destination") or "")
        if kind == "bind" or "bind" in options or "rbind" in options:
            if not _own_storage(source, own_ids, volumes):
                yield PrivilegeRequest("host path", f"{source} at {dest}")
        elif kind not in PSEUDO_FILESYSTEMS:
            yield PrivilegeRequest("host path", f"{kind} mount of {source} at {dest}")
        elif kind in ("sysfs", "cgroup", "cgroup2") and "ro" not in options:
            yield PrivilegeRequest("host path", f"writable {kind} at {dest}")


def _own_ids(spec: dict[str, Any], config: dict[str, Any]) -> set[str]:
    ids = {str(config.get(k)) for k in ("id", "Id") if _ID.fullmatch(str(config.get(k)))}
    if not ids:  # no config: the id in the spec's cgroup path (libpod-<id>, docker-<id>)
        ids.update(_ID.findall(str(_dict(spec.get("linux")).get("cgroupsPath", ""))))
    return ids


def _own_storage(source: str, own_ids: set[str], volumes: set[str]) -> bool:
    """Whether a bind source is the container's own storage or a named volume."""
    path = posixpath.normpath(source)
    if not path.startswith("/") or "/../" in f"{path}/":
        return False
    for cid in own_ids:
        if (f"/overlay-containers/{cid}/userdata/" in f"{path}/"
                or f"/containers/{cid}/" in path):
            return True
    volume = _VOLUME.search(path)
    return volume is not None and (
        volume.group(1) in volumes or path.startswith(DEFAULT_VOLUME_ROOTS))


def _devices(linux: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    created = set()
    for dev in _list(linux.get("devices")):
        dev = _dict(dev)
        key = (str(dev.get("type")), dev.get("major"), dev.get("minor"))
        created.add(key)
        if key not in DEFAULT_DEVICES:
            yield PrivilegeRequest("device", f"{dev.get('path')} ({key[0]} {key[1]}:{key[2]})")
    rules = _list(_dict(linux.get("resources")).get("devices"))
    for rule in map(_dict, rules):
        if rule.get("allow") is not True or set(str(rule.get("access") or "rwm")) <= {"m"}:
            continue  # denials, and mknod-only rules (what a node may be created as)
        kind, major, minor = str(rule.get("type") or "a"), rule.get("major"), rule.get("minor")
        if kind == "a" or major is None or major == -1:
            yield PrivilegeRequest("device", f"all {'' if kind == 'a' else kind + ' '}devices")
        elif ((kind, major, minor) not in created | DEFAULT_DEVICE_RULES
              and (kind, major, None) not in DEFAULT_DEVICE_RULES):
            yield PrivilegeRequest("device", f"access to {kind} {major}:{minor}")


def _confinement(process: dict[str, Any], linux: dict[str, Any],
                 annotations: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    seccomp = linux.get("seccomp")
    if not isinstance(seccomp, dict) or (
            seccomp.get("defaultAction") in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
            and not seccomp.get("syscalls")):
        yield PrivilegeRequest("unconfined", "no seccomp filter")
    if (process.get("apparmorProfile") == "unconfined"
            or annotations.get("io.podman.annotations.apparmor") == "unconfined"):
        yield PrivilegeRequest("unconfined", "AppArmor unconfined")
    if not _list(linux.get("maskedPaths")):
        yield PrivilegeRequest("unconfined", "no masked /proc paths")


# --- the runc engine's config.dump --------------------------------------------------------


def runc_requests(config: dict[str, Any] | None) -> list[PrivilegeRequest]:
    """What a runc config.dump asks: each of its ``volumes`` that is not a named volume
    (a bind mount, or anything malformed) is a host path."""
    found = []
    for volume in map(_dict, _list(_dict(config).get("volumes"))):
        if volume.get("kind") != "volume":
            found.append(PrivilegeRequest(
                "host path", f"{volume.get('source')} at {volume.get('destination')}"))
    return found


# --- docker's inspect document (the docker engine's config.dump) ----------------------------


def _docker_requests(config: dict[str, Any]) -> Iterator[PrivilegeRequest]:
    host = _dict(config.get("HostConfig"))
    if host.get("Privileged") is True:
        yield PrivilegeRequest("privileged", "docker --privileged")
    for cap in sorted({_cap(c) for c in _list(host.get("CapAdd"))} - DEFAULT_CAPABILITIES,
                      key=_cap_order):
        yield PrivilegeRequest("capability", cap)
    for dev in map(_dict, _list(host.get("Devices"))):
        yield PrivilegeRequest("device", str(dev.get("PathOnHost")))
    for rule in _list(host.get("DeviceCgroupRules")):
        yield PrivilegeRequest("device", f"cgroup rule {rule}")
    for key, kind in (("NetworkMode", "network"), ("PidMode", "pid"), ("IpcMode", "ipc"),
                      ("UTSMode", "uts"), ("UsernsMode", "user")):
        mode = str(host.get(key) or "")
        if mode == "host":
            yield PrivilegeRequest("namespace", f"host {kind}")
        elif mode.startswith("container:") and kind in ("pid", "ipc"):
            yield PrivilegeRequest("namespace", f"{kind} of {mode}")
    for bind in map(str, _list(host.get("Binds"))):
        if bind.startswith("/"):  # else a named volume
            yield PrivilegeRequest("host path", bind)
    for mount in map(_dict, _list(host.get("Mounts"))):
        if mount.get("Type") == "bind":
            yield PrivilegeRequest("host path", f"{mount.get('Source')}:{mount.get('Target')}")
        driver = _dict(_dict(mount.get("VolumeOptions")).get("DriverConfig"))
        if mount.get("Type") == "volume" and (driver.get("Options")
                                              or driver.get("Name") not in (None, "", "local")):
            # dockerd creates such a volume at create: "local" with o=bind mounts host paths.
            yield PrivilegeRequest("volume", f"{mount.get('Source') or 'anonymous'} at "
                                   f"{mount.get('Target')} ({driver.get('Name') or 'local'} "
                                   "driver options)")
    for opt in map(str, _list(host.get("SecurityOpt"))):
        if opt.replace(":", "=") in ("seccomp=unconfined", "apparmor=unconfined",
                                     "label=disable", "systempaths=unconfined"):
            yield PrivilegeRequest("unconfined", opt)


# --- helpers -----------------------------------------------------------------------------


def _cap(name: object) -> str:
    cap = str(name).upper()
    return cap[4:] if cap.startswith("CAP_") else cap


def _cap_order(cap: str) -> tuple[int, str]:
    """The capabilities that amount to root on the host first, then by name."""
    rank = _HOST_ROOT_CAPABILITIES
    return (rank.index(cap) if cap in rank else len(rank)), cap


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _read_file(path: Path, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{path.name} is implausibly large")
    return data


