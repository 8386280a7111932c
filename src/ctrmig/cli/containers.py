"""Commands on containers: run (runc), ls, rm, logs, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator

import click
from rich.table import Table

import ctrmig
from ctrmig.cli.app import (
    API_ENGINES,
    cli,
    connect,
    console_out,
    engine_option,
    pick_engine,
    url_option,
)
from ctrmig.engines.base import listing
from ctrmig.errors import CtrmigError


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1)
@click.option("--name", "-n", metavar="NAME", help="Container name [default: generated].")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Add to the image's environment; repeatable.")
@click.option("--volume", "-v", "volumes", multiple=True, metavar="SOURCE:DEST[:ro]",
              help="A named volume (NAME:/path) or a host bind mount (/host/path:/path); "
                   "repeatable.")
def run(image: str, command: tuple[str, ...], name: str | None, env: tuple[str, ...],
        volumes: tuple[str, ...]) -> None:
    """Start a detached runc container from local IMAGE; COMMAND replaces its CMD.

    \b
      ctrmig run -v data:/data -v /srv/www:/www:ro localhost/web /bin/httpd -f
    """
    from ctrmig.engines.runc import RuncMigrator

    with contextlib.closing(RuncMigrator()) as m:
        started = m.run(image, name=name, command=command or None, env=list(env),
                        volumes=volumes)
    console_out().print(f"started runc container {started}")


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
        with contextlib.closing(connect(engine, url)) as m:
            rows = [r for r in listing(m) if show_all or _listed(r.state)]
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    table = Table("engine", "name", "id", "image", "state")
    failed = False
    for name in [engine] if engine else ctrmig.engine_names():
        if url and not engine and name not in API_ENGINES:
            continue
        try:
            with contextlib.closing(connect(name, url)) as m:
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
    console_out().print(table)
    if failed and engine:
        raise click.exceptions.Exit(1)


def _listed(state: str) -> bool:
    """Shown without --all: running, or being checkpointed or restored by a ctrmig."""
    return state.lower() in ("running", "checkpointing", "restoring")


@contextlib.contextmanager
def _engine_for(container: str, engine: str | None,
                url: str | None) -> Iterator[tuple[str, ctrmig.Migrator]]:
    """The engine holding ``container`` (picked as for every command) and its adapter."""
    engine = pick_engine(engine, container, url)
    with contextlib.closing(connect(engine, url)) as m:
        yield engine, m


@cli.command("rm")
@click.argument("container")
@engine_option
@url_option
def rm(container: str, engine: str | None, url: str | None) -> None:
    """Remove CONTAINER (stopping it first)."""
    with _engine_for(container, engine, url) as (name, m):
        m.remove(container)
    console_out().print(f"removed {name} container {container}")


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
    console_out().print(f"resumed {name} container {container}")
