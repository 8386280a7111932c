"""Can this migration go? Every check made before anything is frozen.

A migration that fails after the source froze costs a stop of the service and a
rollback. :func:`preflight` asks both hosts first and returns a :class:`PreflightReport` of named
checks, each ``pass``, ``fail`` or ``unavailable`` (could not be told from here) with a
one-line detail and a fix; :func:`ctrmig.migrate` runs the same checks and raises one
:class:`~ctrmig.errors.PreflightError` listing every failure before the source is touched.

Each side is checked where it runs: in this process for a local engine; by ctrmig on
the other host (the hidden ``ctrmig preflight`` command, JSON in and out) for an ssh
address; through the engine's API for a podman or docker API address, where what only
the host can tell (its CRIU, CPU, paths, ports) is ``unavailable``. The source side
gathers :class:`Facts` (the container's image, mounts, ports, sizes, privileges, the
host's CRIU version and CPU: :mod:`.facts`); the target side judges them (:mod:`.target`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ctrmig import endpoints, options, settings
from ctrmig.direct import route as direct_route
from ctrmig.engines.remote import RemoteMigrator, _remote_error
from ctrmig.errors import BusyError, CommandError, CtrmigError, OptionError
from ctrmig.host import criu, proc, resources
from ctrmig.options import CheckpointOptions, RestoreOptions
from ctrmig.preflight.facts import describe, engine_facts
from ctrmig.preflight.report import (
    API_UNTOLD,
    MEMORY_IN_ARCHIVE,
    MEMORY_IN_PAGES,
    MEMORY_NOT_ON_DISK,
    SETUP,
    SOURCE,
    TARGET,
    Check,
    Facts,
    PreflightReport,
    Status,
)
from ctrmig.preflight.target import feature, options_check, publish_ports, target_side
from ctrmig.protocol import Migrator

__all__ = ["Check", "Facts", "PreflightReport", "Status", "answer", "preflight",
           "publish_ports", "require", "run", "source_side", "split_options", "target_side"]


# --- the public entry points ----------------------------------------------------------------


def preflight(
    container: str,
    *,
    source: Migrator | str,
    target: Migrator | str,
    name: str | None = None,
    checkpoint_options: CheckpointOptions | Mapping[str, object] | None = None,
    restore_options: RestoreOptions | Mapping[str, object] | None = None,
    route: str = "auto",
    **flat: object,
) -> PreflightReport:
    """Check, without freezing anything, whether ``container`` can move from ``source`` to
    ``target`` (migrators or ``ENGINE[+ADDRESS]`` strings, as for :func:`ctrmig.migrate`).

    Options are those of migrate: as ``checkpoint_options``/``restore_options``, or flat
    (``include_image=False``, ``lazy_pages=True``, ``publish_ports=["8080:80"]``), and
    its ``route`` (where the memory lands on the target, for the space it needs).
    """
    ckpt, rest = split_options(checkpoint_options, restore_options, flat)
    rest = dataclasses.replace(rest, name=name or rest.name or container)
    opened: list[Migrator] = []

    def connect(end: Migrator | str) -> Migrator:
        if isinstance(end, str):
            opened.append(endpoints.connect(end))
            return opened[-1]
        return end

    try:
        return run(container, connect(source), connect(target), ckpt, rest, route)
    finally:
        for m in opened:
            m.close()


def require(container: str, source: Migrator, target: Migrator, ckpt: CheckpointOptions,
            rest: RestoreOptions, route: str = "auto") -> PreflightReport:
    """Run every check; raise one PreflightError listing each failure (migrate's gate)."""
    report = run(container, source, target, ckpt, rest, route)
    if not report.ok:
        raise report.error()
    return report


def split_options(ckpt: CheckpointOptions | Mapping[str, object] | None,
                  rest: RestoreOptions | Mapping[str, object] | None,
                  flat: Mapping[str, object]) -> tuple[CheckpointOptions, RestoreOptions]:
    """Both option sets; a flat name goes to each class that has it (tcp_established)."""
    names = {cls: {f.name for f, _ in options.specs(cls)}
             for cls in (CheckpointOptions, RestoreOptions)}
    unknown = set(flat) - names[CheckpointOptions] - names[RestoreOptions]
    if unknown:
        raise OptionError(f"unknown option(s): {', '.join(sorted(unknown))}")
    def pick(cls: type[Any], given: Any) -> dict[str, object]:
        return {**(given or {}), **{k: v for k, v in flat.items() if k in names[cls]}}

    return (options.build(CheckpointOptions, ckpt if isinstance(ckpt, CheckpointOptions)
                          else None, pick(CheckpointOptions, _mapping(ckpt))),
            options.build(RestoreOptions, rest if isinstance(rest, RestoreOptions)
                          else None, pick(RestoreOptions, _mapping(rest))))


def _mapping(given: object) -> Mapping[str, object] | None:
    return given if isinstance(given, Mapping) else None


def run(container: str, source: Migrator, target: Migrator, ckpt: CheckpointOptions,
        rest: RestoreOptions, route: str = "auto") -> PreflightReport:
    """Every check of moving ``container`` (``rest.name`` set) from source to target by
    ``route`` (one of migrate's)."""
    assert rest.name is not None
    memory = MEMORY_IN_ARCHIVE
    if direct_route.choose(route, source, target):
        memory = MEMORY_NOT_ON_DISK if rest.lazy_pages else MEMORY_IN_PAGES
    if isinstance(source, RemoteMigrator):
        answer = _ask(source, SOURCE, {"checkpoint_options": _plain(ckpt)}, container)
        facts = Facts.from_dict(answer.get("facts") or {"engine": source.engine,
                                                        "container": container})
        checks = answer["checks"]
    else:
        facts, checks = source_side(source, container, ckpt, local=_is_local(source))
    request = {"facts": asdict(facts), "checkpoint_options": _plain(ckpt),
               "restore_options": _plain(rest), "memory": memory}
    beside = _ctrmig_beside(target)
    if isinstance(target, RemoteMigrator):
        checks += _ask(target, TARGET, request)["checks"]
    elif beside is not None and _answers(there := _ask(beside, TARGET, request)):
        checks += there["checks"]  # the API through ssh, and ctrmig there tells the rest
    else:
        checks += target_side(target, facts, ckpt, rest, local=_is_local(target),
                              memory=memory)
    return PreflightReport(container, _where(source), _where(target), checks)


def answer(m: Migrator, role: str, container: str | None,
           request: Mapping[str, Any]) -> dict[str, Any]:
    """This host's side of a preflight another ctrmig asked for over ssh (the hidden
    ``ctrmig preflight`` command): the request and the answer are JSON documents."""
    ckpt = options.build(CheckpointOptions, None, request.get("checkpoint_options"))
    if role == SOURCE:
        facts, checks = source_side(m, container or "", ckpt, local=True)
        return {"facts": asdict(facts), "checks": [asdict(c) for c in checks]}
    rest = options.build(RestoreOptions, None, request.get("restore_options"))
    facts = Facts.from_dict(request["facts"])
    memory = str(request.get("memory") or MEMORY_IN_ARCHIVE)
    checks = target_side(m, facts, ckpt, rest, local=True, memory=memory)
    return {"checks": [asdict(c) for c in checks]}


# --- the source side ------------------------------------------------------------------------


def source_side(m: Migrator, container: str, ckpt: CheckpointOptions, *,
                local: bool) -> tuple[Facts, list[Check]]:
    """The container's facts, and the source's own checks (CRIU, its options)."""
    facts = Facts(m.engine, container, carries_images=bool(getattr(m, "carries_images", 0)))
    busy = m.operations().get(container) if hasattr(m, "operations") else None
    if busy:  # what checkpoint would raise: the state is changing, nothing to judge yet
        raise BusyError(f"{m.engine} container {container!r} is busy: another ctrmig is "
                        f"{busy} it", hint="wait for it to finish, then try again")
    checks = [_criu_source(facts, ckpt) if local else
              Check(SOURCE, "criu", "unavailable", API_UNTOLD.format(engine=m.engine))]
    try:
        engine_facts(m, container, facts, local=local)
        facts.found = True
        checks.append(Check(SOURCE, "container", "pass", describe(facts)))
    except CtrmigError as e:
        checks.append(Check(SOURCE, "container", "fail", e.message, e.hint or ""))
    except (OSError, ValueError, KeyError) as e:  # /proc or an answer changed under us
        checks.append(Check(SOURCE, "container", "unavailable", f"not all facts read: {e!r}"))
    checks.append(options_check(SOURCE, m, ckpt, "checkpoint_options", "checkpoint"))
    if ckpt.include_image and not facts.carries_images:
        checks.append(Check(SOURCE, "image", "fail", f"the {m.engine} engine cannot carry "
                            "images in archives", "migrate with --no-include-image"))
    if ckpt.pre_checkpoint:
        checks.append(feature(SOURCE, "pre-checkpoint", criu.memory_tracking_supported(),
                               "memory tracking (soft-dirty)", "CONFIG_MEM_SOFT_DIRTY=y"))
    return facts, checks


def _criu_source(facts: Facts, ckpt: CheckpointOptions) -> Check:
    facts.host = resources.host_key()
    facts.criu_version = criu.version()
    if not facts.criu_version:
        return Check(SOURCE, "criu", "fail", "criu is not installed", SETUP)
    try:
        facts.cpuinfo = base64.b64encode(criu.cpuinfo_dump()).decode()
    except CtrmigError as e:
        return Check(SOURCE, "criu", "fail", f"criu cpuinfo dump: {e.message}", SETUP)
    return Check(SOURCE, "criu", "pass", f"version {facts.criu_version}; CPU recorded")


# --- helpers --------------------------------------------------------------------------------


def _is_local(m: Migrator) -> bool:
    """Whether ``m``'s engine runs on this host (no API address, or a unix socket)."""
    url = str(getattr(m, "url", None) or getattr(m, "base_url", None) or "")
    return not url or url.startswith(("unix://", "http+unix://"))


def _where(m: Migrator) -> str:
    address = getattr(m, "address", None) or getattr(m, "url", None) or getattr(
        m, "base_url", None)
    return f"{m.engine}+{address}" if address else m.engine


def _plain(opts: CheckpointOptions | RestoreOptions) -> dict[str, Any]:
    """Options as JSON: what the command line can carry (no callbacks)."""
    return {f.name: getattr(opts, f.name) for f, spec in options.specs(type(opts))
            if not spec.internal}


def _ctrmig_beside(m: Migrator) -> RemoteMigrator | None:
    """For an API reached through ssh (``podman+ssh://host/socket``): ctrmig on that host,
    asked about that same socket, which can tell what the API cannot (CRIU, CPU, mounts,
    ports, space). None for any other target."""
    url = str(getattr(m, "url", ""))
    if m.engine != "podman" or not url.startswith("ssh://"):
        return None
    parts = urlsplit(url)
    socket = parts.path or str(settings.DEFAULT_PODMAN_SOCKET)
    return RemoteMigrator(m.engine, urlunsplit(parts._replace(path="")),
                          remote_args=["--url", f"unix://{socket}"],
                          ssh_options=settings.current().ssh_options)


def _answers(answer: Mapping[str, Any]) -> bool:
    """Whether ctrmig on the other host answered (an API target does not need it there)."""
    return not any(c.name == "ctrmig" and c.status == "fail" for c in answer["checks"])


def _ask(m: RemoteMigrator, role: str, request: Mapping[str, Any],
         container: str | None = None) -> dict[str, Any]:
    """One side's checks from ctrmig on the other host; ssh's failure is a check too."""
    args = ["preflight", role, *([container] if container else [])]
    try:
        res = m.call(*args, input=json.dumps(request).encode())
    except CommandError as e:
        res = None
        error = e.message
    if res is not None and res.returncode == 0:
        data: dict[str, Any] = json.loads(res.stdout)
        data["checks"] = [Check(**c) for c in data.get("checks", [])]
        data["checks"].insert(0, Check(role, "ssh", "pass", f"{m.address}: ctrmig answers"))
        return data
    if res is not None and res.returncode != 255:  # ssh itself exits 255 on its failures
        err = _remote_error(res.stderr.decode(errors="replace"), f"ctrmig on {m.address}")
        if isinstance(err, BusyError):
            raise err  # as a local source would: nothing to judge while it changes
        hint = err.hint or ("update ctrmig there: it has no preflight" if "No such command"
                            in err.message else "install ctrmig there, or set "
                            "CTRMIG_REMOTE_COMMAND")
        return {"checks": [Check(role, "ssh", "pass", f"{m.address}: reached"),
                           Check(role, "ctrmig", "fail", err.message, hint)]}
    if res is not None:
        error = proc.tail(res.stderr.decode(errors="replace"), 1) or "exit 255"
    return {"checks": [Check(role, "ssh", "fail", f"{m.address}: {error}",
                             "check that `ssh` reaches that host without a prompt")]}
