"""Commands on archives: checkpoint, restore, inspect, verify."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.table import Table

import ctrmig
from ctrmig import images, options
from ctrmig.archive import Manifest, crypto, foreign
from ctrmig.archive.layout import VOLUMES_DIR, volume_member
from ctrmig.archive.privileges import PrivilegeRequest, archive_privileges, summary
from ctrmig.archive.reader import read_signed
from ctrmig.archive.sources import is_encrypted, plaintext
from ctrmig.cli.app import (
    built,
    cli,
    connect,
    console_out,
    engine_option,
    option_flags,
    pick_engine,
    progress_bar,
    size_text,
    spec_option,
    url_option,
)
from ctrmig.errors import READY_LINE, RUNNING_LINE, CtrmigError
from ctrmig.host.files import open_private
from ctrmig.options import CheckpointOptions, RestoreOptions


@cli.command()
@click.argument("container")
@click.option("-o", "--output", "archive", type=click.Path(dir_okay=False),
              help="Archive file to write ('-': standard output).")
@spec_option(options.IMAGE, "image")
@engine_option
@url_option
@option_flags(CheckpointOptions)
def checkpoint(container: str, archive: str | None, image: str | None, engine: str | None,
               url: str | None, **flags: Any) -> None:
    """Checkpoint CONTAINER into one archive file, or a checkpoint image with --image
    (stops it unless --leave-running)."""
    if (archive is None) == (image is None):
        raise click.UsageError("give either -o FILE or --image REF")
    opts = built(CheckpointOptions, flags)
    print_stats = opts.print_stats
    engine = pick_engine(engine, container, url)
    to_stdout = archive == "-"
    started = time.monotonic()
    with contextlib.closing(connect(engine, url)) as m, \
            progress_bar(f"checkpoint {container}") as progress:
        if image is not None:
            result, pushed = images.checkpoint(m, container, image, opts, progress=progress)
            where = f"image {pushed.ref}" + (f" (base {pushed.base})" if pushed.base else "")
        else:
            assert archive is not None
            result = m.checkpoint(container, sys.stdout.buffer if to_stdout else archive,
                                  opts, progress=progress)
            where = archive
    mf = result.manifest
    if to_stdout:  # stdout carries the archive: say nothing more there
        return
    console_out().print(f"checkpointed {engine} container {mf.container.name} -> {where} "
                 f"({size_text(result.size)}; memory {size_text(mf.memory_bytes)}, "
                 f"rootfs diff {size_text(mf.rootfs_diff_bytes)})")
    if print_stats:
        table = Table(show_header=False, box=None)
        for key, value in (("time", f"{time.monotonic() - started:.2f} s"),
                           ("files", str(len(mf.files))), ("total", size_text(mf.total_bytes)),
                           ("criu statistics", "stats-dump in the archive"
                            if "stats-dump" in mf.files else "-"),
                           *((k, json.dumps(v, default=str)) for k, v in mf.extra.items()
                             if "stat" in k.lower())):
            table.add_row(f"[bold]{key}[/]", value)
        console_out().print(table)


#: An archive file, or a docker checkpoint directory (see :mod:`ctrmig.archive.foreign`).
archive_argument = click.argument("archive", type=click.Path(), required=False)


@cli.command()
@archive_argument
@spec_option(options.IMAGE, "image")
@engine_option
@url_option
@option_flags(RestoreOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore(archive: str | None, image: str | None, engine: str | None, url: str | None,
            as_json: bool, **flags: Any) -> None:
    """Restore ARCHIVE, or checkpoint image --image REF, into a running container
    (engine: the archive's, by default; a CRI-O checkpoint's: podman).

    ARCHIVE '-' reads the archive from standard input (then --engine is required).
    """
    if (archive is None) == (image is None):
        raise click.UsageError("give either ARCHIVE or --image REF")
    if image is not None:
        with _pulled(image, engine, url) as (archive_path, engine, _):
            _restore(str(archive_path), engine, url, as_json, flags)
        return
    assert archive is not None
    _restore(archive, engine, url, as_json, flags)


@contextlib.contextmanager
def _pulled(ref: str, engine: str | None,
            url: str | None) -> Iterator[tuple[Path, str, images.Image]]:
    """Checkpoint image ``ref``'s archive (pulled, or from podman's store) and the engine
    to restore it with: the one asked for, else the one that wrote it."""
    store = None if images.is_registry_ref(ref) else connect(engine or "podman", url)
    try:
        with images.pulled(ref, store) as (image, archive):
            if engine is None:
                try:
                    engine = ctrmig.inspect(archive).engine
                except CtrmigError:  # no manifest: podman's own image (or CRI-O's)
                    engine = image.engine
            yield archive, engine, image
    finally:
        if store is not None:
            store.close()


def _restore(archive: str, engine: str | None, url: str | None, as_json: bool,
             flags: dict[str, Any]) -> None:
    total, note = None, ""
    if archive == "-" and engine is None:
        raise click.UsageError("--engine is required when the archive comes from stdin")
    if engine is None:
        manifest = ctrmig.inspect(archive, identities=flags.get("identity") or ())
        engine, total = foreign.restore_engine(manifest), manifest.total_bytes
        note = foreign.note(manifest)
    source = sys.stdin.buffer if archive == "-" else archive
    with contextlib.closing(connect(engine, url)) as m, \
            progress_bar(f"restore {Path(archive).name}", total) as progress:
        opts = built(RestoreOptions, flags)
        if archive == "-" and (click.get_current_context().obj or {}).get("json_errors"):
            # To the ctrmig that streams it (migrate): when to freeze, when it runs.
            click.echo(READY_LINE, err=True)
            opts = dataclasses.replace(
                opts, on_running=lambda: click.echo(RUNNING_LINE, err=True))
        restored = m.restore(source, opts, progress=progress)
    if as_json:
        click.echo(json.dumps({"engine": engine, "name": restored} |
                              ({"foreign": note} if note else {})))
    else:
        console_out().print(f"restored {engine} container {restored}" +
                            (f" (from a foreign archive: {note})" if note else ""))


def _pids(manifest: Manifest) -> list[int]:
    """PIDs (inside the container) of the dumped processes, from CRIU's core-PID.img names."""
    pids = []
    for path in manifest.files:
        base = os.path.basename(path)
        if base.startswith("core-") and base.endswith(".img") and base[5:-4].isdigit():
            pids.append(int(base[5:-4]))
    return sorted(pids)


identity_option = click.option(
    "--identity", "-i", "identities", multiple=True, metavar="FILE",
    help=options.IDENTITY.help)


@contextlib.contextmanager
def _plain(archive: str, identities: tuple[str, ...]) -> Iterator[Path]:
    """The archive file, or for an encrypted one its plaintext in a private temp file
    (0600 in a 0700 directory, removed after): decrypted once for inspect's passes."""
    if not is_encrypted(Path(archive)):
        yield Path(archive)
        return
    with tempfile.TemporaryDirectory(prefix="ctrmig-inspect-") as tmp:
        path = Path(tmp) / "archive.tar"
        with plaintext(Path(archive), identities) as src, open_private(path) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        yield path


@cli.command()
@archive_argument
@spec_option(options.IMAGE, "image")
@engine_option
@url_option
@identity_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(archive: str | None, image: str | None, engine: str | None, url: str | None,
            identities: tuple[str, ...], as_json: bool) -> None:
    """Show what ARCHIVE (or checkpoint image --image REF) holds, where it came from, who
    signed it, and whether its checksums hold (an encrypted archive needs --identity).
    Archives ctrmig did not write (podman's, CRI-O's, a docker checkpoint directory) are
    shown too, saying so."""
    if (archive is None) == (image is None):
        raise click.UsageError("give either ARCHIVE or --image REF")
    if image is None:
        assert archive is not None
        _inspect(archive, identities, as_json, {})
        return
    with _pulled(image, engine, url) as (path, _, pulled):
        _inspect(str(path), identities, as_json, {
            "checkpoint image": f"{image} ({pulled.digest}, written by {pulled.engine})",
            "base image": pulled.base or "-"})


def _inspect(archive: str, identities: tuple[str, ...], as_json: bool,
             image: dict[str, str]) -> None:
    encrypted = is_encrypted(Path(archive))
    with _plain(archive, identities) as plain:
        mf = ctrmig.inspect(plain)
        try:
            if foreign.facts(mf) is None:  # a foreign one was read whole for its manifest
                ctrmig.verify(plain)
            checksums = "ok"
        except CtrmigError as e:
            checksums = e.message
        signature = _signature(plain, mf)
        asks = _privileges(plain) if checksums == "ok" else "not judged (checksums)"
    pids = _pids(mf)
    sizes = {"memory_bytes": mf.memory_bytes, "rootfs_diff_bytes": mf.rootfs_diff_bytes,
             "total_bytes": mf.total_bytes, "archive_bytes": _bytes_on_disk(Path(archive))}
    volumes = _volumes(mf)
    facts = {"encryption": "age" if encrypted else "none", "signature": signature, **image}
    note = foreign.note(mf)
    if as_json:
        listed = asks if isinstance(asks, str) else [dataclasses.asdict(r) for r in asks]
        data = mf.to_dict() | {"sizes": sizes, "pids": pids, "checksums": checksums,
                               "privileges": listed, "volumes": volumes} | facts
        data["checksums_from_writer"] = not note
        if note:
            data["foreign"] = (foreign.facts(mf) or {}) | {"note": note}
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        shown = asks if isinstance(asks, str) else summary(asks) or "none"
        facts["volumes"] = "; ".join(map(_volume_line, volumes)) or "-"
        if note:
            facts["origin"] = note
        shown_sums = f"{checksums} ({foreign.NO_CHECKSUMS})" if note else checksums
        _print_inspect(mf, sizes, pids, shown_sums, shown, facts)
    if checksums != "ok":
        raise click.exceptions.Exit(1)


def _bytes_on_disk(archive: Path) -> int:
    """The archive file's size; a directory's: its files' total."""
    if not archive.is_dir():
        return archive.stat().st_size
    return sum(p.lstat().st_size for p in archive.rglob("*") if p.is_file())


def _signature(archive: Path, mf: Manifest) -> str:
    """Who signed the archive (the key's fingerprint) and whether the signature holds;
    whether that key is trusted is ``verify --trusted-keys``'s to say."""
    if foreign.facts(mf) is not None:
        return "unsigned (not ctrmig's archive: no manifest to sign)"
    try:
        data, sig = read_signed(archive)
        if sig is None:
            return "unsigned"
        key = crypto.signer_key(sig)
    except CtrmigError as e:
        return f"unreadable: {e.message}"
    valid = "valid" if crypto.signature_valid(data, sig) else "INVALID"
    return f"{key} ({valid}; whether it is trusted: verify --trusted-keys)"


@cli.command()
@archive_argument
@identity_option
@click.option("--trusted-keys", metavar="FILE", help=options.TRUSTED_KEYS.help)
def verify(archive: str, identities: tuple[str, ...], trusted_keys: str | None) -> None:
    """Check every file of ARCHIVE against its manifest and, with --trusted-keys, that a
    trusted key signed that manifest; exit 1 if not."""
    manifest = ctrmig.verify(archive, identities=identities, trusted_keys=trusted_keys)
    signed = ""
    if trusted_keys is not None:
        _, sig = read_signed(Path(archive), identities=identities)
        signed = f", signed by {crypto.signer_key(sig)}" if sig else ""
    note = foreign.note(manifest)
    if note:
        console_out().print(f"{archive}: ok ({len(manifest.files)} files read; {note})")
        return
    console_out().print(f"{archive}: ok ({len(manifest.files)} files verified{signed})")


def _privileges(archive: Path) -> list[PrivilegeRequest] | str:
    """What the archive asks beyond an ordinary container (what restore would refuse
    without --allow-privileged), or why that cannot be told."""
    try:
        return archive_privileges(archive)
    except CtrmigError as e:
        return f"unreadable: {e.message}"


def _print_inspect(mf: Manifest, sizes: dict[str, int], pids: list[int],
                   checksums: str, privileges: str, facts: dict[str, str]) -> None:
    """inspect's tables: the facts, then the files."""
    c = mf.container
    table = Table(show_header=False, box=None)
    for key, value in (
        ("engine", f"{mf.engine} {mf.engine_version}".strip()),
        ("container", f"{c.name} ({c.id[:12]})" if c.id else c.name),
        ("image", c.image), ("command", " ".join(c.command)), ("created", mf.created),
        ("criu", mf.criu_version), ("kernel", f"{mf.kernel} {mf.arch}".strip()),
        ("source host", mf.source_host),
        ("memory pages", size_text(mf.memory_bytes)),
        ("rootfs diff", size_text(mf.rootfs_diff_bytes)),
        ("total", f"{size_text(mf.total_bytes)} in {len(mf.files)} files "
                  f"({size_text(sizes['archive_bytes'])} on disk)"),
        ("processes", ", ".join(f"pid {p}" for p in pids) or "-"),
        ("checksums", checksums),
        ("privileges", privileges),
        *facts.items(),
    ):
        table.add_row(f"[bold]{key}[/]", str(value) or "-")
    files = Table("file", "size")
    for path, entry in sorted(mf.files.items()):
        files.add_row(path, size_text(entry.size))
    out = console_out()
    out.print(table)
    out.print(files)


def _volumes(mf: Manifest) -> list[dict[str, Any]]:
    """The archive's volumes and bind mounts: name, kind (named, anonymous, bind), mount
    point, size, whether the content is inside. docker and runc archives list them in the
    manifest (``extra["volumes"]``); podman's only have ``volumes/NAME.tar``."""
    found: dict[str, dict[str, Any]] = {}
    recorded = mf.extra.get("volumes")
    for v in recorded if isinstance(recorded, list) else []:
        if not isinstance(v, dict):
            continue
        bind = v.get("kind") == "bind"
        name = str((v.get("source") if bind else v.get("name")) or "")
        size = v.get("bytes")
        found[name] = {
            "name": name,
            "kind": "bind" if bind else "anonymous" if v.get("anonymous") else "named",
            "destination": str(v.get("destination") or ""),
            "bytes": size if isinstance(size, int) else None,
            "content": not bind and (bool(v.get("carried")) or v.get("member") in mf.files)}
    for member, entry in mf.files.items():
        name = member.removeprefix(f"{VOLUMES_DIR}/").removesuffix(".tar")
        if member == volume_member(name) and name not in found:
            found[name] = {"name": name, "kind": "", "destination": "", "bytes": entry.size,
                           "content": True}
    return list(found.values())


def _volume_line(v: dict[str, Any]) -> str:
    """"data (named, /data, 4.0 KiB inside)"."""
    facts = [v["kind"], v["destination"],
             f"{size_text(v['bytes'] or 0)} inside" if v["content"] else "content not inside"]
    return f"{v['name']} ({', '.join(filter(None, facts))})"

