"""What each engine tells about a running container, for :mod:`ctrmig.preflight`.

The source side reads the container's image, mounts, published ports, sizes and what it
asks of a host; the target side asks its engine for volumes, published ports and where a
restore writes. Only the adapters' public attributes (``url``, ``base_url``, ``api``,
``client``, ``state_dir``, ``bundles_dir``, ``runc``, ``info()``) and each engine's own API
are used, and, on the host itself, /proc: a container's processes are those in its init's
mount namespace (for the process engine, the PID's tree).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from ctrmig.archive import privileges
from ctrmig.archive.portable import joined_namespaces
from ctrmig.errors import CheckpointError, ContainerNotFoundError, EngineError
from ctrmig.host import http, proc, resources
from ctrmig.protocol import Migrator

if TYPE_CHECKING:
    from ctrmig.preflight.report import Facts

RUNNING = ("running", "paused")  # paused: CRIU dumps a frozen container as well


def engine_facts(m: Migrator, container: str, facts: Facts, *, local: bool) -> None:
    """Fill ``facts`` from engine ``m``; ContainerNotFoundError or CheckpointError when
    the container is not there or not running. ``local``: /proc shows its processes."""
    reader = _READERS.get(m.engine, _generic)
    reader(m, container, facts, local)


def describe(facts: Facts) -> str:
    """One line: the container and what the estimate is made of."""
    def mib(n: int | None) -> str:
        return "?" if n is None else f"{n / (1 << 20):.1f} MiB"
    return (f"{facts.name} runs {facts.image or '(no image)'}: memory "
            f"{mib(facts.memory_bytes)}, rootfs diff {mib(facts.rootfs_bytes)}")


# --- podman --------------------------------------------------------------------------------


def _podman(m: Any, container: str, facts: Facts, local: bool) -> None:
    data = m._get(f"/containers/{container}/json", f"podman inspect {container}", size=True)
    state, host = data.get("State") or {}, data.get("HostConfig") or {}
    _require_running(m.engine, container, bool(state.get("Running")), state.get("Status"))
    facts.name = str(data.get("Name") or container).lstrip("/")
    facts.image = data.get("ImageName") or (data.get("Config") or {}).get("Image", "")
    facts.rootfs_bytes = int(data.get("SizeRw") or 0)
    facts.mounts = list(_mounts(data.get("Mounts")))
    facts.ports = list(_bindings(host.get("PortBindings")))
    facts.joined = _joined_modes(host)
    if facts.carries_images and facts.image:
        image = m._get(f"/images/{facts.image}/json", f"podman image inspect {facts.image}")
        facts.image_bytes = int(image.get("Size") or 0)
    if local and state.get("Pid"):
        # What podman's restore judges: spec.dump is this OCI spec, config.dump says
        # whether it was privileged and which volumes are its own.
        config = {"id": data.get("Id"), "privileged": bool(host.get("Privileged")),
                  "namedVolumes": [{"volumeName": n} for k, n, _ in facts.mounts
                                   if k == "volume"]}
        spec = _json_file(Path(str(data.get("OCIConfigPath") or "")))
        facts.joined = joined_namespaces(((spec or {}).get("linux") or {}).get("namespaces"))
        _from_proc(facts, _container_of(int(state["Pid"])),
                   privileges.requests(spec, config) if spec is not None else None)
    else:
        stats = m._get("/containers/stats", "podman stats", containers=[data.get("Id")],
                       stream=False)
        facts.memory_bytes = int(((stats.get("Stats") or [{}])[0]).get("MemUsage") or 0)


def _podman_volume(m: Any, volume: str) -> bool:
    def call() -> bool:
        resp = m.client.api.get(f"/volumes/{volume}/exists", timeout=60)
        if resp.status_code >= 500:
            resp.raise_for_status()
        return bool(resp.status_code == 204)

    return bool(m._idempotent(f"podman volume exists {volume}", call))


def _podman_ports(m: Any) -> set[tuple[int, str]]:
    rows = m._get("/containers/json", "podman ps")
    return {(int(p.get("host_port") or 0) + i, str(p.get("protocol") or "tcp"))
            for r in rows for p in r.get("Ports") or []
            for i in range(int(p.get("range") or 1))}


# --- docker --------------------------------------------------------------------------------


def _docker_call(m: Any, what: str, call: Callable[[Any], Any]) -> Any:
    """One call through the adapter's docker-py client (``m.api``, or ``m.api.client``)."""
    from docker.errors import DockerException

    with http.api_errors("docker", what, start_hint="ctrmig service start docker",
                         catch=(DockerException, requests.RequestException)):
        return call(getattr(m.api, "client", m.api))


def _docker(m: Any, container: str, facts: Facts, local: bool) -> None:
    data = _docker_call(m, f"inspect {container}", lambda c: c.inspect_container(container))
    state = data.get("State") or {}
    _require_running(m.engine, container, bool(state.get("Running")), state.get("Status"))
    cid = str(data["Id"])
    rows = _docker_call(m, f"size of {container}",
                        lambda c: c.containers(all=True, size=True, filters={"id": cid}))
    facts.name = str(data.get("Name") or container).lstrip("/")
    facts.image = (data.get("Config") or {}).get("Image", "")
    facts.rootfs_bytes = int((rows[0] if rows else {}).get("SizeRw") or 0)
    facts.mounts = list(_mounts(data.get("Mounts")))
    facts.ports = list(_bindings((data.get("HostConfig") or {}).get("PortBindings")))
    facts.joined = _joined_modes(data.get("HostConfig") or {})
    if facts.carries_images and facts.image:
        image = _docker_call(m, f"inspect image {facts.image}",
                             lambda c: c.inspect_image(facts.image))
        facts.image_bytes = int(image.get("Size") or 0)
    if local and state.get("Pid"):
        # docker's restore judges config.dump, which is this inspect document.
        _from_proc(facts, _container_of(int(state["Pid"])), privileges.requests({}, data))
    else:
        stats = _docker_call(m, f"stats {container}", lambda c: c.stats(cid, stream=False))
        facts.memory_bytes = int((stats.get("memory_stats") or {}).get("usage") or 0)


def _docker_volume(m: Any, volume: str) -> bool:
    try:
        _docker_call(m, f"inspect volume {volume}", lambda c: c.inspect_volume(volume))
    except ContainerNotFoundError:  # the translator's name for any 404
        return False
    return True


def _docker_ports(m: Any) -> set[tuple[int, str]]:
    rows = _docker_call(m, "list containers", lambda c: c.containers())
    return {(int(p["PublicPort"]), str(p.get("Type") or "tcp"))
            for r in rows for p in r.get("Ports") or [] if p.get("PublicPort")}


# --- runc and plain processes ----------------------------------------------------------------


def _runc(m: Any, container: str, facts: Facts, local: bool) -> None:
    info = next((c for c in m.list() if c.name == container), None)
    if info is None:
        raise ContainerNotFoundError(f"no runc container named {container!r}")
    _require_running(m.engine, container, info.state in RUNNING, info.state)
    facts.name, facts.image = info.name, info.image
    bundle = Path(m.bundles_dir) / container
    spec = _json_file(bundle / "config.json") or {}
    rootfs = bundle / str((spec.get("root") or {}).get("path") or "rootfs")
    own = str(Path(m.state_dir)) + "/"
    facts.mounts = [("bind", str(mt.get("source")), str(mt.get("destination")))
                    for mt in spec.get("mounts") or []
                    if (mt.get("type") == "bind" or {"bind", "rbind"} & set(
                        mt.get("options") or [])) and not str(mt.get("source")).startswith(own)]
    facts.joined = joined_namespaces((spec.get("linux") or {}).get("namespaces"))
    upper = resources.overlay_upper(rootfs)
    facts.rootfs_bytes = resources.dir_bytes(upper) if upper else None
    state = m.runc.state(container) or {}
    if not state.get("pid"):
        raise EngineError(f"runc does not say which process runs {container!r}")
    # runc restores on its own bundle template: only what CRIU restores counts.
    _from_proc(facts, _container_of(int(state["pid"])), [])


def _process(m: Any, container: str, facts: Facts, local: bool) -> None:
    try:
        pid = int(container)
    except ValueError:
        raise ContainerNotFoundError(f"{container!r} is not a PID",
                                     hint="the process engine takes a numeric PID") from None
    if not os.path.exists(f"/proc/{pid}"):
        raise ContainerNotFoundError(f"no process {pid}")
    facts.name = container
    facts.rootfs_bytes = 0
    facts.pids = proc.tree(pid)
    _from_proc(facts, facts.pids, [])


def _generic(m: Migrator, container: str, facts: Facts, local: bool) -> None:
    info = next((c for c in m.list() if container in (c.name, c.id)), None)
    if info is None:
        raise ContainerNotFoundError(f"no {m.engine} container named {container!r}")
    facts.name, facts.image = info.name, info.image


_READERS: dict[str, Callable[[Any, str, Facts, bool], None]] = {
    "podman": _podman, "docker": _docker, "runc": _runc, "process": _process}


# --- the target engine ---------------------------------------------------------------------


def has_volume(m: Migrator, volume: str) -> bool | None:
    """Whether the target engine holds the named volume (None: it has no volumes)."""
    if m.engine == "podman":
        return _podman_volume(m, volume)
    if m.engine == "docker":
        return _docker_volume(m, volume)
    return None


def published_ports(m: Migrator) -> set[tuple[int, str]]:
    """(port, protocol) published by the target engine's running containers."""
    if m.engine == "podman":
        return _podman_ports(m)
    if m.engine == "docker":
        return _docker_ports(m)
    return set()


def space_places(m: Migrator, local: bool,
                 info: dict[str, Any]) -> list[tuple[str, Path | None, int | None]]:
    """Where the target engine writes a restore besides ctrmig's spool: (what, path, free
    bytes if told by the engine; None: measure the path here, or unknown without one).
    ``info``: the engine's /info."""
    if m.engine == "podman":
        store = info.get("store") or {}
        graph = Path(str(store.get("graphRoot") or "/var/lib/containers/storage"))
        if local:
            return [("podman spool", Path(str(store.get("imageCopyTmpDir") or "/var/tmp")),
                     None), ("podman storage", graph, None)]
        told = int(store.get("graphRootAllocated") or 0) - int(store.get("graphRootUsed") or 0)
        return [("podman spool", None, None), ("podman storage", graph, told or None)]
    if m.engine == "docker":
        root = Path(str(info.get("DockerRootDir") or "/var/lib/docker"))
        return [("docker storage", root if local else None, None)]
    if m.engine == "runc":
        return [("runc storage", Path(getattr(m, "state_dir")), None)]  # noqa: B009
    return []


# --- shared ----------------------------------------------------------------------------------


def _require_running(engine: str, container: str, running: bool, state: object) -> None:
    if not running:
        raise CheckpointError(f"{engine} container {container!r} is not running (state: "
                              f"{state or '?'})", hint="only a running container migrates")


def _container_of(pid: int) -> list[int]:
    """The processes of the container whose init is ``pid``."""
    try:
        return resources.sharing_mounts(pid)
    except OSError:
        raise EngineError(f"process {pid} of the container is gone") from None


def _from_proc(facts: Facts, pids: list[int],
               declared: list[privileges.PrivilegeRequest] | None) -> None:
    """Memory and (with what the config declares) privileges from the running tasks: the
    credentials CRIU will write into their core images."""
    facts.memory_bytes = resources.memory_bytes(pids)
    creds = {}
    for pid in pids:
        try:
            creds[f"core-{resources.inner_pid(pid)}.img"] = resources.creds(pid)
        except (OSError, KeyError, ValueError):
            continue  # it ended meanwhile
    if declared is None:
        facts.privileges = None
        return
    found = declared + privileges.image_requests(creds, facts.engine, declared)
    facts.privileges = [(r.kind, r.detail) for r in dict.fromkeys(found)]


def _joined_modes(host: dict[str, Any]) -> list[str]:
    """Namespaces an inspect's HostConfig joins from another container (a pod's infra)."""
    return [kind for kind, key in (("ipc", "IpcMode"), ("pid", "PidMode"),
                                   ("uts", "UTSMode"), ("cgroup", "CgroupnsMode"))
            if str(host.get(key) or "").startswith("container:")]


def _mounts(rows: object) -> Iterator[tuple[str, str, str]]:
    """("bind", host path, destination) and ("volume", name, destination) of an inspect."""
    for mt in rows if isinstance(rows, list) else []:
        if mt.get("Type") == "bind":
            yield "bind", str(mt.get("Source")), str(mt.get("Destination"))
        elif mt.get("Type") == "volume" and mt.get("Name"):
            yield "volume", str(mt.get("Name")), str(mt.get("Destination"))


def _bindings(bindings: object) -> Iterator[tuple[int, str, str]]:
    """(host port, protocol, host address) of an inspect's PortBindings."""
    for key, hosts in (bindings.items() if isinstance(bindings, dict) else []):
        proto = str(key).partition("/")[2] or "tcp"
        for h in hosts or []:
            if str(h.get("HostPort") or "").isdigit():
                yield int(h["HostPort"]), proto, str(h.get("HostIp") or "")


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
