"""The runc adapter: containers run straight from OCI bundles, no daemon.

The adapter speaks the Migrator protocol; its collaborators own the state dir's parts
(see :mod:`ctrmig.engines.runc.state`): :class:`~.images.ImageCache` the images,
:class:`~.bundle.Bundles` each container's bundle, network namespace and rootfs,
:class:`~.supervisor.Stdio` the container's output and the supervisor draining it,
:class:`~.commands.Runc` runc's command lines, and :mod:`~.lazy` the lazy-pages daemon.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest
from ctrmig.archive.layers import apply_rootfs_diff, write_rootfs_diff
from ctrmig.archive.layout import (
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    DELETED_FILES,
    ROOTFS_DIFF,
    SPEC_DUMP,
    STATS_DUMP,
    volume_member,
)
from ctrmig.direct import lazy, pages
from ctrmig.engines.base import BaseMigrator, Dump
from ctrmig.engines.runc import direct
from ctrmig.engines.runc import foreign as runc_foreign
from ctrmig.engines.runc.bundle import TEMPLATE, Bundles, config_dump, process_settings
from ctrmig.engines.runc.commands import TOOL_TIMEOUT, Runc, keep_logs, summary, with_criu_logs
from ctrmig.engines.runc.images import ImageCache
from ctrmig.engines.runc.state import StateDir, to_json
from ctrmig.engines.runc.supervisor import Stdio
from ctrmig.engines.runc.volumes import (
    Mount,
    Prepared,
    Volumes,
    from_records,
    missing_binds,
    parse_all,
)
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    CommandError,
    ContainerNotFoundError,
    CtrmigError,
    EngineError,
    OptionError,
    RestoreError,
)
from ctrmig.host import proc
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: What a restore may do to a new bundle's spec (spec, bundle), and to the bundle itself.
SpecHook = Callable[[dict[str, Any], Path], None] | None
BundleHook = Callable[[Path], None] | None


class RuncMigrator(pages.SendsPages, BaseMigrator):
    """Run, checkpoint and restore runc containers from local images."""

    engine: ClassVar[str] = "runc"
    imports_from: ClassVar[frozenset[str]] = frozenset({"podman", "docker", "cri-o"})
    commits_in_restore: ClassVar[bool] = True  # right before `runc restore`
    checkpoint_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "ignore_volumes"})
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "lazy_pages", "ignore_volumes", "replace_volumes"})

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        template: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 900.0,
        docker_url: str | None = None,
    ):
        """``docker_url``: the daemon that docker-daemon: images are looked up in."""
        super().__init__(workdir=workdir, timeout=timeout)
        self.state_dir = Path(state_dir or settings.current().runc_state_dir).absolute()
        self.paths = StateDir(self.state_dir)
        self.template = Path(template) if template is not None else TEMPLATE
        self.bundles_dir, self.logs_dir = self.paths.bundles, self.paths.logs
        self.runc = Runc(self.paths.runc_root)
        self.stdio = Stdio(self.runc, self.paths.logs, timeout)
        self.bundles = Bundles(self.paths, self.template, self.runc, self.stdio)
        self.volumes = Volumes(self.state_dir / "volumes")
        self.images = ImageCache(self.paths,
                                 docker_url=docker_url or settings.current().docker_url)

    # --- public API ----------------------------------------------------------------------

    @property
    def lock_scope(self) -> str:
        """This instance of runc: the state dir."""
        return str(self.state_dir)

    def version(self) -> str:
        return self.runc.version()

    def run(
        self,
        image: str,
        *,
        name: str | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None,
        volumes: Sequence[str] = (),
    ) -> str:
        """Start a detached container from a local image; return its name.

        ``command`` replaces the image's CMD (its ENTRYPOINT stays); ``env`` adds to the
        image's environment; ``volumes`` are ``-v`` specs: ``NAME:/path[:ro]`` (a named
        volume, made if missing) or ``/host/path:/path[:ro]`` (a bind mount).
        """
        name = name or f"ctrmig-{uuid.uuid4().hex[:8]}"
        _check_name(name)
        self._check_name_free(name)
        mounts = parse_all(volumes)
        missing_binds(mounts, OptionError)
        img = self.images.get(image)
        process = process_settings(image, img.config, command=command, env=env, hostname=name)
        made = Prepared()
        try:
            self.volumes.create(mounts, made)
            meta = {"name": name, "image": image, "transport_ref": img.transport_ref,
                    "digest": img.digest, "process": process, "created": _now(),
                    "volumes": self.volumes.sources(mounts)}
            bundle = self.bundles.make(name, img.rootfs, meta)
            try:
                self._start(name, self.runc.run_args(name, bundle), work=None,
                            error=EngineError, what=f"runc run {name}")
            except BaseException:
                self.bundles.cleanup(name)
                raise
        except BaseException:
            made.rollback()
            raise
        made.commit()
        return name

    def list(self) -> list[ContainerInfo]:
        states = {s["id"]: s for s in self.runc.containers()}
        busy = self.runc.in_flight()
        out = []
        for name in self.bundles.names():
            meta = self.bundles.meta(name)
            state = self.bundles.status(name, states) if meta else "broken"  # remove() clears
            state = busy.get(name, state)
            out.append(ContainerInfo(engine=self.engine, name=name, id=name,
                                     image=(meta or {}).get("image", ""), state=state))
        return out

    def exists(self, container: str) -> bool:
        if not NAME_RE.fullmatch(container):
            return False
        return self.bundles.path(container).exists() or self.runc.knows(container)

    def remove(self, container: str) -> None:
        if not NAME_RE.fullmatch(container):
            return
        self.bundles.cleanup(container)

    def logs(self, container: str) -> str:
        path = self.stdio.log_path(container)
        if not path.exists():
            if not self.exists(container):
                raise ContainerNotFoundError(f"no runc container named {container!r}")
            return ""
        return path.read_text(errors="replace")

    # --- checkpoint ------------------------------------------------------------------------

    def _describe(self, container: str) -> ContainerRecord:
        meta = self.bundles.meta(container) if NAME_RE.fullmatch(container) else None
        if meta is None:
            raise ContainerNotFoundError(f"no runc container named {container!r}",
                                         hint="see ctrmig list --engine runc")
        return ContainerRecord(name=container, id=container, image=meta["image"],
                               image_id=meta["digest"], command=meta["process"]["args"])

    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        name = record.name
        state = self.runc.state(name)
        status = state.get("status") if state else self.bundles.status(name, {})
        if status not in ("running", "paused"):
            raise CheckpointError(f"runc container {name!r} is {status}, not running",
                                  hint="restore or resume it first" if status ==
                                  "checkpointed" else None)
        meta = self.bundles.meta(name) or {}
        mounts = from_records(meta.get("volumes"))
        if not opts.ignore_volumes:
            _refuse_shared(self, name, mounts)
        # Without leave_running the images stay in the bundle until the container is
        # removed or resumed: resume() (the rollback, or migrate's) restores from them.
        images = self.bundles.kept_images(name)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(0o700)  # CRIU's images: the container's memory
        work = self.paths.new_workdir("checkpoint")
        sink = self.page_sink
        if sink is not None:  # the direct route (ctrmig.direct): its own Dump
            return direct.direct_dump(self, record, opts, sink, images, work, mounts)
        # Left running, the container must not change its volumes before write() packed
        # them as the memory image knows them: it stays paused until then (runc keeps a
        # paused container paused through checkpoint --leave-running).
        carried = not opts.ignore_volumes and any(m.kind == "volume" for m in mounts)
        unpause: Callable[[], None] = _nothing
        try:
            if opts.leave_running and carried and status == "running":
                unpause = _pause(self.runc, name)
            dump_seconds = self._checkpoint(name, images, work, opts)
            if not opts.leave_running:
                self.bundles.drained(name)  # so that logs() holds all it wrote before the dump
        except BaseException:
            try:
                unpause()
            finally:
                shutil.rmtree(work, ignore_errors=True)
                if opts.leave_running:  # nothing to resume from: the container runs
                    shutil.rmtree(images, ignore_errors=True)
            raise

        def write(writer: ArchiveWriter) -> dict[str, Any]:
            try:
                volumes = self.volumes.pack(mounts, work, ignore=opts.ignore_volumes)
            finally:
                unpause()
            return self._write_members(writer, name, images, work, dump_seconds, volumes)

        def commit() -> None:
            shutil.rmtree(work, ignore_errors=True)
            if opts.leave_running:
                shutil.rmtree(images, ignore_errors=True)

        def rollback() -> None:
            try:
                unpause()
                if opts.leave_running:
                    shutil.rmtree(images, ignore_errors=True)
                else:
                    self.resume(name)
            finally:
                shutil.rmtree(work, ignore_errors=True)

        return Dump(write=write, rollback=rollback, commit=commit)

    def _write_members(self, writer: ArchiveWriter, name: str, images: Path, work: Path,
                       dump_seconds: float, volumes: builtins.list[dict[str, Any]]
                       ) -> dict[str, Any]:
        """Every archive member of a dump of ``name`` into ``images``, but the manifest."""
        bundle = self.bundles.path(name)
        meta = self.bundles.meta(name) or {}
        writer.add_tree(images, CHECKPOINT_DIR)
        writer.add_file(SPEC_DUMP, bundle / "config.json")
        writer.add_bytes(CONFIG_DUMP, to_json(config_dump(meta)))
        diff = work / ROOTFS_DIFF
        deleted = write_rootfs_diff(bundle / "diff" / "upper", diff)
        writer.add_file(ROOTFS_DIFF, diff)
        if deleted:
            writer.add_bytes(DELETED_FILES, to_json(deleted))
        for stats in (work / STATS_DUMP, images / STATS_DUMP):
            if stats.is_file():  # CRIU's dump statistics, where podman keeps them
                writer.add_file(STATS_DUMP, stats)
                break
        for v in volumes:
            if v["carried"]:
                writer.add_file(volume_member(v["name"]), self.volumes.packed(work, v["name"]))
        return {
            "volumes": volumes,
            "runc_root": str(self.runc.root),
            "image_transport": meta.get("transport_ref", ""),
            "image_digest": meta.get("digest", ""),
            "dump_seconds": round(dump_seconds, 3),
            "rootfs_deleted_paths": deleted,
        }

    def _checkpoint(self, name: str, images: Path, work: Path, opts: CheckpointOptions
                    ) -> float:
        """``runc checkpoint`` into ``images``; return how long the dump took. On failure
        the container runs on (CRIU resumes it) and the error quotes CRIU."""
        started = time.monotonic()
        self._checkpoint_argv(name, self.runc.checkpoint_argv(name, images, work, opts),
                              images, work)
        return time.monotonic() - started

    def _checkpoint_argv(self, name: str, argv: builtins.list[str], images: Path,
                         work: Path) -> None:
        try:
            proc.run(argv, timeout=self.timeout, log_file=work / "dump.log",
                     what=f"runc checkpoint {name}")
        except CommandError as e:
            shutil.rmtree(images, ignore_errors=True)
            text = with_criu_logs(e.stderr or "", work)
            kept = keep_logs(self.paths.logs, name, work)
            after = self.runc.state(name)
            left = (f"the container is {after.get('status')}" if after
                    else "the container is gone")
            raise CheckpointError(
                f"runc checkpoint of {name!r} failed: {summary(text)}", stderr=text,
                hint=f"{left}; full logs kept in {kept}" if kept else left,
            ) from e

    def resume(self, container: str) -> None:
        """Run again a container that a checkpoint stopped, from the images it kept."""
        bundle = self.bundles.path(container)
        images = self.bundles.kept_images(container)
        if self.bundles.meta(container) is None:
            raise ContainerNotFoundError(f"no runc container named {container!r}")
        state = self.runc.state(container)
        if state is not None and state.get("status") == "paused":
            direct.unpause(self, container)  # the direct route's checkpoint keeps it paused
            return
        if state is not None:
            raise CheckpointError(f"runc container {container!r} is already running")
        if not (images / "inventory.img").is_file():
            raise CheckpointError(f"runc container {container!r} has no kept checkpoint",
                                  hint="restore it from its archive instead")
        with self.paths.workdir("resume") as work:
            self._start(container, self.runc.restore_args(container, images, work, bundle),
                        work=work, error=RestoreError, what=f"runc restore {container}")
        shutil.rmtree(images, ignore_errors=True)

    # --- images carried in archives ------------------------------------------------------

    def _has_image(self, ref: str) -> bool:
        return self.images.has(ref)

    def _export_image(self, ref: str, dest: Path) -> str:
        """Save the image the container runs as an oci-archive, tagged by its digest."""
        digests = {m.get("digest") for m in map(self.bundles.meta, self.bundles.names())
                   if m and m.get("image") == ref}
        # Several containers from different versions of ref: take the current one.
        return self.images.export(ref, dest, str(digests.pop()) if len(digests) == 1 else None)

    def _load_image(self, path: Path, fmt: str) -> None:
        self.images.load(path, fmt)

    # --- restore ---------------------------------------------------------------------------

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        config, mounts = _read_config(source)
        name = opts.name or manifest.container.name
        _check_name(name)
        missing_binds(mounts)  # before anything is made or started
        carried = manifest.extra.get("image_archive")
        digest = config.get("digest")
        if (isinstance(carried, dict) and carried.get("member") in manifest.files
                and digest and not self.images.holds(digest)):
            self.images.load(source / str(carried["member"]), str(carried.get("format")))
        img = self.images.get(config["image"], config.get("transport_ref"), digest)
        volumes = self.volumes.restore(
            mounts, source, lambda v: not opts.ignore_volumes and volume_member(v) in
            manifest.files, replace=opts.replace_volumes, users=lambda v: _volume_users(self, v))
        meta = {"name": name, "image": config["image"], "transport_ref": img.transport_ref,
                "digest": img.digest, "process": config["process"], "created": _now(),
                "restored_from": manifest.container.name,
                "volumes": self.volumes.sources(mounts)}
        return self._restore_bundle(source, manifest, opts, img.rootfs, meta, volumes)

    def _restore_bundle(self, source: Path, manifest: Manifest, opts: RestoreOptions,
                        rootfs: Path, meta: dict[str, Any], volumes: Prepared, *,
                        adjust: SpecHook = None, prepare: BundleHook = None) -> str:
        """Bundle ``meta`` on ``rootfs`` (``adjust``: see Bundles.make), diff, prepare, restore."""
        name = str(meta["name"])
        try:
            bundle = self.bundles.make(name, rootfs, meta, adjust)
        except BaseException:
            volumes.rollback()
            raise
        try:
            diff = source / ROOTFS_DIFF
            if diff.exists():
                apply_rootfs_diff(diff, bundle / "rootfs")
            if prepare is not None:
                prepare(bundle)
            images = source / CHECKPOINT_DIR
            if opts.page_images:  # the direct route: pages a page server received
                pages.merge(Path(opts.page_images), manifest.extra.get(pages.PAGE_STREAM),
                            images)
            with self.paths.workdir("restore") as work, (
                    lazy.serving(images, work, self.timeout, opts.lazy_page_server,
                                 opts.on_running)
                    if opts.lazy_pages else contextlib.nullcontext()):
                opts.commit()  # runc restore runs on in its own session if we die
                self._start(name, self.runc.restore_args(name, images, work, bundle, opts),
                            work=work, error=RestoreError, what=f"runc restore {name}")
        except BaseException as e:
            self.bundles.cleanup(name)
            volumes.rollback()
            if isinstance(e, CtrmigError) and not isinstance(e, (RestoreError, ArchiveError)):
                raise RestoreError(f"restore of {name!r} failed: {e.message}",
                                   stderr=e.stderr, hint=e.hint) from e
            raise
        volumes.commit()
        return name

    _check_foreign = staticmethod(runc_foreign.check)  # another engine's archive
    _restore_foreign = runc_foreign.restore

    # --- small helpers --------------------------------------------------------------------

    def _start(self, name: str, args: builtins.list[str], *, work: Path | None,
               error: type[CtrmigError], what: str) -> None:
        """``runc ARGS`` under a new stdio supervisor, whose PID goes into meta.json."""
        self.stdio.start(name, args, runc_log=(work or self.bundles.path(name)) / "runc.log",
                         work=work, error=error, what=what,
                         record=lambda pid: self.bundles.record_supervisor(name, pid))


def _volume_users(m: RuncMigrator, volume: str) -> list[str]:
    """Containers of ``m``'s state dir, running or paused, that mount named ``volume``."""
    states = {s["id"]: s for s in m.runc.containers()}
    return [n for n in m.bundles.names()
            if m.bundles.status(n, states) in ("running", "paused")
            and any(v.kind == "volume" and v.name == volume
                    for v in from_records((m.bundles.meta(n) or {}).get("volumes")))]


def _refuse_shared(m: RuncMigrator, name: str, mounts: list[Mount]) -> None:
    """Refuse to carry a volume another running container may be writing to."""
    shared = [f"{v.name} (also mounted by {', '.join(users)})" for v in mounts
              if v.kind == "volume"
              and (users := [u for u in _volume_users(m, v.name) if u != name])]
    if shared:
        raise CheckpointError(
            "the content of volume(s) shared with running containers cannot be "
            f"captured consistently: {'; '.join(shared)}",
            hint="stop those containers first, or pass --ignore-volumes to leave "
                 "volume content out of the archive")


def _pause(runc: Runc, name: str) -> Callable[[], None]:
    """``runc pause`` the container; return what resumes it (once, however often called)."""
    proc.run(runc.argv("pause", name), timeout=TOOL_TIMEOUT, what=f"runc pause {name}")
    paused = [True]

    def unpause() -> None:
        if paused:
            proc.run(runc.argv("resume", name), timeout=TOOL_TIMEOUT,
                     what=f"runc resume {name}")
            paused.clear()

    return unpause


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise OptionError(f"invalid container name {name!r}",
                          hint="letters, digits, '_', '.', '-'; at most 128")


def _read_config(source: Path) -> tuple[dict[str, Any], builtins.list[Mount]]:
    """The archive's config.dump, checked: the process must be lists of strings, the
    volumes plain (see :func:`.volumes.from_records`); and those volumes."""
    try:
        config: dict[str, Any] = json.loads((source / CONFIG_DUMP).read_text())
        process = config["process"]
        config["image"] = str(config["image"])
        if not (isinstance(process, dict)
                and all(isinstance(process.get(k), list) and process[k]
                        and all(isinstance(a, str) for a in process[k])
                        for k in ("args", "env"))):
            raise ValueError("process.args and process.env must be lists of strings")
        for key in ("uid", "gid"):
            int(process.get(key, 0))
        mounts = from_records(config.get("volumes"))
    except (OSError, ValueError, KeyError, TypeError, OptionError) as e:
        msg = e.message if isinstance(e, OptionError) else e
        raise RestoreError(f"archive's config.dump is missing or malformed: {msg}") from None
    return config, mounts


def _nothing() -> None:
    """Nothing to undo."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
