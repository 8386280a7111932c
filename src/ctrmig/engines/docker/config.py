"""The recorded container, translated: config.dump back into a create body, options into
Engine API fields, and the OCI spec containerd ran the container with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from docker.utils import convert_port_bindings
from docker.utils.ports import split_port

from ctrmig.archive import ContainerRecord
from ctrmig.archive.layout import CONFIG_DUMP
from ctrmig.errors import ArchiveError, OptionError
from ctrmig.protocol import CheckpointOptions

# Config keys copied from the recorded container into the new one. Not NetworkDisabled:
# dockerd sets it itself when it has no network, and a new container created with it set
# explicitly fails to restore ("criu failed: type NOTIFY errno 0", seen on 20.10.24).
_CONFIG_KEYS = ("Hostname", "Domainname", "User", "Env", "Cmd", "Entrypoint", "Image",
                "WorkingDir", "Labels", "ExposedPorts", "Volumes", "Tty", "OpenStdin",
                "StdinOnce", "StopSignal", "StopTimeout", "Healthcheck",
                "Shell")
_HOST_CONFIG_KEYS = ("Binds", "Mounts", "PortBindings", "PublishAllPorts", "RestartPolicy",
                     "NetworkMode", "Privileged", "CapAdd", "CapDrop", "Devices", "Ulimits",
                     "Memory", "MemorySwap", "MemoryReservation", "NanoCpus", "CpuShares",
                     "CpuPeriod", "CpuQuota", "CpusetCpus", "CpusetMems", "PidsLimit",
                     "ShmSize", "Tmpfs", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
                     "GroupAdd", "IpcMode", "PidMode", "UTSMode", "UsernsMode", "SecurityOpt",
                     "ReadonlyRootfs", "Init", "LogConfig", "OomScoreAdj", "Sysctls",
                     "Runtime", "CgroupParent", "AutoRemove", "MaskedPaths", "ReadonlyPaths")


def checkpoint_fields(opts: CheckpointOptions) -> dict[str, Any]:
    """The ``POST /containers/{id}/checkpoints`` fields ctrmig's options set (besides the
    checkpoint's name). keep and ignore_rootfs are ctrmig's side: dockerd has no field."""
    return {"Exit": not opts.leave_running}


def record(data: dict[str, Any]) -> ContainerRecord:
    """The archive's record of a container, from its inspect document."""
    config = data.get("Config") or {}
    return ContainerRecord(
        name=str(data.get("Name", "")).lstrip("/"),
        id=data["Id"],
        image=str(config.get("Image", "")),
        image_id=str(data.get("Image", "")),
        command=[*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])],
    )


def load_config(source: Path) -> dict[str, Any]:
    """The recorded inspect document (config.dump) of an extracted archive."""
    path = source / CONFIG_DUMP
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArchiveError(f"the archive has no {CONFIG_DUMP}") from None
    except ValueError:
        raise ArchiveError(f"{CONFIG_DUMP} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("Config"), dict):
        raise ArchiveError(f"{CONFIG_DUMP} is not a docker container inspect document")
    return data


def has_volumes(config: dict[str, Any]) -> bool:
    """Whether the recorded container mounts docker volumes (their content is not carried)."""
    return any(m.get("Type") == "volume" for m in config.get("Mounts") or [])


def create_body(config: dict[str, Any], publish: tuple[str, ...] = ()) -> dict[str, Any]:
    """The POST /containers/create body that recreates the recorded container.

    ``publish`` ("[ip:]hostport:containerport[/proto]", as for ``docker run -p``) replaces
    the recorded port bindings.
    """
    src = config.get("Config") or {}
    host = config.get("HostConfig") or {}
    body = {k: src[k] for k in _CONFIG_KEYS if src.get(k) is not None}
    body["HostConfig"] = {k: host[k] for k in _HOST_CONFIG_KEYS if host.get(k) is not None}
    if publish:
        exposed, bindings = port_bindings(publish)
        body["ExposedPorts"] = {**(body.get("ExposedPorts") or {}), **exposed}
        body["HostConfig"]["PortBindings"] = bindings
    return body


def port_bindings(specs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """ExposedPorts and PortBindings for ``docker run -p`` style specs."""
    raw: dict[str, list[Any]] = {}
    for spec in specs:
        try:
            internal, external = split_port(spec)
        except ValueError as e:
            raise OptionError(f"bad port mapping {spec!r}: {e}",
                              hint="use [ip:]hostport:containerport[/tcp|udp]") from None
        for i, port in enumerate(internal):
            key = port if "/" in port else f"{port}/tcp"
            raw.setdefault(key, []).append(external[i] if external else None)
    bindings: dict[str, Any] = convert_port_bindings(raw)
    return {key: {} for key in raw}, bindings


def oci_spec(data: dict[str, Any]) -> bytes | None:
    """The OCI config.json containerd ran the container with, if it is readable here.

    containerd's shim (the init process's parent) runs in the task's bundle directory.
    """
    pid = (data.get("State") or {}).get("Pid")
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        if b"containerd-shim" not in os.path.basename(cmdline[0]) \
                or data["Id"].encode() not in cmdline:
            return None
        bundle = Path(os.readlink(f"/proc/{ppid}/cwd"))
        return (bundle / "config.json").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
