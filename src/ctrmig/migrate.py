"""Move a running container from one engine (host) to another: source -> stream -> target.

The source writes its archive into a pipe on one thread while the target reads and
restores it on another, so the archive is never fully held on disk by ctrmig (an engine
may still spool it: podman's import does). If anything fails after the source stopped,
the source is resumed from the checkpoint it kept, so the container runs exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, ParamSpec

from ctrmig import endpoints, images, settings
from ctrmig.archive import Compression, Manifest
from ctrmig.archive.streams import Progress
from ctrmig.direct import route as direct_route
from ctrmig.engines.remote import is_remote
from ctrmig.errors import ChecksumError, CtrmigError, OptionError
from ctrmig.options import CheckpointOptions, Options, RestoreOptions, build
from ctrmig.preflight import require as require_preflight
from ctrmig.protocol import Migrator
from ctrmig.recovery import SETTLE_TIMEOUT, Journal, connected

log = logging.getLogger(__name__)
P = ParamSpec("P")

#: How long a migration waits for a target that signals readiness (RestoreOptions
#: on_ready) before it freezes the source anyway.
READY_TIMEOUT = 30.0


@dataclass
class MigrationReport:
    """What a migration did and how long each phase took (seconds)."""

    container: str
    source_engine: str
    target_engine: str
    target_name: str = ""
    checkpoint_s: float = 0.0  # from the start until the source's archive was complete
    restore_s: float = 0.0  # from the archive's end until the target ran
    total_s: float = 0.0
    downtime_s: float = 0.0  # from the source's stop until the target ran
    # --- phases (#19): freeze -> dump -> transfer -> restore, in seconds ---
    route: str = "archive"  # "archive", "direct" (pre-copy) or "post-copy"
    freeze_s: float = 0.0  # freezing the source (runc pause); 0 where the dump freezes
    dump_s: float = 0.0  # CRIU's dump (the direct route: the pages stream meanwhile)
    transfer_s: float = 0.0  # from the dump's end until the archive was all sent
    bytes_moved: int = 0
    compression: str = "none"
    source_kept: bool = False
    manifest: Manifest | None = field(default=None, repr=False)

    def summary(self) -> str:
        mib = self.bytes_moved / (1 << 20)
        return (
            f"{self.container} ({self.source_engine}) -> {self.target_name} "
            f"({self.target_engine}): downtime {self.downtime_s:.2f} s, total "
            f"{self.total_s:.2f} s, {mib:.1f} MiB moved ({self.compression})"
        )

    def phases(self) -> str:
        """The phases, one line: what ``ctrmig migrate`` prints after its summary."""
        return (f"{self.route} route: freeze {self.freeze_s:.2f} s, dump {self.dump_s:.2f} s, "
                f"transfer {self.transfer_s:.2f} s, restore {self.restore_s:.2f} s, "
                f"downtime {self.downtime_s:.2f} s")


class _CountingPipeWriter:
    """The write end of an OS pipe, counting bytes (the archive's size on the wire)."""

    def __init__(self, fd: int):
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.count = 0

    def write(self, data: bytes) -> int:
        if self.file.closed:
            # Only the checkpoint's own writer, dropped after it failed, writes this late
            # (a gzip stream writes its trailer from __del__): nothing reads it any more.
            return len(data)
        self.file.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        """Close; a reader that already left (the target failed) is not a new error."""
        with contextlib.suppress(BrokenPipeError):
            self.file.close()


def migrate(
    container: str,
    *,
    source: Migrator | str,
    target: Migrator | str,
    name: str | None = None,
    compression: Compression | Literal["auto"] = "auto",
    keep_source: bool = False,
    checkpoint_options: CheckpointOptions | Mapping[str, object] | None = None,
    restore_options: RestoreOptions | Mapping[str, object] | None = None,
    journal_dir: Path | None = None,
    progress: Progress | None = None,
    insecure: bool = False,
    route: str = "auto",
    via: str | None = None,
) -> MigrationReport:
    """Checkpoint ``container`` on ``source`` and restore it on ``target``.

    ``source`` and ``target`` are migrators or ``ENGINE[+ADDRESS]`` strings (see
    :mod:`ctrmig.endpoints`); with strings, a journal in ``journal_dir`` lets
    :func:`recover` finish or roll back a migration whose ctrmig was killed.
    First, before the source is touched, every check of :func:`ctrmig.preflight` runs:
    failed ones raise one :class:`~ctrmig.errors.PreflightError` listing them all.
    On success the source container is removed (or kept, stopped, with ``keep_source``).
    On failure the source container is resumed and the error re-raised.
    ``progress`` is called with the size of each piece of the archive as it goes.
    A ``tcp://`` API on either side (unauthenticated, in clear) is refused unless
    ``insecure``; ``podman+ssh://`` and ``docker+ssh://`` go through ssh.
    ``route``: "direct" streams CRIU's images straight to the target (runc -> runc,
    process -> process; :mod:`ctrmig.direct`), "archive" the archive, "auto" direct where
    it applies. With ``restore_options.lazy_pages`` the direct route is post-copy.
    ``via`` (``REGISTRY/REPO``) moves the checkpoint as a checkpoint image through that
    registry instead (:mod:`ctrmig.images`): pushed here from the source, pulled for the
    target, deleted from the registry afterwards (where the registry allows deletes).

    Defaults, the same as ``ctrmig migrate``'s: ``compression="auto"`` is zstd when either
    side is reached over ssh and none otherwise; the image travels in the archive when the
    target lacks it (``checkpoint_options.include_image`` None) and the source can carry it.
    """
    ckpt = _options(CheckpointOptions, checkpoint_options)
    if ckpt.leave_running:
        raise OptionError("a migration stops the source: leave_running does not apply",
                          hint="to copy a running container, checkpoint it with "
                               "--leave-running and restore the archive elsewhere")
    for side in (source, target):
        endpoints.check_insecure(side if isinstance(side, str) else _api_url(side), insecure)
    ref = via_ref(via, container) if via is not None else None
    journal = None
    if isinstance(source, str) and isinstance(target, str):
        journal = Journal(journal_dir or settings.current().journal_dir, {
            "container": container, "from": source, "to": target,
            "name": name or container, "keep_source": keep_source, "insecure": insecure,
            **({"via": ref} if ref else {}),
        })
    # What we connect from strings we close again (an ssh-forwarded API's ssh client too).
    with contextlib.ExitStack() as own:
        src = connected(own, source)
        dst = connected(own, target)
        return _migrate_between(container, src, dst, name, compression, keep_source, ckpt,
                                restore_options, journal, progress, route, ref)
    raise AssertionError("unreachable")  # pragma: no cover


def _migrate_between(container: str, src: Migrator, dst: Migrator, name: str | None,
                     compression: Compression | Literal["auto"], keep_source: bool,
                     ckpt: CheckpointOptions,
                     restore_options: RestoreOptions | Mapping[str, object] | None,
                     journal: Journal | None, progress: Progress | None,
                     route: str = "auto", via: str | None = None) -> MigrationReport:
    if compression == "auto":
        compression = "zstd" if is_remote(src) or is_remote(dst) else "none"
    ckpt = dataclasses.replace(ckpt, compression=compression,
                               include_image=_carry_image(container, src, dst, ckpt))
    target_name = name or container
    rest = dataclasses.replace(_options(RestoreOptions, restore_options), name=target_name)
    rest, resumed = _told_running(rest)
    # every check, before the source is touched
    require_preflight(container, src, dst, ckpt, rest, "archive" if via else route)
    # docker: the named volumes that go along, for recover to remove once finished.
    carried = getattr(src, "carried_volumes", None) if journal else None
    volumes = carried(container, ckpt) if carried else []
    try:
        # From the journal's first write on, every way out closes it: a Ctrl-C right
        # after that write left it behind (test_ctrl_c[docker-started], once, under load).
        if journal:
            journal.phase("migrating", volumes=volumes)
            rest = dataclasses.replace(rest, on_commit=_chained(journal.committed,
                                                                 rest.on_commit))
        if via is not None:
            report = _migrate_via(container, src, dst, via, keep_source, ckpt, rest)
        elif direct_route.choose(route, src, dst):
            report = _migrate_direct(container, src, dst, keep_source, ckpt, rest, progress,
                                     journal, resumed)
        else:
            report = _migrate(container, src, dst, keep_source, ckpt, rest, progress,
                              resumed)
    except BaseException:
        if journal:
            journal.close()  # rolled back (or the source never stopped)
        raise
    if journal:
        journal.close()
    return report


def _api_url(m: Migrator) -> str:
    """A migrator's API address as an ``ENGINE+ADDRESS`` string ("" if it has none)."""
    url = getattr(m, "url", None) or getattr(m, "base_url", None)
    return f"{m.engine}+{url}" if isinstance(url, str) else ""


# --- the direct route (#19, ctrmig.direct) -----------------------------------------------


def _migrate_direct(container: str, source: Migrator, target: Migrator, keep_source: bool,
                    ckpt: CheckpointOptions, rest: RestoreOptions,
                    progress: Progress | None, journal: Journal | None,
                    resumed: Sequence[float]) -> MigrationReport:
    """The migration with CRIU's pages going straight to the target (pre-copy), or
    fetched by it after it runs (post-copy, ``rest.lazy_pages``)."""
    lazy = rest.lazy_pages
    timeout = float(getattr(source, "timeout", SETTLE_TIMEOUT))
    report: MigrationReport | None = None
    try:
        with direct_route.planned(source, target, rest, lazy=lazy, timeout=timeout) as plan:
            if journal and plan.restore.page_images:  # for recover, should we die
                journal.phase("migrating", pages_dir=plan.restore.page_images)
            watched = direct_route.WatchedTarget(target, plan.outcome, plan.target_failed,
                                                 plan.target_ran)
            source = direct_route.WatchedSource(source, plan)
            report = _migrate(container, source, watched, keep_source,
                              ckpt, plan.restore, progress, resumed)
            marks = dict(plan.sink.marks)
            first_ask = plan.feeder.first_request_after(marks.get("written", 0.0))
            page_bytes = plan.feeder.sent_bytes
    except ChecksumError:
        if report is not None:  # post-copy moved pages that are not what was sent
            with contextlib.suppress(CtrmigError):
                target.remove(report.target_name)
        raise
    assert report is not None
    report.route = "post-copy" if lazy else "direct"
    report.bytes_moved += page_bytes
    end = plan.outcome.at  # the target's restore returned: it runs
    # Post-copy: the restore returns only once the last page arrived; its tasks ran
    # from when the target said so. A target that does not say (an older ctrmig): from
    # its first request for pages, which CRIU's restorer makes 0.07-0.15 s before the
    # tasks resume (measured here at 4 GiB; restore.log's rseq -> "Tasks resumed").
    running = resumed[0] if resumed else (
        first_ask if lazy and first_ask is not None else end)
    if lazy and not resumed:
        log.warning("the target did not say when its restore ran (an older ctrmig "
                    "there?): the downtime reported ends at its first request for pages")
    frozen = marks.get("frozen", marks["freeze"])
    written = marks.get("written", end)
    report.freeze_s = frozen - marks["freeze"]
    report.dump_s = marks.get("dumped", frozen) - frozen
    report.transfer_s = max(0.0, written - marks.get("dumped", frozen))
    report.restore_s = max(0.0, running - written)
    report.downtime_s = running - marks["freeze"]
    return report


def _options(cls: type[Options], given: Options | Mapping[str, object] | None) -> Options:
    if isinstance(given, cls):
        return given
    return build(cls, None, given)  # type: ignore[arg-type]


def _carry_image(container: str, source: Migrator, target: Migrator,
                 opts: CheckpointOptions) -> bool:
    """Whether the archive carries the image: as asked, else when the target lacks it."""
    if opts.include_image is not None:
        return opts.include_image
    if not getattr(source, "carries_images", False):
        return False
    image = next((c.image for c in source.list() if container in (c.name, c.id)), "")
    if not image:
        return False
    has = target.has_image(image)
    log.debug("target %s image %s: %s", target.engine, image,
              {True: "present", False: "absent", None: "unknown"}[has])
    return has is not True


def _migrate(
    container: str,
    source: Migrator,
    target: Migrator,
    keep_source: bool,
    checkpoint_options: CheckpointOptions,
    restore_options: RestoreOptions,
    progress: Progress | None = None,
    resumed: Sequence[float] = (),
) -> MigrationReport:
    """``resumed``: where :func:`_told_running` notes a lazy-pages restore's resume."""
    report = MigrationReport(container, source.engine, target.engine,
                             compression=checkpoint_options.compression)
    read_fd, write_fd = os.pipe()
    # fast path (#19): a pipe as big as the pieces written into it (1 MiB, this host's
    # pipe-max-size) instead of 64 KiB: a sixteenth of the wake-ups between the threads.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    pipe_out = _CountingPipeWriter(write_fd)
    result: dict[str, Any] = {}
    started = time.monotonic()
    # A target that says when it is ready (ctrmig over ssh: its start, ~0.5 s here, was
    # half of post-copy's downtime over ssh) gets that time before the source freezes.
    ready, target_failed = threading.Event(), threading.Event()
    if getattr(target, "signals_ready", False):
        restore_options = dataclasses.replace(
            restore_options, on_ready=_chained(ready.set, restore_options.on_ready))
    else:
        ready.set()

    def produce() -> None:
        if not ready.wait(READY_TIMEOUT):
            log.warning("the target did not say it was ready within %g s: checkpointing "
                        "anyway", READY_TIMEOUT)
        if target_failed.is_set():
            return  # before the source was touched
        result["checkpoint_started"] = time.monotonic()
        try:
            archive = source.checkpoint(
                container, pipe_out,  # type: ignore[arg-type]
                checkpoint_options, progress=progress,
            )
            result["manifest"] = archive.manifest
        except BaseException as e:  # handed to the main thread
            result["checkpoint_error"] = e
        finally:
            result["checkpoint_done"] = time.monotonic()
            pipe_out.close()

    producer = threading.Thread(target=produce, name="ctrmig-checkpoint", daemon=True)
    producer.start()
    pipe_in = os.fdopen(read_fd, "rb", buffering=1 << 20)
    try:
        report.target_name = target.restore(pipe_in, restore_options)
        _drain(pipe_in)  # the tar's end padding, so the producer never blocks on it
    except BaseException as e:
        target_failed.set()
        ready.set()
        # Closing our end makes the source's next write fail (EPIPE): an unfinished
        # checkpoint is then rolled back by the source adapter itself.
        pipe_in.close()
        producer.join()
        source_error = result.get("checkpoint_error")
        if source_error is not None and "manifest" not in result:
            if _source_failed_first(source_error, e):
                # The target only saw the archive end early: the source's error says why.
                log.debug("target failed after the source did: %s", e)
                raise source_error from None
            log.warning("target failed (%s); the source rolled back its checkpoint", e)
        else:
            _roll_back(source, container, result, e)
        raise
    finally:
        pipe_in.close()
    producer.join()
    if "checkpoint_error" in result:
        raise result["checkpoint_error"]

    done = time.monotonic()
    running = resumed[0] if resumed else done  # a lazy-pages restore ran before it returned
    report.manifest = result["manifest"]
    report.bytes_moved = pipe_out.count
    report.checkpoint_s = result["checkpoint_done"] - result["checkpoint_started"]
    report.restore_s = max(0.0, running - result["checkpoint_done"])
    report.total_s = done - started
    # The source stops when its dump freezes it, at the start of the checkpoint call.
    report.downtime_s = running - result["checkpoint_started"]
    if _record_dump(report):
        report.transfer_s = max(0.0, report.checkpoint_s - report.dump_s)
    _drop_source(source, container, report, keep_source)
    return report


def _record_dump(report: MigrationReport) -> bool:
    """Take the dump's length from the manifest, where the engine recorded it (runc)."""
    seconds = report.manifest.extra.get("dump_seconds") if report.manifest else None
    if isinstance(seconds, (int, float)):
        report.dump_s = float(seconds)
        return True
    return False


def _drop_source(source: Migrator, container: str, report: MigrationReport,
                 keep_source: bool) -> None:
    """The target runs: remove the source (or keep it, stopped, as asked)."""
    if keep_source:
        report.source_kept = True
        return
    try:
        source.remove(container)
        # docker: the named volumes whose content went along (volumes.moved).
        if (remove_volumes := getattr(source, "remove_moved_volumes", None)) is not None:
            remove_volumes(report.manifest)
    except CtrmigError as e:
        log.warning("migrated, but removing the source container failed: %s", e)
        report.source_kept = True


# --- through a registry (#14, ctrmig.images) ----------------------------------------------


def via_ref(via: str, container: str) -> str:
    """The checkpoint image a migration through registry repository ``via`` pushes."""
    if not images.is_registry_ref(via) or images.has_tag(via):
        raise OptionError(f"--via {via!r}: name a registry repository, REGISTRY/REPO",
                          hint="e.g. --via 127.0.0.1:5000/checkpoints (ctrmig adds the tag)")
    return f"{via}:{container}-{uuid.uuid4().hex[:8]}"


def _migrate_via(container: str, source: Migrator, target: Migrator, ref: str,
                 keep_source: bool, ckpt: CheckpointOptions,
                 rest: RestoreOptions) -> MigrationReport:
    """The source pushes checkpoint image ``ref``, the target's restore pulls it; if the
    push or the restore fails, the source runs again from its checkpoint."""
    report = MigrationReport(container, source.engine, target.engine, route="registry",
                             compression="none")
    started = time.monotonic()
    # A failed push resumes the source itself (images.checkpoint, or ctrmig there). Over
    # ssh, ctrmig on that host pushes (or pulls) itself: the image goes through the
    # registry only, never through this host.
    pushed = images.Pushed(ref, "", "", registry=True)
    remote_checkpoint = getattr(source, "checkpoint_image", None)
    if remote_checkpoint is not None:
        remote_checkpoint(container, ref, ckpt)
    else:
        archive, pushed = images.checkpoint(source, container, ref, ckpt)
        report.manifest = archive.manifest
    checkpointed = time.monotonic()
    try:
        remote_restore = getattr(target, "restore_image", None)
        if remote_restore is not None:
            report.target_name = remote_restore(ref, rest)
        else:
            with images.pulled(ref) as (_, path):
                report.bytes_moved = path.stat().st_size
                report.target_name = target.restore(path, rest)
    except BaseException as e:
        _roll_back(source, container, {"manifest": report.manifest}, e)
        images.delete(pushed)
        raise
    done = time.monotonic()
    report.checkpoint_s = checkpointed - started
    _record_dump(report)
    report.transfer_s = max(0.0, report.checkpoint_s - report.dump_s)  # the push, mostly
    report.restore_s = done - checkpointed  # the pull and the restore
    report.total_s = report.downtime_s = done - started
    _drop_source(source, container, report, keep_source)
    # The registry held the container's memory for the move: not longer than that.
    images.delete(pushed)
    return report


def _told_running(rest: RestoreOptions) -> tuple[RestoreOptions, list[float]]:
    """``rest`` noting (into the list) when a lazy-pages restore runs, as the target
    tells ``on_running``: the end of the downtime, on either route."""
    resumed: list[float] = []
    if not rest.lazy_pages:
        return rest, resumed
    return dataclasses.replace(rest, on_running=_chained(
        lambda: resumed.append(time.monotonic()), rest.on_running)), resumed


def _chained(first: Callable[P, None], then: Callable[P, None] | None) -> Callable[P, None]:
    """A callback calling ``first``, then the caller's own ``then`` (if any)."""
    def both(*args: P.args, **kwargs: P.kwargs) -> None:
        first(*args, **kwargs)
        if then is not None:
            then(*args, **kwargs)
    return both


def _source_failed_first(source_error: BaseException, target_error: BaseException) -> bool:
    """Both sides failed: was it the source (the target then read a cut-off archive), or
    the target (the source then wrote into a closed pipe)?"""
    if not isinstance(target_error, Exception):
        return False  # Ctrl-C and the like: that is what happened
    chain: list[BaseException | None] = [source_error, source_error.__cause__,
                                         source_error.__context__]
    return not any(isinstance(err, BrokenPipeError) for err in chain)


def _drain(pipe_in: BinaryIO) -> None:
    while pipe_in.read(1 << 20):
        pass


def _roll_back(source: Migrator, container: str, result: dict[str, Any],
               error: BaseException) -> None:
    """The target failed after the source stopped: run the container on the source again."""
    if "manifest" not in result:
        return  # the checkpoint never completed: the source was not stopped for good
    log.warning("migration failed (%s); resuming %s on the source", error, container)
    try:
        source.resume(container)
    except CtrmigError as e:
        log.error("resuming %s on the source failed too: %s", container, e)
        raise
