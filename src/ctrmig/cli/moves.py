"""Moving containers between hosts: migrate (and its --check), recover."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any

import click
from rich.table import Table

import ctrmig
from ctrmig import endpoints, options
from ctrmig.archive import COMPRESSIONS
from ctrmig.archive.writer import check_compression
from ctrmig.cli.app import (
    STATUS_STYLE,
    built,
    cli,
    connect,
    console_out,
    engine_option,
    option_flags,
    progress_bar,
    spec_option,
    url_option,
)
from ctrmig.direct.route import ROUTES
from ctrmig.options import CheckpointOptions, RestoreOptions
from ctrmig.preflight import answer as preflight_answer


@cli.command()
@click.argument("container")
@click.option("--from", "source", metavar="ENGINE[+ADDRESS]", required=True,
              help="Where CONTAINER runs, e.g. podman, docker+unix:///run/docker.sock.")
@click.option("--to", "target", metavar="ENGINE[+ADDRESS]", required=True,
              help="Where it should run, e.g. podman+ssh://root@host, runc+ssh://root@host.")
@click.option("--insecure", is_flag=True,
              help="Allow a tcp:// API link: unauthenticated and in clear, root on that "
                   "host to anyone who reaches the port. Prefer podman+ssh:// or "
                   "docker+ssh://.")
@click.option("--name", "-n", metavar="NEW", help="Name on the target [default: the same].")
@click.option("--keep-source", is_flag=True, help="Keep the stopped source container.")
@click.option("--compress", "compression", type=click.Choice(("auto", *COMPRESSIONS)),
              default="auto", show_default=True,
              help="Compression on the wire; auto: zstd over ssh, none on local/tcp links.")
@click.option("--route", type=click.Choice(ROUTES), default="auto", show_default=True,
              help="direct: CRIU's pages stream straight to the target while it dumps, "
                   "no archive of the memory (runc -> runc, process -> process); archive: "
                   "the whole archive streams; auto: direct where it applies.")
@spec_option(options.VIA, "via")
@option_flags(CheckpointOptions, RestoreOptions, migrate=True)
@click.option("--check", is_flag=True,
              help="Only check both hosts (nothing is frozen); exit 0 if the move can go.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate(container: str, source: str, target: str, insecure: bool, name: str | None,
            keep_source: bool, compression: str, route: str, via: str | None, check: bool,
            as_json: bool, **flags: Any) -> None:
    """Move running CONTAINER from one engine/host to another.

    The archive streams from source to target; the source is removed on success (or
    kept, stopped, with --keep-source) and resumed if anything fails. An ADDRESS is
    ssh://[user@]host[:port] (podman: its API socket forwarded through ssh, a path after
    the host names another socket; docker, runc, process: runs ctrmig there, set
    CTRMIG_REMOTE_COMMAND if it is not on the remote PATH), unix:// (an API here), or
    tcp:// (an API over the network in clear: only with --insecure).
    --via REGISTRY/REPO moves it as a checkpoint image through that registry instead.
    Both hosts are checked first (CRIU, CPU, image, mounts, ports, name, space,
    privileges): --check shows those checks and stops there.

    --lazy-pages on the direct route is post-copy: the target runs at once and fetches
    its memory from the source afterwards. The downtime is shortest, but until the last
    page arrived the memory is split between the hosts: if the link or the source breaks
    then, the target is killed and the container runs on at the source; if the source
    host is gone, the container is lost. Never the default.
    """
    if check:
        for side in (source, target):  # the same refusal as the migration's own
            endpoints.check_insecure(side, insecure)
        _print_preflight(ctrmig.preflight(
            container, source=source, target=target, name=name,
            checkpoint_options=built(CheckpointOptions, flags),
            restore_options=built(RestoreOptions, flags),
            route="archive" if via else route), as_json)
        return
    with progress_bar(f"migrate {container}") as progress:
        report = ctrmig.migrate(
            container, source=source, target=target, name=name, keep_source=keep_source,
            compression="auto" if compression == "auto" else check_compression(compression),
            progress=progress, checkpoint_options=built(CheckpointOptions, flags),
            restore_options=built(RestoreOptions, flags), insecure=insecure, route=route,
            via=via,
        )
    if as_json:
        data = dataclasses.asdict(report)
        data.pop("manifest", None)
        click.echo(json.dumps(data))
    else:
        console_out().print(report.summary())
        console_out().print(report.phases())


def _print_preflight(report: ctrmig.PreflightReport, as_json: bool) -> None:
    """migrate --check's table (or JSON); exit 1 unless the migration can go."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table("host", "check", "status", "detail", "fix")
        for c in report.checks:
            table.add_row(c.host, c.name, f"[{STATUS_STYLE[c.status]}]{c.status}[/]",
                          c.detail, c.fix)
        console_out().print(table)
        console_out().print(f"{report.container}: {report.source} -> {report.target}: "
                     + ("[green]can go[/]" if report.ok else
                        f"[red]{len(report.failures)} check(s) failed[/]"))
    if not report.ok:
        raise click.exceptions.Exit(1)


@cli.command("preflight", hidden=True)
@click.argument("role", type=click.Choice(("source", "target")))
@click.argument("container", required=False)
@engine_option
@url_option
def preflight_side(role: str, container: str | None, engine: str | None,
                   url: str | None) -> None:
    """This host's side of another host's `migrate --check` (JSON on stdin and stdout)."""
    request = json.load(sys.stdin)
    with contextlib.closing(connect(engine or "podman", url)) as m:
        click.echo(json.dumps(preflight_answer(m, role, container, request)))


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
        console_out().print(line)
    if not done:
        console_out().print("nothing to recover")
