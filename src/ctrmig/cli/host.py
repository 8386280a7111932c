"""The host: doctor, the demo, and the API services ctrmig starts."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

import ctrmig
from ctrmig import demo as _demo
from ctrmig import doctor as _doctor
from ctrmig.cli.app import (
    API_ENGINES,
    STATUS_STYLE,
    cli,
    console_out,
    url_option,
)
from ctrmig.errors import OptionError


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
            table.add_row(c.name, f"[{STATUS_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
        out = console_out()
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
