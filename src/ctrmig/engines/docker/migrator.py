"""The docker adapter: checkpoint a container through dockerd, restore it as a new one.

dockerd (with ``"experimental": true``) keeps checkpoints in its own data root and has no
export (see :mod:`.checkpoints`). So ctrmig reads the checkpoint from there (ctrmig runs
as root on the docker host) and, to restore, creates a new container with the recorded
config (:mod:`.config`), applies the recorded filesystem changes (:mod:`.rootfs`), places
the CRIU images in the new container's checkpoint directory and starts it from there.
Every Engine API call is in :mod:`.api`.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import tenacity

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, foreign
from ctrmig.archive.layout import CHECKPOINT_DIR, CONFIG_DUMP, SPEC_DUMP
from ctrmig.engines.base import BaseMigrator, Dump
from ctrmig.engines.docker import config, rootfs, volumes
from ctrmig.engines.docker import foreign as docker_foreign
from ctrmig.engines.docker.api import EngineAPI
from ctrmig.engines.docker.checkpoints import Checkpoints, new_name
from ctrmig.errors import (
    CheckpointError,
    ContainerNotFoundError,
    EngineError,
    OptionError,
    RestoreError,
)
from ctrmig.host import http
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions

log = logging.getLogger(__name__)


class DockerMigrator(BaseMigrator):
    """Checkpoint and restore docker containers (dockerd with experimental features)."""

    engine: ClassVar[str] = "docker"
    imports_from: ClassVar[frozenset[str]] = frozenset({"podman", "runc", "cri-o"})
    needs_extracted: ClassVar[bool] = True
    # keep: also keep docker's checkpoint of a container left running (one that stopped
    # always keeps it, for resume) / keep the images in the new container (restore);
    # ignore_rootfs: no filesystem changes recorded / applied. allow_privileged and
    # include_image are the base's.
    # ignore_volumes: no volume content recorded / restored; replace_volumes: an existing
    # volume with other content is replaced (see volumes.Restorer).
    checkpoint_options: ClassVar[frozenset[str]] = frozenset(
        {"keep", "ignore_rootfs", "ignore_volumes"})
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"keep", "ignore_rootfs", "publish_ports", "ignore_volumes", "replace_volumes"}
    )

    commits_in_restore: ClassVar[bool] = True  # before the start from the checkpoint
    #: Make every checkpoint upload to containerd unique (see Checkpoints.start); read
    #: when a migrator is made.
    unique_uploads: bool = True
    #: Tries of an idempotent call (a GET, a forced DELETE) that failed transiently (5xx,
    #: dropped connection), read when a migrator is made. Checkpoint, create and start
    #: are never retried blindly.
    retry_attempts: ClassVar[int] = http.RETRY_ATTEMPTS
    retry_wait: ClassVar[tenacity.wait.wait_base] = http.RETRY_WAIT

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_timeout: float = 60.0,
        start_attempts: int = 8,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 900.0,
    ):
        """``base_url``: dockerd's socket (default: $DOCKER_HOST, else the system socket).

        ``api_timeout`` bounds quick calls (inspect, create); ``timeout`` the long ones
        (checkpoint, start from a checkpoint, filesystem archives). ``start_attempts``
        bounds the retries of containerd's start race (backoff 0.25 s doubling to 4 s).
        """
        super().__init__(workdir=workdir, timeout=timeout)
        self.base_url = base_url or settings.current().docker_url
        self.api = EngineAPI(self.base_url, api_timeout=api_timeout, timeout=timeout,
                             retry_attempts=self.retry_attempts, retry_wait=self.retry_wait)
        self.checkpoints = Checkpoints(self.api, start_attempts=start_attempts,
                                       unique_uploads=self.unique_uploads)

    # --- plain container calls -------------------------------------------------------------

    @property
    def lock_scope(self) -> str:
        """This instance of docker: the API address."""
        return self.base_url

    def close(self) -> None:
        self.api.close()

    def info(self) -> dict[str, Any]:
        """dockerd's ``/info``."""
        return self.api.info()

    def version(self) -> str:
        return self.api.version()

    def list(self) -> list[ContainerInfo]:
        return [
            ContainerInfo(
                engine=self.engine,
                name=(row.get("Names") or [""])[0].lstrip("/"),
                id=row["Id"],
                image=row.get("Image", ""),
                state=row.get("State", ""),
            )
            for row in self.api.containers()
        ]

    def exists(self, container: str) -> bool:
        return self.api.exists(container)

    def remove(self, container: str) -> None:
        self.api.remove(container)

    def logs(self, container: str) -> str:
        return self.api.logs(container)

    def carried_volumes(self, container: str, opts: CheckpointOptions) -> builtins.list[str]:
        """The named volumes whose content a checkpoint of ``container`` with ``opts``
        carries: a migration's journal records them before the source stops."""
        if opts.ignore_volumes:
            return []
        return [v.name for v in volumes.mounted(self.api.inspect(container)) if not v.anonymous]

    def remove_moved_volumes(self, manifest: Manifest) -> None:
        """Remove the named volumes a migration carried away in ``manifest``'s archive
        (its container removed already); one another container still uses stays."""
        self.remove_volumes(volumes.moved(manifest))

    def remove_volumes(self, names: Iterable[str]) -> None:
        """Remove migrated named volumes ``names``; one another container still uses stays."""
        for name in names:
            try:
                self.api.remove_volume(name)
            except EngineError as e:
                log.warning("volume %s was migrated but stays here: %s", name, e)

    # --- images (the base carries them in the archive with include_image) ------------------

    def _has_image(self, ref: str) -> bool:
        return self.api.has_image(ref)

    def _export_image(self, ref: str, dest: Path) -> str:
        self.api.save_image(ref, dest)
        return "docker-archive"

    def _load_image(self, path: Path, fmt: str) -> None:
        if fmt != "docker-archive":
            raise OptionError(f"the docker engine cannot load a {fmt} image",
                              hint="load the image into dockerd yourself, then restore")
        self.api.load_image(path)

    # --- checkpoint ------------------------------------------------------------------------

    def _describe(self, container: str) -> ContainerRecord:
        return config.record(self.api.inspect(container))

    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        self.checkpoints.require()
        data = self.api.inspect(record.id)
        if not (data.get("State") or {}).get("Running"):
            raise CheckpointError(f"docker container {record.name!r} is not running")
        if (data.get("HostConfig") or {}).get("AutoRemove") and not opts.leave_running:
            # Seen on 20.10: dockerd removes it while writing the checkpoint; all is lost.
            raise CheckpointError(
                f"docker container {record.name!r} was started with --rm: dockerd would "
                "remove it as the checkpoint stops it",
                hint="checkpoint it with leave_running, or run it without --rm",
            )
        spec = config.oci_spec(data)
        name = new_name()
        mounted = volumes.mounted(data)
        carried = [] if opts.ignore_volumes else mounted
        volumes.require_consistent(self.api, record.id, carried, record.name)
        # Left running, it is paused from before the dump until its volumes are read.
        paused = [record.id] if (carried and opts.leave_running
                                 and not (data.get("State") or {}).get("Paused")) else []
        for cid in paused:
            self.api.pause(cid)

        def unpause() -> None:
            while paused:
                self.api.unpause(paused.pop())

        started = time.monotonic()
        try:
            self.checkpoints.create(record.id, name, config.checkpoint_fields(opts),
                                    label=record.name)
        except BaseException:
            unpause()
            raise
        seconds = round(time.monotonic() - started, 3)

        def write(writer: ArchiveWriter) -> dict[str, Any]:
            try:
                with volumes.captured(self.api, record.id, carried,
                                      workdir=self.workdir) as packed:
                    unpause()
                    volumes.add(writer, packed)
            finally:
                unpause()
            contents = {v.name: v for v, _ in packed}
            writer.add_tree(self.checkpoints.path(record.id, name), CHECKPOINT_DIR)
            writer.add_bytes(CONFIG_DUMP, json.dumps(data, indent=2).encode())
            if spec is not None:
                writer.add_bytes(SPEC_DUMP, spec)
            diff: dict[str, Any] = {}
            if not opts.ignore_rootfs:
                diff = rootfs.write_diff(self.api, record.id, data, writer,
                                         workdir=self.workdir)
            return {
                "checkpoint_seconds": seconds,
                "storage_driver": (data.get("GraphDriver") or {}).get("Name", ""),
                "rootfs": diff,
                volumes.EXTRA_KEY: [contents.get(v.name, v).to_dict() for v in mounted],
            }

        def commit() -> None:
            # A stopped container keeps its checkpoint: resume() (the rollback of a failed
            # migration) starts it from there; removing the container removes it too.
            if opts.leave_running and not opts.keep:
                self.checkpoints.drop(record.id, name)

        def rollback() -> None:
            unpause()
            if opts.leave_running:
                commit()
            else:
                # Started from the checkpoint; one that fails to start stays (the only
                # copy of the container's state: `ctrmig resume` retries).
                self.checkpoints.resume(record.id, name)

        return Dump(write=write, rollback=rollback, commit=commit)

    def resume(self, container: str) -> None:
        """Start a container a checkpoint stopped from the newest checkpoint ctrmig kept."""
        data = self.api.inspect(container)
        if (data.get("State") or {}).get("Running"):
            raise CheckpointError(f"docker container {container!r} is running: nothing to "
                                  "resume")
        self.checkpoints.require_experimental()
        cid = str(data["Id"])
        kept = self.checkpoints.kept(cid)
        if not kept:
            raise CheckpointError(
                f"docker container {container!r} has no checkpoint kept by ctrmig",
                hint="restore it from its archive (ctrmig restore)",
            )
        self.checkpoints.resume(cid, kept[0])

    # --- restore ---------------------------------------------------------------------------

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)  # volumes' drivers judged there too
        if manifest.engine == self.engine:  # a foreign one's: see .foreign
            volumes.recorded(manifest)  # a hostile volume entry is refused before any call
        # Before the base loads a carried image: a daemon that cannot restore says so first.
        self.checkpoints.require()

    def _check_name_free(self, name: str, source: Path | None = None) -> None:
        if source is None or not foreign.images_only_tree(source):
            super()._check_name_free(name, source)
            return
        # A docker checkpoint directory's images go into a container that exists already.
        if not self.exists(name):
            raise ContainerNotFoundError(
                f"no docker container {name!r} to start from the checkpoint directory's images",
                hint="name the stopped container it came from, or create one with the same "
                     f"image and command (docker create --name {name} IMAGE COMMAND...)")
        state = self.api.inspect(name).get("State") or {}
        if state.get("Running") or state.get("Paused"):
            raise RestoreError(
                f"docker container {name!r} is running: a checkpoint directory's images "
                "start a stopped container", hint=f"stop it first (docker stop {name})")

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        if foreign.images_only(manifest):
            return self._start_stopped(source, opts)
        recorded = config.load_config(source)
        body = config.create_body(recorded, opts.publish_ports)
        name = opts.name or manifest.container.name
        carried = [] if opts.ignore_volumes else volumes.recorded(manifest)
        if config.has_volumes(recorded) and not carried:
            log.warning("%s: volume contents are not in the archive%s; the new container "
                        "gets the volumes by name (empty if new)", manifest.container.name,
                        " or are ignored" if opts.ignore_volumes else "")
        vols = volumes.Restorer(self.api, source, carried, replace=opts.replace_volumes,
                                label=name)  # refuses a volume here with other content
        with vols.created():
            return self._restore_into(source, body, name, vols, opts)

    _check_foreign = staticmethod(docker_foreign.check)  # another engine's archive
    _restore_foreign = docker_foreign.restore

    def _start_stopped(self, source: Path, opts: RestoreOptions) -> str:
        """Start the existing stopped container ``opts.name`` from the CRIU images alone
        (a docker checkpoint directory's), as ``docker start --checkpoint`` does; on
        failure it stays stopped, as it was."""
        assert opts.name is not None
        cid = str(self.api.inspect(opts.name)["Id"])
        checkpoint, path = self.checkpoints.place(cid, source / CHECKPOINT_DIR)
        try:
            opts.commit()
            self.checkpoints.start(cid, checkpoint, path)
        except BaseException:
            self.checkpoints.drop(cid, checkpoint)
            raise
        if not opts.keep:
            self.checkpoints.drop(cid, checkpoint)
        return opts.name

    def _restore_into(self, source: Path, body: dict[str, Any], name: str,
                      vols: volumes.Restorer, opts: RestoreOptions) -> str:
        cid = self.api.create(body, name)
        try:
            vols.fill(cid)
            if not opts.ignore_rootfs:
                rootfs.apply_diff(self.api, cid, source)
            checkpoint, path = self.checkpoints.place(cid, source / CHECKPOINT_DIR)
            opts.commit()  # dockerd finishes a start it got, whatever happens to us
            self.checkpoints.start(cid, checkpoint, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(cid)
            raise
        if not opts.keep:
            self.checkpoints.drop(cid, checkpoint)
        return name
