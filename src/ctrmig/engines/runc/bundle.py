"""Bundles: one directory per container, made from an unpacked image and the template.

``bundles/NAME/`` holds config.json (the template filled in with the container's process),
meta.json (what ctrmig knows of the container), rootfs/ (an overlay mount on the pristine
image; the container's changes land in diff/upper) and, after a checkpoint that stopped
the container, checkpoint/ (the CRIU images, kept until the container is resumed or
removed). Each container also has a named network namespace of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctrmig.archive.layout import CHECKPOINT_DIR
from ctrmig.engines.runc.commands import TOOL_TIMEOUT, Runc
from ctrmig.engines.runc.state import StateDir, to_json
from ctrmig.engines.runc.supervisor import Stdio
from ctrmig.engines.runc.volumes import spec_mounts
from ctrmig.errors import EngineError, NameInUseError, OptionError
from ctrmig.host import mounts, proc

#: The bundle template shipped with ctrmig (explained in bundles/README.md).
TEMPLATE = Path(__file__).resolve().parent / "template" / "config.json"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def process_settings(image: str, config: Mapping[str, Any], *,
                     command: Sequence[str] | None,
                     env: Mapping[str, str] | Sequence[str] | None,
                     hostname: str) -> dict[str, Any]:
    """The container's process from the ``image``'s config and the caller's overrides:
    ``command`` replaces the image's CMD (its ENTRYPOINT stays), ``env`` adds to its Env."""
    entrypoint = list(config.get("Entrypoint") or [])
    args = entrypoint + (list(command) if command else list(config.get("Cmd") or []))
    if not args:
        raise OptionError(f"image {image!r} has no ENTRYPOINT or CMD; pass command=")
    uid, gid = _user(str(config.get("User") or ""))
    return {"args": args, "env": _merge_env(list(config.get("Env") or []), env),
            "cwd": config.get("WorkingDir") or "/", "uid": uid, "gid": gid,
            "hostname": hostname[:63]}


class Bundles:
    """The bundles of one state dir, and everything else one container holds."""

    def __init__(self, paths: StateDir, template: Path, runc: Runc, stdio: Stdio):
        self.state_dir = paths.root
        self.dir = paths.bundles
        self.template = template
        self.runc = runc
        self.stdio = stdio

    def path(self, name: str) -> Path:
        return self.dir / name

    def kept_images(self, name: str) -> Path:
        """Where a checkpoint that stopped ``name`` keeps its CRIU images."""
        return self.dir / name / CHECKPOINT_DIR

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())

    def meta(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / name / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def record_supervisor(self, name: str, pid: int) -> None:
        meta = self.meta(name) or {}
        meta["supervisor_pid"] = pid
        (self.dir / name / "meta.json").write_bytes(to_json(meta))

    def status(self, name: str, states: dict[str, dict[str, Any]]) -> str:
        """runc's status of ``name`` (from ``states``), else checkpointed or stopped."""
        if name in states:
            return str(states[name].get("status", ""))
        if self.kept_images(name).is_dir():
            return "checkpointed"
        return "stopped"

    def make(self, name: str, rootfs: Path, meta: dict[str, Any],
             adjust: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
        """bundles/NAME with an overlay rootfs on the pristine image ``rootfs``, its
        network namespace and config.json; nothing is left of it if this fails.
        ``adjust(spec, bundle)`` changes config.json before it is written (a foreign
        archive's mounts, see :mod:`.foreign`)."""
        bundle = self.dir / name
        try:
            bundle.mkdir()
        except FileExistsError:
            raise NameInUseError(f"a runc container named {name!r} already exists",
                                 hint="pick another name or remove that container") from None
        try:
            (bundle / "meta.json").write_bytes(to_json(meta))
            for d in ("rootfs", "diff/upper", "diff/work"):
                (bundle / d).mkdir(parents=True)
            opts = (f"lowerdir={rootfs},upperdir={bundle / 'diff/upper'},"
                    f"workdir={bundle / 'diff/work'}")
            proc.run(["mount", "-t", "overlay", "-o", opts, "overlay", str(bundle / "rootfs")],
                     timeout=TOOL_TIMEOUT, what=f"mount overlay rootfs of {name}")
            netns = self.netns(name)
            proc.run(["ip", "netns", "add", netns], timeout=TOOL_TIMEOUT,
                     what=f"create the network namespace of {name}")
            proc.run(["ip", "-n", netns, "link", "set", "lo", "up"], timeout=TOOL_TIMEOUT,
                     what=f"bring up loopback for {name}")
            spec = self.spec(meta["process"], netns, meta.get("volumes") or [])
            if adjust is not None:
                adjust(spec, bundle)
            (bundle / "config.json").write_bytes(to_json(spec))
        except BaseException:
            self.cleanup(name)
            raise
        return bundle

    def netns(self, name: str) -> str:
        """The named network namespace we make for a container (unique per state dir).

        Ours, not runc's: runc brings up loopback in a namespace it creates only on run,
        not on restore, where CRIU then cannot reconnect TCP sockets ("Network is
        unreachable"). A namespace with a path is also what runc treats as external on
        checkpoint and joins on restore, as podman's own network namespaces are.
        """
        digest = hashlib.sha256(f"{self.state_dir}\0{name}".encode()).hexdigest()[:16]
        return f"ctrmig-runc-{digest}"

    def spec(self, process: dict[str, Any], netns: str,
             volumes: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """config.json from the bundle template, the container's process settings and its
        volumes (bind mounts, see :mod:`.volumes`)."""
        try:
            spec: dict[str, Any] = json.loads(self.template.read_text())
        except (OSError, ValueError) as e:
            raise OptionError(f"bundle template {self.template} is unusable: {e}") from None
        p = spec.setdefault("process", {})
        p["terminal"] = False  # CRIU dumps pipes, not a terminal we do not own
        p["args"] = [str(a) for a in process["args"]]
        p["env"] = [str(e) for e in process["env"]]
        p["cwd"] = str(process.get("cwd") or "/")
        p["user"] = {"uid": int(process.get("uid", 0)), "gid": int(process.get("gid", 0))}
        spec["root"] = {"path": "rootfs", "readonly": False}
        spec["hostname"] = str(process.get("hostname") or "ctrmig")
        namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
        namespaces[:] = [ns for ns in namespaces if ns.get("type") != "network"]
        namespaces.append({"type": "network", "path": f"/run/netns/{netns}"})
        spec.setdefault("mounts", []).extend(spec_mounts(volumes))
        # #19: a cgroup of its own per state dir (runc's default is /NAME): the direct
        # route restores while the source, paused, still holds its cgroup on this host.
        spec["linux"]["cgroupsPath"] = f"/{netns}"
        return spec

    def drained(self, name: str) -> int | None:
        """Wait for the supervisor of a stopped ``name`` to write all its output (see
        :meth:`Stdio.drained`)."""
        return self.stdio.drained((self.meta(name) or {}).get("supervisor_pid"), name)

    def cleanup(self, name: str) -> None:
        """Forget a container entirely: runc state, supervisor, rootfs mount, bundle,
        network namespace, log."""
        if self.runc.state(name) is not None:
            self.runc.delete(name)
        bundle = self.dir / name
        pid = self.drained(name)
        if pid is not None:
            proc.stop_pid(pid, timeout=5)
        rootfs = bundle / "rootfs"
        for attempt in range(20):
            if not mounts.is_mounted(rootfs):
                break
            res = proc.run(["umount", str(rootfs)], timeout=TOOL_TIMEOUT, check=False)
            if res.returncode != 0:
                if attempt == 19:
                    raise EngineError(f"cannot unmount {rootfs}",
                                      stderr=res.stderr.decode(errors="replace"))
                time.sleep(0.1)
        if bundle.exists():
            shutil.rmtree(bundle)
        netns = self.netns(name)
        if Path("/run/netns", netns).exists():
            proc.run(["ip", "netns", "delete", netns], timeout=TOOL_TIMEOUT, check=False)
        self.stdio.log_path(name).unlink(missing_ok=True)


def config_dump(meta: dict[str, Any]) -> dict[str, Any]:
    """The archive's config.dump of a container: its image and process, from meta.json."""
    return {
        "name": meta.get("name"),
        "image": meta.get("image"),
        "transport_ref": meta.get("transport_ref"),
        "digest": meta.get("digest"),
        "command": meta.get("process", {}).get("args", []),
        "env": meta.get("process", {}).get("env", []),
        "process": meta.get("process", {}),
        "created": meta.get("created"),
        "volumes": meta.get("volumes", []),
    }


def _merge_env(base: list[str], extra: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    merged: dict[str, str] = {}
    for item in base:
        k, _, v = item.partition("=")
        merged[k] = v
    if extra is not None:
        items = (extra.items() if isinstance(extra, Mapping)
                 else (e.partition("=")[::2] for e in extra))
        for k, v in items:
            merged[str(k)] = str(v)
    merged.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in merged.items()]


def _user(user: str) -> tuple[int, int]:
    if not user:
        return 0, 0
    u, _, g = user.partition(":")
    if u.isdigit() and (not g or g.isdigit()):
        return int(u), int(g or 0)
    raise OptionError(f"image user {user!r} is not numeric; the runc engine needs uid[:gid]")

