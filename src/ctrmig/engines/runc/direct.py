"""The runc adapter's side of the direct route (:mod:`ctrmig.direct`): a checkpoint whose
pages go to a page server while CRIU dumps (pre-copy), or stay behind CRIU's page server
on this host until the target fetched the last one (post-copy)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrmig.archive import ArchiveWriter, ContainerRecord
from ctrmig.direct import lazy, pages
from ctrmig.engines.base import Dump
from ctrmig.engines.runc.volumes import Mount
from ctrmig.host import proc
from ctrmig.options import CheckpointOptions

if TYPE_CHECKING:
    from ctrmig.engines.runc.migrator import RuncMigrator


def direct_dump(m: RuncMigrator, record: ContainerRecord, opts: CheckpointOptions,
                sink: pages.PageSink, images: Path, work: Path, mounts: list[Mount]) -> Dump:
    """Pre-copy: pause, dump with the pages to the sink's relay, and keep the container
    paused (its memory intact) until the migration ends: rollback is an unpause.
    Post-copy: a ``--lazy-pages`` dump that serves the pages on the sink's port and
    ends the container only once the target took the last one."""
    name = record.name
    started = time.monotonic()
    sink.mark("freeze")
    argv = m.runc.checkpoint_argv(name, images, work, opts, page_server=sink.address,
                                     lazy=sink.lazy, leave_running=not sink.lazy)
    dumping: subprocess.Popen[bytes] | None = None
    try:
        if sink.lazy:
            dumping = lazy.start_dump(argv, what=f"runc checkpoint {name}",
                                      log_file=work / "dump.log")
            sink.serving, sink.images = dumping, images
        else:
            proc.run(m.runc.argv("pause", name), timeout=m.timeout,
                     what=f"runc pause {name}")
            sink.mark("frozen")
            try:
                m._checkpoint_argv(name, argv, images, work)
            except BaseException:
                unpause(m, name)
                raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    sink.mark("dumped")
    dump_seconds = time.monotonic() - started

    def write(writer: ArchiveWriter) -> dict[str, Any]:
        # Pre-copy keeps the container paused, post-copy frozen: the volumes hold still.
        volumes = m.volumes.pack(mounts, work, ignore=opts.ignore_volumes)
        extra = m._write_members(writer, name, images, work, dump_seconds, volumes)
        if not sink.lazy:
            extra[pages.PAGE_STREAM] = sink.sent()
        return extra

    def served() -> None:
        """Post-copy: wait for the dump to end (the target took the last page)."""
        try:
            assert dumping is not None
            lazy.end_dump(dumping, what=f"runc checkpoint {name}",
                          log_file=work / "dump.log", timeout=m.timeout)
            m.bundles.drained(name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)

    def commit() -> None:
        sink.mark("written")
        if dumping is not None:  # the pages flow on until the last one: see served
            sink.served = served
            return
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)

    def rollback() -> None:
        try:
            if dumping is not None:
                # Killing the serving CRIU releases the frozen container: it runs on.
                proc.kill_group(dumping)
            unpause(m, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)

    return Dump(write=write, rollback=rollback, commit=commit)

def unpause(m: RuncMigrator, name: str) -> None:
    """Let a container the direct route paused run on (nothing if it is not paused)."""
    state = m.runc.state(name)
    if state and state.get("status") == "paused":
        proc.run(m.runc.argv("resume", name), timeout=m.timeout,
                 what=f"runc resume {name}")
