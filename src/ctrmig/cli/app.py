"""The command group, its error handling and what every command shares: engine
selection, progress bars, and the option flags made from :mod:`ctrmig.options`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
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

import ctrmig
from ctrmig import options, settings
from ctrmig.archive import COMPRESSIONS
from ctrmig.archive.streams import Progress as ProgressCallback
from ctrmig.errors import ERROR_LINE, ContainerNotFoundError, CtrmigError, OptionError
from ctrmig.host import scratch
from ctrmig.options import Options

log = logging.getLogger("ctrmig")


F = TypeVar("F", bound=Callable[..., Any])


ENGINE_HELP = "Engine: podman, docker, runc or process [env: CTRMIG_ENGINE; default: detected]."


URL_HELP = "podman/docker API URL [env: CTRMIG_PODMAN_URL, DOCKER_HOST]."


API_ENGINES = ("podman", "docker")  # the engines reached through an API URL

#: How doctor's and preflight's tables colour a check's status.
STATUS_STYLE = {"pass": "green", "fail": "red", "unavailable": "yellow"}


def console_out() -> Console:
    """stdout; tables keep their shape when piped (a terminal sets its own width)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    return console


def console_err() -> Console:
    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns every CtrmigError into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtrmigError as e:
            obj = ctx.obj or {}
            fail(e, verbose=bool(obj.get("verbose")), as_json=bool(obj.get("json_errors")))


def fail(e: CtrmigError, *, verbose: bool, as_json: bool = False) -> NoReturn:
    click.echo(f"ctrmig: error: {e.message}", err=True)
    if e.hint:
        click.echo(f"hint: {e.hint}", err=True)
    if verbose and e.stderr:
        click.echo(e.stderr.rstrip(), err=True)
    if as_json:
        click.echo(ERROR_LINE + json.dumps({"type": type(e).__name__, "message": e.message,
                                            "hint": e.hint}), err=True)
    raise click.exceptions.Exit(1)


def connect(engine: str, url: str | None) -> ctrmig.Migrator:
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
            m = connect(engine, url)
            try:
                if m.exists(container):
                    found.append(engine)
            finally:
                m.close()
        except CtrmigError as e:
            log.debug("%s: not usable for %s: %s", engine, container, e)
    return found


def pick_engine(engine: str | None, container: str, url: str | None) -> str:
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


@contextlib.contextmanager
def progress_bar(label: str, total: int | None = None) -> Iterator[ProgressCallback | None]:
    """A byte progress bar on stderr when both streams are terminals, else nothing."""
    console = console_err()
    if not (console.is_terminal and sys.stdout.isatty()):
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


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


def built(cls: type[Options], flags: dict[str, Any]) -> Options:
    """The ``cls`` options the command line gave (flags of other classes ignored)."""
    names = {f.name for f, _ in options.specs(cls)}
    return options.build(cls, None, {k: v for k, v in flags.items() if k in names})


def spec_option(spec: options.Spec, name: str) -> Callable[[F], F]:
    """A click option for a value-taking :class:`~ctrmig.options.Spec` outside the option
    dataclasses (``--image``, ``--via``): flag, help and metavar from the one declaration."""
    return click.option(spec.cli_flag(name), name, help=spec.help, metavar=spec.metavar)


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
    ctx.with_resource(scratch.private())  # temporary files go where recover can sweep them
    # ctrmig's own notes (what it waits for, an image it loaded) show by default; -v adds
    # its debug log (the commands it runs); -vv every library's too.
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=console_err(), show_path=False)], force=True,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main() -> None:
    """Entry point of the ``ctrmig`` script."""
    cli(prog_name="ctrmig")
