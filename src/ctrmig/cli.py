"""The ``ctrmig`` command line: a thin shell over the public Python API.

Exit codes: 0 success, 1 the operation failed (any :class:`~ctrmig.errors.CtrmigError`,
reported as one ``ctrmig: error:`` line and a hint), 2 usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

import ctrmig
from ctrmig import demo as _demo
from ctrmig import doctor as _doctor
from ctrmig import options, settings
from ctrmig.archive import COMPRESSIONS, Manifest
from ctrmig.archive.privileges import PrivilegeRequest, archive_privileges, summary
from ctrmig.archive.streams import Progress as ProgressCallback
from ctrmig.archive.writer import check_compression
from ctrmig.direct.route import ROUTES
from ctrmig.engines.base import listing
from ctrmig.errors import ERROR_LINE, ContainerNotFoundError, CtrmigError, OptionError
from ctrmig.options import CheckpointOptions, Options, RestoreOptions

log = logging.getLogger("ctrmig")
F = TypeVar("F", bound=Callable[..., Any])

ENGINE_HELP = "Engine: podman, docker, runc or process [env: CTRMIG_ENGINE; default: detected]."
URL_HELP = "podman/docker API URL [env: CTRMIG_PODMAN_URL, DOCKER_HOST]."
API_ENGINES = ("podman", "docker")  # the engines reached through an API URL


def _out() -> Console:
    """stdout; tables keep their shape when piped (a terminal sets its own width)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False)


# --- errors and exit codes ------------------------------------------------------------------


class _Group(click.Group):
    """Turns every CtrmigError into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtrmigError as e:
            obj = ctx.obj or {}
            _fail(e, verbose=bool(obj.get("verbose")), as_json=bool(obj.get("json_errors")))


def _fail(e: CtrmigError, *, verbose: bool, as_json: bool = False) -> NoReturn:
    click.echo(f"ctrmig: error: {e.message}", err=True)
    if e.hint:
        click.echo(f"hint: {e.hint}", err=True)
    if verbose and e.stderr:
        click.echo(e.stderr.rstrip(), err=True)
    if as_json:
        click.echo(ERROR_LINE + json.dumps({"type": type(e).__name__, "message": e.message,
                                            "hint": e.hint}), err=True)
    raise click.exceptions.Exit(1)


# --- engine selection ------------------------------------------------------------------------


def _connect(engine: str, url: str | None) -> ctrmig.Migrator:
    """The adapter for ``engine``; ``url`` goes to podman's or docker's client."""
    if url and engine == "podman":
        return ctrmig.migrator("podman", url=url)
    if url and engine == "docker":
        return ctrmig.migrator("docker", base_url=url)
    if url:
        raise OptionError(f"--url does not apply to the {engine} engine",
                          hint="--url is for podman and docker")
    return ctrmig.migrator(engine)


def _holders(container: str, url: str | None) -> list[str]:
    """Engines that are reachable and hold ``container``."""
    found = []
    for engine in ctrmig.engine_names():
        if url and engine not in API_ENGINES:
            continue
        try:
            m = _connect(engine, url)
            try:
                if m.exists(container):
                    found.append(engine)
            finally:
                m.close()
        except CtrmigError as e:
            log.debug("%s: not usable for %s: %s", engine, container, e)
    return found


def _pick(engine: str | None, container: str, url: str | None) -> str:
    """``--engine``/CTRMIG_ENGINE if given, else the only reachable engine holding it."""
    if engine:
        return engine
    found = _holders(container, url)
    if not found:
        raise ContainerNotFoundError(
            f"no reachable engine holds a container {container!r}",
            hint="check the name with `ctrmig ls`, or pick the engine with --engine",
        )
    if len(found) > 1:
        raise OptionError(
            f"{container!r} exists in several engines: {', '.join(found)}",
            hint="pick one with --engine",
        )
    return found[0]


# --- progress ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(label: str, total: int | None = None) -> Iterator[ProgressCallback | None]:
    """A byte progress bar on stderr when both streams are terminals, else nothing."""
    console = _err()
    if not (console.is_terminal and sys.stdout.isatty()):
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


# --- options: flags made from the one table in ctrmig.options -----------------------------

#: Options ``migrate`` spells itself (its --name and --compress mean the whole move's).
_MIGRATE_OWN = frozenset({"name", "compression"})


def option_flags(*classes: type[Any], migrate: bool = False) -> Callable[[F], F]:
    """click options for every field of the option dataclasses ``classes`` (an option in
    several, e.g. tcp_established, once): what the API has, the CLI offers."""
    decorators = []
    seen: set[str] = set()
    for cls in classes:
        for f, spec in options.specs(cls):
            if spec.internal or f.name in seen or (
                    migrate and (spec.not_for_migrate or f.name in _MIGRATE_OWN)):
                continue
            seen.add(f.name)
            decls = [spec.cli_flag(f.name), *([spec.short] if spec.short else []), f.name]
            kwargs: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar}
            if f.name == "compression":
                kwargs |= {"type": click.Choice(COMPRESSIONS), "default": f.default,
                           "show_default": True}
            elif f.type == "tuple[str, ...]":
                kwargs |= {"multiple": True}
            elif "/" in decls[0]:
                kwargs |= {"default": f.default}
            elif f.type == "bool":
                kwargs |= {"is_flag": True}
            decorators.append(click.option(*decls, **kwargs))

    def decorate(command: F) -> F:
        for option in reversed(decorators):
            command = option(command)
        return command

    return decorate


def _built(cls: type[Options], flags: dict[str, Any]) -> Options:
    """The ``cls`` options the command line gave (flags of other classes ignored)."""
    names = {f.name for f, _ in options.specs(cls)}
    return options.build(cls, None, {k: v for k, v in flags.items() if k in names})


# --- the commands ------------------------------------------------------------------------------

engine_option = click.option(
    "--engine", "-e", type=click.Choice(ctrmig.engine_names()), envvar="CTRMIG_ENGINE",
    help=ENGINE_HELP)
url_option = click.option("--url", metavar="URL", help=URL_HELP)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ctrmig.__version__, "--version", "-V", prog_name="ctrmig")
@click.option("-v", "--verbose", count=True,
              help="Debug log and tools' stderr on errors (-vv: libraries' too).")
@click.option("--json-errors", is_flag=True, hidden=True,
              help="Also report a failure as one JSON line (for a ctrmig driving this one).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, json_errors: bool) -> None:
    """Checkpoint running containers with CRIU into one portable archive, and restore
    them: podman, docker, runc and plain processes.

    \b
      ctrmig checkpoint web -o web.ckpt.tar
      ctrmig restore web.ckpt.tar --name web2
      ctrmig inspect web.ckpt.tar
    """
    ctx.obj = {"verbose": verbose, "json_errors": json_errors}
    settings.use(settings.load(os.environ))  # the environment, read once, here
    # ctrmig's own notes (what it waits for, an image it loaded) show by default; -v adds
    # its debug log (the commands it runs); -vv every library's too.
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=_err(), show_path=False)], force=True,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


@cli.command()
@click.argument("container")
@click.option("-o", "--output", "archive", required=True, type=click.Path(dir_okay=False),
              help="Archive file to write ('-': standard output).")
@engine_option
@url_option
@option_flags(CheckpointOptions)
def checkpoint(container: str, archive: str, engine: str | None, url: str | None,
               **flags: Any) -> None:
    """Checkpoint CONTAINER into one archive file (stops it unless --leave-running)."""
    opts = _built(CheckpointOptions, flags)
    print_stats = opts.print_stats
    engine = _pick(engine, container, url)
    to_stdout = archive == "-"
    started = time.monotonic()
    with contextlib.closing(_connect(engine, url)) as m, \
            _progress(f"checkpoint {container}") as progress:
        result = m.checkpoint(container, sys.stdout.buffer if to_stdout else archive, opts,
                              progress=progress)
    mf = result.manifest
    if to_stdout:  # stdout carries the archive: say nothing more there
        return
    _out().print(f"checkpointed {engine} container {mf.container.name} -> {archive} "
                 f"({_size(result.size)}; memory {_size(mf.memory_bytes)}, "
                 f"rootfs diff {_size(mf.rootfs_diff_bytes)})")
    if print_stats:
        table = Table(show_header=False, box=None)
        for key, value in (("time", f"{time.monotonic() - started:.2f} s"),
                           ("files", str(len(mf.files))), ("total", _size(mf.total_bytes)),
                           ("criu statistics", "stats-dump in the archive"
                            if "stats-dump" in mf.files else "-"),
                           *((k, json.dumps(v, default=str)) for k, v in mf.extra.items()
                             if "stat" in k.lower())):
            table.add_row(f"[bold]{key}[/]", value)
        _out().print(table)


@cli.command()
@click.argument("archive", type=click.Path(dir_okay=False))
@engine_option
@url_option
@option_flags(RestoreOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore(archive: str, engine: str | None, url: str | None, as_json: bool,
            **flags: Any) -> None:
    """Restore ARCHIVE into a running container (engine: the archive's, by default).

    ARCHIVE '-' reads the archive from standard input (then --engine is required).
    """
    total = None
    if archive == "-" and engine is None:
        raise click.UsageError("--engine is required when the archive comes from stdin")
    if engine is None:
        manifest = ctrmig.inspect(archive)
        engine, total = manifest.engine, manifest.total_bytes
    source = sys.stdin.buffer if archive == "-" else archive
    with contextlib.closing(_connect(engine, url)) as m, \
            _progress(f"restore {Path(archive).name}", total) as progress:
        restored = m.restore(source, _built(RestoreOptions, flags), progress=progress)
    if as_json:
        click.echo(json.dumps({"engine": engine, "name": restored}))
    else:
        _out().print(f"restored {engine} container {restored}")


def _pids(manifest: Manifest) -> list[int]:
    """PIDs (inside the container) of the dumped processes, from CRIU's core-PID.img names."""
    pids = []
    for path in manifest.files:
        base = os.path.basename(path)
        if base.startswith("core-") and base.endswith(".img") and base[5:-4].isdigit():
            pids.append(int(base[5:-4]))
    return sorted(pids)


@cli.command()
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(archive: str, as_json: bool) -> None:
    """Show what ARCHIVE holds, where it came from, and whether its checksums hold."""
    mf = ctrmig.inspect(archive)
    try:
        ctrmig.verify(archive)
        checksums = "ok"
    except CtrmigError as e:
        checksums = e.message
    pids = _pids(mf)
    sizes = {"memory_bytes": mf.memory_bytes, "rootfs_diff_bytes": mf.rootfs_diff_bytes,
             "total_bytes": mf.total_bytes, "archive_bytes": Path(archive).stat().st_size}
    asks = _privileges(Path(archive)) if checksums == "ok" else "not judged (checksums)"
    if as_json:
        listed = asks if isinstance(asks, str) else [dataclasses.asdict(r) for r in asks]
        data = mf.to_dict() | {"sizes": sizes, "pids": pids, "checksums": checksums,
                               "privileges": listed}
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        shown = asks if isinstance(asks, str) else summary(asks) or "none"
        _print_inspect(mf, sizes, pids, checksums, shown)
    if checksums != "ok":
        raise click.exceptions.Exit(1)


def _privileges(archive: Path) -> list[PrivilegeRequest] | str:
    """What the archive asks beyond an ordinary container (what restore would refuse
    without --allow-privileged), or why that cannot be told."""
    try:
        return archive_privileges(archive)
    except CtrmigError as e:
        return f"unreadable: {e.message}"


def _print_inspect(mf: Manifest, sizes: dict[str, int], pids: list[int],
                   checksums: str, privileges: str) -> None:
    """inspect's tables: the facts, then the files."""
    c = mf.container
    table = Table(show_header=False, box=None)
    for key, value in (
        ("engine", f"{mf.engine} {mf.engine_version}".strip()),
        ("container", f"{c.name} ({c.id[:12]})" if c.id else c.name),
        ("image", c.image), ("command", " ".join(c.command)), ("created", mf.created),
        ("criu", mf.criu_version), ("kernel", f"{mf.kernel} {mf.arch}".strip()),
        ("source host", mf.source_host),
        ("memory pages", _size(mf.memory_bytes)), ("rootfs diff", _size(mf.rootfs_diff_bytes)),
        ("total", f"{_size(mf.total_bytes)} in {len(mf.files)} files "
                  f"({_size(sizes['archive_bytes'])} on disk)"),
        ("processes", ", ".join(f"pid {p}" for p in pids) or "-"),
        ("checksums", checksums),
        ("privileges", privileges),
    ):
        table.add_row(f"[bold]{key}[/]", str(value) or "-")
    files = Table("file", "size")
    for path, entry in sorted(mf.files.items()):
        files.add_row(path, _size(entry.size))
    out = _out()
    out.print(table)
    out.print(files)


@cli.command("ls")
@engine_option
@url_option
@click.option("--all", "-a", "show_all", is_flag=True,
              help="Also list stopped containers (busy ones are always listed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one engine: --engine).")
def ls(engine: str | None, url: str | None, show_all: bool, as_json: bool) -> None:
    """List checkpointable (running) containers, per engine."""
    if as_json:
        if engine is None:
            raise click.UsageError("--json lists one engine: pass --engine")
        with contextlib.closing(_connect(engine, url)) as m:
            rows = [r for r in listing(m) if show_all or _listed(r.state)]
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    table = Table("engine", "name", "id", "image", "state")
    failed = False
    for name in [engine] if engine else ctrmig.engine_names():
        if url and not engine and name not in API_ENGINES:
            continue
        try:
            with contextlib.closing(_connect(name, url)) as m:
                rows = listing(m)
        except CtrmigError as e:
            table.add_row(name, f"[red]unreachable[/]: {e.message}", "", "", "")
            failed = True
            continue
        shown = [r for r in rows if show_all or _listed(r.state)]
        for r in shown:
            table.add_row(r.engine, r.name, r.id[:12], r.image, r.state)
        if not shown:
            table.add_row(name, "[dim](none)[/]", "", "", "")
    _out().print(table)
    if failed and engine:
        raise click.exceptions.Exit(1)


def _listed(state: str) -> bool:
    """Shown without --all: running, or being checkpointed or restored by a ctrmig."""
    return state.lower() in ("running", "checkpointing", "restoring")


_STATUS_STYLE = {"pass": "green", "fail": "red", "unavailable": "yellow"}


@cli.command()
@click.option("--engine", "-e", "engines", type=click.Choice(ctrmig.engine_names()), multiple=True,
              help="Engine(s) to check [default: podman, docker, runc]; repeatable.")
@click.option("--podman-url", metavar="URL", help="podman API URL [env: CTRMIG_PODMAN_URL].")
@click.option("--docker-url", metavar="URL", help="docker API URL [env: DOCKER_HOST].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def doctor(engines: tuple[str, ...], podman_url: str | None, docker_url: str | None,
           as_json: bool) -> None:
    """Check what this host needs to checkpoint and restore; exit 0 if the engines are
    usable."""
    report = _doctor.diagnose(engines or _doctor.ENGINES, podman_url=podman_url,
                              docker_url=docker_url)
    if as_json:
        click.echo(report.to_json())
    else:
        table = Table("check", "status", "detail", "fix")
        for c in report.checks:
            table.add_row(c.name, f"[{_STATUS_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
        out = _out()
        out.print(table)
        for name, usable in report.engines.items():
            out.print(f"{name}: {'[green]usable[/]' if usable else '[red]not usable[/]'}")
    if not report.ok:
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--engine", "-e", type=click.Choice(_demo.ENGINES), default="podman",
              show_default=True, help="Engine to run the demo on.")
@url_option
@click.option("--no-tty", is_flag=True, help="Do not show the train; just report the columns.")
@click.option("--pause", type=float, default=2.0, show_default=True,
              help="Seconds between checkpoint and restore.")
def demo(engine: str, url: str | None, no_tty: bool, pause: float) -> None:
    """Checkpoint Debian's sl mid-screen and restore it: the train drives on.

    Builds localhost/screen_locomotive:latest if missing, runs it, checkpoints it while
    the train crosses the screen, restores it under a new name and compares the train's
    column in the two real container logs. Exit 0 only if it resumed where it stopped.
    """
    interactive = not no_tty and sys.stdout.isatty()
    say = None if interactive else (lambda msg: click.echo(msg, err=True))
    result = _demo.run_demo(engine, url=url, interactive=interactive, pause=pause, say=say)
    click.echo(f"column at checkpoint: {result.checkpoint_column}")
    click.echo(f"column at restore:    {result.restore_column}")
    click.echo(f"cursor addressing: last before {_cup(result.last_position_before)}, "
               f"first after {_cup(result.first_position_after)}")
    if result.ok:
        click.echo("the train drove on from where it stopped")
    else:
        click.echo("the train did NOT resume where it stopped", err=True)
        raise click.exceptions.Exit(1)


def _runs(pid: int, program: str) -> bool:
    """Whether process ``pid`` still runs ``program`` (a pidfile can outlive its process)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return Path(argv0).name == Path(program).name


def _cup(pos: tuple[int, int] | None) -> str:
    return f"ESC[{pos[0]};{pos[1]}H" if pos else "-"


@cli.command()
@click.argument("action", type=click.Choice(("start", "stop", "status")))
@click.argument("service", type=click.Choice(API_ENGINES))
def service(action: str, service: str) -> None:
    """Start, stop or query podman's API service or dockerd on the default socket.

    podman: /run/podman/podman.sock; docker: /var/run/docker.sock. Pidfiles and logs
    live under /run/ctrmig; stop only stops a service that ctrmig started.
    """
    from ctrmig.host import services

    svc = services.podman_service() if service == "podman" else services.dockerd_service()
    alive, pid = svc.alive(), svc.pid()
    if action == "start":
        svc.start()
        click.echo(f"{svc.name} answers on {svc.socket}" + (" (already running)" if alive
                                                            else f" (pid {svc.pid()})"))
    elif action == "stop":
        if pid is not None and not alive and not _runs(pid, svc.argv[0]):
            svc.pidfile.unlink(missing_ok=True)  # stale: never signal a reused PID
            pid = None
        if pid is None:
            if alive:
                raise OptionError(f"{svc.name} on {svc.socket} was not started by ctrmig",
                                  hint="stop it the way it was started")
            click.echo(f"{svc.name} is not running")
            return
        svc.stop()
        click.echo(f"{svc.name} (pid {pid}) stopped")
    else:
        state = "running" if alive else "not running"
        owner = f", pid {pid} (started by ctrmig)" if pid is not None and alive else ""
        click.echo(f"{svc.name}: {state} on {svc.socket}{owner}")
        if not alive:
            raise click.exceptions.Exit(1)


@contextlib.contextmanager
def _engine_for(container: str, engine: str | None,
                url: str | None) -> Iterator[tuple[str, ctrmig.Migrator]]:
    """The engine holding ``container`` (picked as for every command) and its adapter."""
    engine = _pick(engine, container, url)
    with contextlib.closing(_connect(engine, url)) as m:
        yield engine, m


@cli.command("rm")
@click.argument("container")
@engine_option
@url_option
def rm(container: str, engine: str | None, url: str | None) -> None:
    """Remove CONTAINER (stopping it first)."""
    with _engine_for(container, engine, url) as (name, m):
        m.remove(container)
    _out().print(f"removed {name} container {container}")


@cli.command()
@click.argument("container")
@engine_option
@url_option
def logs(container: str, engine: str | None, url: str | None) -> None:
    """Print CONTAINER's output so far."""
    with _engine_for(container, engine, url) as (_, m):
        click.echo(m.logs(container), nl=False)


@cli.command()
@click.argument("container")
@engine_option
@url_option
def resume(container: str, engine: str | None, url: str | None) -> None:
    """Run again CONTAINER, stopped by a checkpoint, from the checkpoint the engine kept."""
    with _engine_for(container, engine, url) as (name, m):
        m.resume(container)
    _out().print(f"resumed {name} container {container}")


@cli.command()
@click.argument("container")
@click.option("--from", "source", metavar="ENGINE[+ADDRESS]", required=True,
              help="Where CONTAINER runs, e.g. podman, docker+unix:///run/docker.sock.")
@click.option("--to", "target", metavar="ENGINE[+ADDRESS]", required=True,
              help="Where it should run, e.g. podman+tcp://host:8080, runc+ssh://root@host.")
@click.option("--name", "-n", metavar="NEW", help="Name on the target [default: the same].")
@click.option("--keep-source", is_flag=True, help="Keep the stopped source container.")
@click.option("--compress", "compression", type=click.Choice(("auto", *COMPRESSIONS)),
              default="auto", show_default=True,
              help="Compression on the wire; auto: zstd over ssh, none on local/tcp links.")
@click.option("--route", type=click.Choice(ROUTES), default="auto", show_default=True,
              help="direct: CRIU's pages stream straight to the target while it dumps, "
                   "no archive of the memory (runc -> runc, process -> process); archive: "
                   "the whole archive streams; auto: direct where it applies.")
@option_flags(CheckpointOptions, RestoreOptions, migrate=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate(container: str, source: str, target: str, name: str | None, keep_source: bool,
            compression: str, route: str, as_json: bool, **flags: Any) -> None:
    """Move running CONTAINER from one engine/host to another.

    The archive streams from source to target; the source is removed on success (or
    kept, stopped, with --keep-source) and resumed if anything fails. An ADDRESS is
    unix:// or tcp:// (podman's or docker's API) or ssh://[user@]host[:port] (runs ctrmig
    there; set CTRMIG_REMOTE_COMMAND if it is not on the remote PATH).

    --lazy-pages on the direct route is post-copy: the target runs at once and fetches
    its memory from the source afterwards. The downtime is shortest, but until the last
    page arrived the memory is split between the hosts: if the link or the source breaks
    then, the target is killed and the container runs on at the source; if the source
    host is gone, the container is lost. Never the default.
    """
    with _progress(f"migrate {container}") as progress:
        report = ctrmig.migrate(
            container, source=source, target=target, name=name, keep_source=keep_source,
            compression="auto" if compression == "auto" else check_compression(compression),
            progress=progress, checkpoint_options=_built(CheckpointOptions, flags),
            restore_options=_built(RestoreOptions, flags), route=route,
        )
    if as_json:
        data = dataclasses.asdict(report)
        data.pop("manifest", None)
        click.echo(json.dumps(data))
    else:
        _out().print(report.summary())
        _out().print(report.phases())


@cli.command("_pages", hidden=True)
@click.argument("role", type=click.Choice(("receive", "relay", "clean")))
@click.argument("directory", required=False)
def pages_helper(role: str, directory: str | None) -> None:
    """The target's end of a direct migration's pages, on stdin/stdout (over ssh)."""
    from ctrmig.direct import route as direct_route

    raise click.exceptions.Exit(direct_route.serve_stdio(role, directory))


@cli.command()
def recover() -> None:
    """Finish or roll back migrations whose ctrmig was killed.

    Reads their journals ($CTRMIG_JOURNAL_DIR, default /var/lib/ctrmig/migrations). It
    first waits for whatever may still change the outcome: a checkpoint or restore under
    way on either side, an ssh session still carrying an archive, and, up to
    $CTRMIG_RECOVER_GRACE seconds (60), a target that got the whole archive and may still
    be importing it.
    """
    done = ctrmig.recover()
    for line in done:
        _out().print(line)
    if not done:
        _out().print("nothing to recover")


def main() -> None:
    """Entry point of the ``ctrmig`` script."""
    cli(prog_name="ctrmig")


if __name__ == "__main__":
    main()
