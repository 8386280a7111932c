"""The target side: everything a host must have to take the container, judged from the
source's :class:`~ctrmig.preflight.report.Facts`. Run in this process for a local or API
target, and by ctrmig on the target host for an ssh one (``local``: the host's own CRIU,
CPU, paths, ports and disks can be asked; over an API they are ``unavailable``)."""

from __future__ import annotations

import base64
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctrmig import options, registry
from ctrmig.archive import privileges
from ctrmig.archive.reader import DEFAULT_LIMITS
from ctrmig.errors import CtrmigError
from ctrmig.host import criu, resources
from ctrmig.options import CheckpointOptions, RestoreOptions
from ctrmig.preflight.facts import has_volume, published_ports, space_places
from ctrmig.preflight.report import (
    API_UNTOLD,
    MEMORY_IN_ARCHIVE,
    MEMORY_IN_PAGES,
    MEMORY_NOT_ON_DISK,
    SETUP,
    TARGET,
    Check,
    Facts,
)
from ctrmig.protocol import Migrator

#: The archive is estimated as the container's memory plus its rootfs diff (plus the image
#: when carried); space is asked for that times MARGIN, plus SLACK.
MARGIN = 1.25
SLACK = 32 << 20


def target_side(m: Migrator, facts: Facts, ckpt: CheckpointOptions, rest: RestoreOptions,
                *, local: bool, memory: str = MEMORY_IN_ARCHIVE) -> list[Check]:
    """The target's checks of ``facts``; ``local``: this process runs on the target host;
    ``memory``: where the pages land there (``MEMORY_*``)."""
    assert rest.name is not None
    # Each engine answer once: podman's /info alone takes a few hundred ms.
    info = functools.cache(lambda: getattr(m, "info")() if hasattr(m, "info") else {})  # noqa: B009
    has_image = functools.cache(lambda: m.has_image(facts.image) if facts.image else None)
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("engine", lambda: _engine_check(m, facts, info)),
    ]
    if local:
        steps += [("criu", lambda: _criu_target(facts)),
                  ("criu check", _criu_check),
                  ("cpu", lambda: _cpu_check(facts)),
                  ("kernel features", lambda: _kernel_check(rest))]
    checks = [Check(TARGET, n, "unavailable", API_UNTOLD.format(engine=m.engine))
              for n in ("criu", "criu check", "cpu", "kernel features") if not local]
    steps += [
        ("options", lambda: options_check(TARGET, m, rest, "restore_options", "restore")),
        ("image", lambda: _image_check(m, facts, ckpt, has_image())),
        ("mounts", lambda: _mounts_check(m, facts, ckpt, local)),
        ("ports", lambda: _ports_check(m, facts, rest, local)),
        ("name", lambda: _name_check(m, facts, rest.name or "", local)),
        ("space", lambda: _space_check(m, facts, ckpt, local, info, has_image(), memory)),
        ("privileges", lambda: _privileges_check(facts, rest)),
    ]
    for name, step in steps:
        try:
            checks.append(step())
        except CtrmigError as e:  # the engine could not be asked: says the engine check
            checks.append(Check(TARGET, name, "unavailable", e.message))
        except (OSError, ValueError, KeyError) as e:  # an answer or /proc changed meanwhile
            checks.append(Check(TARGET, name, "unavailable", f"could not tell: {e!r}"))
    order = ["engine", "criu", "criu check", "cpu", "kernel features"]
    return sorted(checks, key=lambda c: order.index(c.name) if c.name in order else 9)


def _engine_check(m: Migrator, facts: Facts, ask: Callable[[], dict[str, Any]]) -> Check:
    """Reachable, able to restore, and the archive's engine or one it translates from
    (:mod:`ctrmig.archive.portable`)."""
    name = "engine"
    if m.engine != facts.engine and facts.engine not in _imports_from(m):
        return Check(TARGET, name, "fail", f"a {facts.engine} archive restores only on "
                     f"{facts.engine}, not on {m.engine}", f"migrate to a {facts.engine} target")
    if m.engine != facts.engine and facts.joined:
        return Check(TARGET, name, "fail", f"the container shares its {', '.join(facts.joined)} "
                     "namespace(s) with a pod or another container, which another engine "
                     "cannot recreate", f"migrate to a {facts.engine} target")
    try:
        info = ask()
        version = str((info.get("version") or {}).get("Version") or info.get(
            "ServerVersion") or "") or m.version()
    except CtrmigError as e:
        return Check(TARGET, name, "fail", f"{m.engine} cannot be reached: {e.message}",
                     e.hint or "")
    runtime = (info.get("host") or {}).get("ociRuntime") or {}
    rt_name, rt_version = str(runtime.get("name", "")), str(runtime.get("version", ""))
    if m.engine == "podman" and not (rt_name == "runc" or "+CRIU" in rt_version):
        return Check(TARGET, name, "fail", f"podman {version}'s runtime {rt_name or '?'} "
                     "cannot restore checkpoints", 'set runtime = "runc" under [engine] in '
                     "containers.conf (scripts/setup-host)")
    if m.engine == "docker" and not info.get("ExperimentalBuild"):
        return Check(TARGET, name, "fail", f"docker {version} has experimental features "
                     "off: it cannot restore checkpoints", 'set "experimental": true in '
                     "/etc/docker/daemon.json and restart dockerd")
    how = f", runtime {rt_name}" if rt_name else ""
    return Check(TARGET, name, "pass", f"{m.engine} {version.splitlines()[0]}{how}")


def _imports_from(m: Migrator) -> frozenset[str]:
    """The engines whose archives ``m``'s engine translates (a remote one's: its class's)."""
    found = getattr(m, "imports_from", None)
    if found is None:
        try:
            found = registry.get_class(m.engine).imports_from
        except (CtrmigError, AttributeError):
            return frozenset()
    return frozenset(found)


def _criu_target(facts: Facts) -> Check:
    version = criu.version()
    if not version:
        return Check(TARGET, "criu", "fail", "criu is not installed", SETUP)
    theirs = facts.criu_version
    if theirs and criu.version_key(version) < criu.version_key(theirs):
        return Check(TARGET, "criu", "fail", f"CRIU {version} here is older than the "
                     f"source's {theirs}, whose images it may not read",
                     f"install CRIU {theirs} or newer on the target ({SETUP})")
    return Check(TARGET, "criu", "pass",
                 f"version {version}" + (f" (source: {theirs})" if theirs else ""))


def _criu_check() -> Check:
    passed, last = criu.check()
    return Check(TARGET, "criu check", "pass" if passed else "fail", last or "no output",
                 "" if passed else f"install a CRIU that supports this kernel ({SETUP})")


def _cpu_check(facts: Facts) -> Check:
    if not facts.cpuinfo:
        return Check(TARGET, "cpu", "unavailable", "the source's CPU was not recorded")
    ok, why = criu.cpuinfo_check(base64.b64decode(facts.cpuinfo))
    if ok:
        return Check(TARGET, "cpu", "pass", "criu cpuinfo check: the source's CPU features "
                     "are all here")
    return Check(TARGET, "cpu", "fail", f"criu cpuinfo check: {why} (the restored process "
                 "would die of SIGILL)", "pick a target whose CPU has the source's features")


def _kernel_check(rest: RestoreOptions) -> Check:
    if rest.lazy_pages:
        return feature(TARGET, "kernel features", criu.lazy_pages_supported(),
                        "lazy pages (userfaultfd)", "CONFIG_USERFAULTFD=y")
    return Check(TARGET, "kernel features", "pass", "no option needs more than criu check")


def feature(host: str, name: str, present: bool, what: str, config: str) -> Check:
    if present:
        return Check(host, name, "pass", f"{what}: present")
    return Check(host, name, "fail", f"{what}: this kernel or CRIU lacks it",
                 f"a kernel with {config}, or drop the option")


def options_check(host: str, m: Migrator, opts: CheckpointOptions | RestoreOptions,
                   table: str, verb: str) -> Check:
    supported: frozenset[str] | None = getattr(type(m), table, None)
    if supported is None:
        return Check(host, "options", "unavailable", f"the {m.engine} engine does not say")
    refused = sorted(options.for_engine(opts) - supported)
    if refused:
        return Check(host, "options", "fail", f"the {m.engine} engine cannot {verb} with: "
                     f"{', '.join(refused)}", f"supported: {', '.join(sorted(supported))}")
    return Check(host, "options", "pass", f"the {m.engine} engine honours every option")


def _image_check(m: Migrator, facts: Facts, ckpt: CheckpointOptions,
                 has: bool | None) -> Check:
    name, ref = "image", facts.image
    if not ref:
        return Check(TARGET, name, "pass" if facts.found else "unavailable",
                     "none needed" if facts.found else "the source's image is unknown")
    if ckpt.include_image:
        return Check(TARGET, name, "pass", f"{ref}: carried in the archive")
    if has:
        return Check(TARGET, name, "pass", f"{ref}: present")
    if ckpt.include_image is None and facts.carries_images:
        return Check(TARGET, name, "pass", f"{ref}: not here, migrate carries it")
    if has is None:
        return Check(TARGET, name, "unavailable", f"cannot tell whether {ref} is there")
    why = ("--no-include-image leaves it out of the archive" if ckpt.include_image is False
           else f"the {facts.engine} engine cannot carry it")
    return Check(TARGET, name, "fail", f"image {ref!r} is not on this {m.engine} host, and "
                 f"{why}", "load the image on the target, or migrate with --include-image")


def _mounts_check(m: Migrator, facts: Facts, ckpt: CheckpointOptions, local: bool) -> Check:
    name = "mounts"
    if not facts.found:
        return Check(TARGET, name, "unavailable", "the source's mounts are unknown")
    if not facts.mounts:
        return Check(TARGET, name, "pass", "no volumes or bind mounts")
    missing: list[str] = []
    unknown: list[str] = []
    fine: list[str] = []
    for kind, src, dest in facts.mounts:
        what = f"{src} (at {dest})" if kind == "bind" else f"volume {src} (at {dest})"
        # Every engine but process carries its volumes' content (podman, docker: named and
        # anonymous; runc: ctrmig's named ones): the restore makes them on the target.
        if kind == "volume" and facts.engine != "process" and not ckpt.ignore_volumes:
            fine.append(f"{what}: carried")
            continue
        found = (os.path.exists(src) if local else None) if kind == "bind" else \
            has_volume(m, src)
        (fine if found else unknown if found is None else missing).append(what)
    if missing:
        return Check(TARGET, name, "fail", f"missing on the target: {', '.join(missing)}",
                     "create them on the target (same paths and names)")
    if unknown:
        return Check(TARGET, name, "unavailable",
                     f"cannot be seen from here: {', '.join(unknown)}")
    return Check(TARGET, name, "pass", f"present: {', '.join(fine)}")


def publish_ports(specs: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Host ports of podman-style ``[[ip:]hostPort:]containerPort[/proto]`` specs (ranges
    expanded; a spec without a host port takes a random one, and none is listed)."""
    found = []
    for spec in specs:
        body, _, proto = spec.partition("/")
        parts = body.rsplit(":", 2) if body.count(":") <= 2 else [body]
        if len(parts) < 2 or not parts[-2]:
            continue
        ip = parts[0] if len(parts) == 3 else ""
        first, _, last = parts[-2].partition("-")
        for port in range(int(first), int(last or first) + 1):
            found.append((port, proto or "tcp", ip))
    return found


def _ports_check(m: Migrator, facts: Facts, rest: RestoreOptions, local: bool) -> Check:
    name = "ports"
    ports = publish_ports(rest.publish_ports) if rest.publish_ports else facts.ports
    if not ports and not facts.found and not rest.publish_ports:
        return Check(TARGET, name, "unavailable", "the source's ports are unknown")
    if not ports:
        return Check(TARGET, name, "pass", "no published ports")
    shown = ", ".join(f"{p}/{proto}" for p, proto, _ in ports)
    if local and facts.host == resources.host_key() and not rest.publish_ports:
        return Check(TARGET, name, "pass", f"{shown}: the source's, freed when it stops")
    held = published_ports(m)  # a container there may hold it through NAT rules only
    taken = [f"{p}/{proto} ({why})" for p, proto, ip in ports
             if (why := "published by a container there" if (p, proto) in held
                 else resources.port_taken(p, proto, ip) if local else None)]
    if taken:
        return Check(TARGET, name, "fail", f"taken on the target: {', '.join(taken)}",
                     "free them on the target, or publish others with --publish HOST:CONTAINER")
    if not local:
        return Check(TARGET, name, "unavailable", f"{shown}: no container there publishes "
                     "them; other listeners cannot be seen over the API")
    return Check(TARGET, name, "pass", f"{shown}: free")


def _name_check(m: Migrator, facts: Facts, name: str, local: bool) -> Check:
    if m.engine == "process":  # restored under its PIDs, which must be free
        if not local or facts.host == resources.host_key():
            return Check(TARGET, "name", "pass", "PIDs: the source's own, or not seen here")
        taken = [str(p) for p in facts.pids if os.path.exists(f"/proc/{p}")]
        if taken:
            return Check(TARGET, "name", "fail", f"PID(s) {', '.join(taken)}, which the "
                         "process needs, are taken on the target", "restore on another host")
        return Check(TARGET, "name", "pass", f"PIDs {', '.join(map(str, facts.pids))}: free")
    busy = m.operations().get(name) if hasattr(m, "operations") else None
    if busy or m.exists(name):
        why = f"another ctrmig is {busy} one" if busy else "already has a container"
        return Check(TARGET, "name", "fail", f"the target {m.engine} {why} named {name!r}",
                     "pick another name with --name, or remove that container")
    return Check(TARGET, "name", "pass", f"{name}: free")


def _space_check(m: Migrator, facts: Facts, ckpt: CheckpointOptions, local: bool,
                 info: Callable[[], dict[str, Any]], has_image: bool | None,
                 memory: str) -> Check:
    """Room for the archive where the target spools it (ctrmig's temp dir, the engine's)
    and where the engine stores the container: each filesystem counted once. The pages
    are counted where ``memory`` says they land: everywhere the archive goes, once in the
    spool (direct pre-copy), or nowhere (post-copy)."""
    with_image = bool(ckpt.include_image) or (
        ckpt.include_image is None and facts.carries_images and has_image is False)
    size = facts.estimate(with_image)
    rest = facts.estimate(with_image, with_memory=False)
    if size is None or rest is None:
        return Check(TARGET, "space", "unavailable", "the container's size is unknown")
    whole, without_pages = int(size * MARGIN) + SLACK, int(rest * MARGIN) + SLACK

    def need(what: str) -> int:
        if memory == MEMORY_IN_ARCHIVE or (memory == MEMORY_IN_PAGES and what == "spool"):
            return whole
        return without_pages

    spool = Path(getattr(m, "workdir", None) or tempfile.gettempdir())
    # An extracting engine's reader keeps this much free besides (ctrmig.archive.reader).
    spare = DEFAULT_LIMITS.min_free_bytes if getattr(m, "needs_extracted", True) else 0
    # The archive's estimate, once per place that holds a copy of it.
    places: list[tuple[str, Path | None, int | None]] = [("spool", spool, None)]
    places += space_places(m, local, info())
    filesystems: dict[object, tuple[list[str], int, list[int]]] = {}
    unknown = []
    for what, path, free in places:
        label = f"{what} {path}" if path else what
        if free is None and path is not None:
            measured, free = resources.free_bytes(path)
            key: object = os.stat(measured).st_dev
        else:
            key = label
        if free is None:
            unknown.append(label)
            continue
        labels, _, needed = filesystems.setdefault(key, ([], free, [0]))
        labels.append(label)
        needed[0] += need(what) + (spare if what == "spool" else 0)
    shown = {f"{' + '.join(labels)}: {free >> 20} MiB free, {n[0] >> 20} MiB needed":
             free < n[0] for labels, free, n in filesystems.values()}
    if any(shown.values()):
        return Check(TARGET, "space", "fail", "not enough free space: " + "; ".join(
            s for s, short in shown.items() if short), "free space there, or point TMPDIR "
            "(the spool) at a bigger filesystem on the target")
    if unknown:
        return Check(TARGET, "space", "unavailable", "; ".join(
            [*shown, f"{', '.join(unknown)}: not told over the API"]))
    if memory == MEMORY_NOT_ON_DISK:
        shown["post-copy: the memory is not written there"] = False
    return Check(TARGET, "space", "pass", "; ".join(shown))


def _privileges_check(facts: Facts, rest: RestoreOptions) -> Check:
    if facts.privileges is None:
        return Check(TARGET, "privileges", "unavailable",
                     "what the container asks for cannot be read from here")
    asked = [privileges.PrivilegeRequest(kind, detail) for kind, detail in facts.privileges]
    if not asked:
        return Check(TARGET, "privileges", "pass", "an ordinary container")
    if rest.allow_privileged:
        return Check(TARGET, "privileges", "pass",
                     f"asks for {privileges.summary(asked)}: allowed (--allow-privileged)")
    try:
        privileges.check(asked, allow_privileged=False)  # the restore's own gate
    except CtrmigError as e:
        return Check(TARGET, "privileges", "fail", e.message, e.hint or "")
    raise AssertionError("unreachable")  # pragma: no cover
