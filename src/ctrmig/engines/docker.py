"""The docker adapter: checkpoint a container through dockerd, restore it as a new one.

dockerd (with ``"experimental": true``) checkpoints a container into
``<DockerRootDir>/containers/<id>/checkpoints/<name>/`` and starts a container from a
checkpoint of that same directory; it offers no export and refuses a custom checkpoint
directory on start. So ctrmig reads the checkpoint from the daemon's data root (ctrmig runs
as root on the docker host) and, to restore, creates a new container with the recorded
config, applies the recorded filesystem changes, places the CRIU images in the new
container's checkpoint directory and starts it from there.

docker-py has no checkpoint calls: the few raw Engine API calls live in the "raw Engine
API" section below. Every call goes through :func:`ctrmig.host.http.api_errors`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, ClassVar, TypeVar

import docker
import requests
import tenacity
import urllib3
from docker.errors import DockerException
from docker.utils import convert_port_bindings
from docker.utils.ports import split_port

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest
from ctrmig.archive.layers import overlay_whiteout
from ctrmig.engines.base import BaseMigrator
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    ContainerNotFoundError,
    EngineError,
    ImageNotFoundError,
    OptionError,
    RestoreError,
    ToolMissingError,
)
from ctrmig.host import http, proc
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

START_HINT = ("start dockerd (systemctl start docker, or scripts/setup-host), or point "
              "base_url / DOCKER_HOST at its socket")
EXPERIMENTAL_HINT = ('enable "experimental": true in /etc/docker/daemon.json '
                     "(scripts/setup-host does) and restart dockerd")
# moby#42900: starting from a checkpoint right after one was made fails once or twice with
# "failed to upload checkpoint to containerd: commit failed: content sha256:...: already
# exists"; the same call a moment later succeeds.
START_RACE = re.compile(r"content sha256:[0-9a-f]+.*already exists")

CHECKPOINT_DIR = "checkpoint"
NONCE_FILE = "ctrmig-restore.id"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
_ADDED, _MODIFIED, _DELETED = 1, 0, 2

# Config keys copied from the recorded container into the new one. Not NetworkDisabled:
# dockerd sets it itself when it has no network, and a new container created with it set
# explicitly fails to restore ("criu failed: type NOTIFY errno 0", seen on 20.10.24).
_CONFIG_KEYS = ("Hostname", "Domainname", "User", "Env", "Cmd", "Entrypoint", "Image",
                "WorkingDir", "Labels", "ExposedPorts", "Volumes", "Tty", "OpenStdin",
                "StdinOnce", "StopSignal", "StopTimeout", "Healthcheck",
                "Shell")
_HOST_CONFIG_KEYS = ("Binds", "Mounts", "PortBindings", "PublishAllPorts", "RestartPolicy",
                     "NetworkMode", "Privileged", "CapAdd", "CapDrop", "Devices", "Ulimits",
                     "Memory", "MemorySwap", "MemoryReservation", "NanoCpus", "CpuShares",
                     "CpuPeriod", "CpuQuota", "CpusetCpus", "CpusetMems", "PidsLimit",
                     "ShmSize", "Tmpfs", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
                     "GroupAdd", "IpcMode", "PidMode", "UTSMode", "UsernsMode", "SecurityOpt",
                     "ReadonlyRootfs", "Init", "LogConfig", "OomScoreAdj", "Sysctls",
                     "Runtime", "CgroupParent", "AutoRemove", "MaskedPaths", "ReadonlyPaths")


class DockerMigrator(BaseMigrator):
    """Checkpoint and restore docker containers (dockerd with experimental features)."""

    engine: ClassVar[str] = "docker"
    needs_extracted: ClassVar[bool] = True
    # keep: also keep docker's checkpoint of a container left running (one that stopped
    # always keeps it, for resume) / keep the images in the new container (restore);
    # ignore_rootfs: no filesystem changes recorded / applied. allow_privileged and
    # include_image are the base's.
    checkpoint_options: ClassVar[frozenset[str]] = frozenset({"keep", "ignore_rootfs"})
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"keep", "ignore_rootfs", "publish_ports"}
    )

    commits_in_restore: ClassVar[bool] = True  # before the start from the checkpoint
    #: Make every checkpoint upload to containerd unique (see _start_retrying).
    unique_uploads: bool = True
    #: Tries of an idempotent call (a GET, a forced DELETE) that failed transiently (5xx,
    #: dropped connection). Checkpoint, create and start are never retried blindly.
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
        self.api_timeout = api_timeout
        self.start_attempts = start_attempts
        self._client: docker.APIClient | None = None
        self._info: dict[str, Any] | None = None
        # Docker-side checkpoint made by _dump (by container id), dropped by _write.
        self._made: dict[str, str] = {}

    # --- plumbing --------------------------------------------------------------------------

    def _errors(
        self,
        what: str,
        *,
        not_found: type[EngineError] = ContainerNotFoundError,
        error: type[EngineError] = EngineError,
    ) -> contextlib.AbstractContextManager[None]:
        return http.api_errors(
            "docker", what, start_hint=START_HINT,
            # urllib3: errors while reading a streamed body (res.raw) are not wrapped
            catch=(DockerException, requests.RequestException, urllib3.exceptions.HTTPError),
            not_found=not_found, error=error,
        )

    @property
    def api(self) -> docker.APIClient:
        """docker-py's low-level client, made on first use (asks the daemon's version)."""
        if self._client is None:
            with self._errors(f"connect to {self.base_url}"):
                self._client = docker.APIClient(
                    base_url=self.base_url, timeout=self.api_timeout, version="auto"
                )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = dict(self._idempotent("info", lambda: self.api.info()))
        return self._info

    def _idempotent(self, what: str, call: Callable[[], T], *,
                    not_found: type[EngineError] = ContainerNotFoundError) -> T:
        """Run an idempotent API call, retrying transient failures; translate the rest."""
        with self._errors(what, not_found=not_found):
            return http.idempotent("docker", what, call, attempts=self.retry_attempts,
                                   wait=self.retry_wait)

    def _data_root(self) -> Path:
        root = Path(str(self.info().get("DockerRootDir") or "/var/lib/docker"))
        if not (root / "containers").is_dir():
            raise EngineError(
                f"dockerd's data root {root} is not readable here",
                hint="run ctrmig as root on the docker host: checkpoints live in the data root",
            )
        return root

    def _require_checkpoints(self) -> None:
        """Experimental features on, CRIU installed, the data root local: or say the fix."""
        if not self.info().get("ExperimentalBuild"):
            raise EngineError(
                "dockerd has experimental features off: it cannot checkpoint",
                hint=EXPERIMENTAL_HINT,
            )
        proc.which("criu")
        self._data_root()

    def _inspect(self, container: str) -> dict[str, Any]:
        return dict(self._idempotent(f"inspect {container}",
                                     lambda: self.api.inspect_container(container)))

    # --- raw Engine API: the calls docker-py lacks, with explicit timeouts -----------------

    def _checkpoint_create(self, cid: str, name: str, *, exit: bool) -> None:
        api = self.api
        with _criu_missing(), self._errors(f"checkpoint {cid[:12]}", error=CheckpointError):
            api._raise_for_status(api._post_json(
                api._url("/containers/{0}/checkpoints", cid),
                data={"CheckpointID": name, "Exit": exit}, timeout=self.timeout,
            ))

    def _checkpoint_names(self, cid: str) -> list[str]:
        api = self.api
        rows = self._idempotent(f"list checkpoints of {cid[:12]}", lambda: api._result(api._get(
            api._url("/containers/{0}/checkpoints", cid), timeout=self.api_timeout,
        ), json=True))
        return [str(row["Name"]) for row in rows or []]

    def _checkpoint_delete(self, cid: str, name: str) -> None:
        api = self.api
        with self._errors(f"delete checkpoint {name} of {cid[:12]}"):
            api._raise_for_status(api._delete(
                api._url("/containers/{0}/checkpoints/{1}", cid, name),
                timeout=self.api_timeout,
            ))

    def _start_from(self, cid: str, name: str) -> None:
        api = self.api
        with _criu_missing(), \
                self._errors(f"start {cid[:12]} from checkpoint {name}", error=RestoreError):
            api._raise_for_status(api._post(
                api._url("/containers/{0}/start", cid), params={"checkpoint": name},
                timeout=self.timeout,
            ))

    def _changes(self, cid: str) -> list[dict[str, Any]]:
        """GET /containers/{id}/changes (docker diff), which walks the whole layer."""
        api = self.api
        changes = self._idempotent(f"diff of {cid[:12]}", lambda: api._result(api._get(
            api._url("/containers/{0}/changes", cid), timeout=self.timeout,
        ), json=True))
        return list(changes or [])

    def _get_archive(self, cid: str, path: str) -> requests.Response:
        api = self.api
        with self._errors(f"read {path} of {cid[:12]}"):
            res: requests.Response = api._get(
                api._url("/containers/{0}/archive", cid), params={"path": path},
                stream=True, timeout=self.timeout,
                headers={"Accept-Encoding": "identity"},  # no gzip over a local socket
            )
            api._raise_for_status(res)
        res.raw.decode_content = True  # should dockerd compress anyway
        return res

    def _put_archive(self, cid: str, path: str, data: BinaryIO) -> None:
        api = self.api
        with self._errors(f"write files into {cid[:12]}", error=RestoreError):
            api._raise_for_status(api._put(
                api._url("/containers/{0}/archive", cid), params={"path": path},
                data=data, timeout=self.timeout,
            ))

    def _save_image(self, ref: str, dest: Path) -> None:
        api = self.api
        with self._errors(f"save image {ref}", not_found=ImageNotFoundError,
                          error=CheckpointError):
            res = api._get(api._url("/images/{0}/get", ref), stream=True,
                           timeout=self.timeout)
            api._raise_for_status(res)
            with dest.open("wb") as f:
                for chunk in res.iter_content(1 << 20):
                    f.write(chunk)

    def _post_image(self, path: Path) -> None:
        api = self.api
        with self._errors("load image", error=RestoreError), path.open("rb") as body:
            res = api._post(api._url("/images/load"), data=body, params={"quiet": "1"},
                            headers={"Content-Type": "application/x-tar"},
                            timeout=self.timeout)
            text = api._result(res)
        # dockerd answers 200 and reports a failed load in the JSON stream.
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("error"):
                    raise RestoreError(f"docker: load image failed: {message['error']}",
                                       stderr=text)

    # --- images (the base carries them in the archive with include_image) ------------------

    def _has_image(self, ref: str) -> bool:
        try:
            self._idempotent(f"inspect image {ref}", lambda: self.api.inspect_image(ref),
                             not_found=ImageNotFoundError)
        except ImageNotFoundError:
            return False
        return True

    def _export_image(self, ref: str, dest: Path) -> str:
        self._save_image(ref, dest)
        return "docker-archive"

    def _load_image(self, path: Path, fmt: str) -> None:
        if fmt != "docker-archive":
            raise OptionError(f"the docker engine cannot load a {fmt} image",
                              hint="load the image into dockerd yourself, then restore")
        self._post_image(path)

    # --- plain container calls -------------------------------------------------------------

    @property
    def lock_scope(self) -> str:
        """This instance of docker: the API address."""
        return self.base_url

    def version(self) -> str:
        return str(self._idempotent("version", lambda: self.api.version())["Version"])

    def list(self) -> list[ContainerInfo]:
        rows = self._idempotent("list containers", lambda: self.api.containers(all=True))
        return [
            ContainerInfo(
                engine=self.engine,
                name=(row.get("Names") or [""])[0].lstrip("/"),
                id=row["Id"],
                image=row.get("Image", ""),
                state=row.get("State", ""),
            )
            for row in rows
        ]

    def exists(self, container: str) -> bool:
        try:
            self._inspect(container)
        except ContainerNotFoundError:
            return False
        return True

    def remove(self, container: str) -> None:
        # A retry after the first DELETE went through finds it gone: that is done too.
        with contextlib.suppress(ContainerNotFoundError):
            self._idempotent(f"remove {container}",
                             lambda: self.api.remove_container(container, force=True))

    def logs(self, container: str) -> str:
        data: bytes = self._idempotent(
            f"logs of {container}", lambda: self.api.logs(container, stdout=True, stderr=True))
        return data.decode(errors="replace")

    # --- checkpoint ------------------------------------------------------------------------

    def _describe(self, container: str) -> ContainerRecord:
        data = self._inspect(container)
        config = data.get("Config") or {}
        return ContainerRecord(
            name=str(data.get("Name", "")).lstrip("/"),
            id=data["Id"],
            image=str(config.get("Image", "")),
            image_id=str(data.get("Image", "")),
            command=[*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])],
        )

    def _dump(
        self, record: ContainerRecord, opts: CheckpointOptions, writer: ArchiveWriter
    ) -> dict[str, Any]:
        self._require_checkpoints()
        data = self._inspect(record.id)
        if not (data.get("State") or {}).get("Running"):
            raise CheckpointError(f"docker container {record.name!r} is not running")
        if (data.get("HostConfig") or {}).get("AutoRemove") and not opts.leave_running:
            # Seen on 20.10: dockerd removes it while writing the checkpoint; all is lost.
            raise CheckpointError(
                f"docker container {record.name!r} was started with --rm: dockerd would "
                "remove it as the checkpoint stops it",
                hint="checkpoint it with leave_running, or run it without --rm",
            )
        spec = _oci_spec(data)
        name = f"ctrmig-{uuid.uuid4().hex[:12]}"
        started = time.monotonic()
        self._checkpoint_safely(record, name, exit=not opts.leave_running)
        self._made[record.id] = name
        seconds = round(time.monotonic() - started, 3)
        try:
            writer.add_tree(self._checkpoint_dir(record.id, name), CHECKPOINT_DIR)
            writer.add_bytes(CONFIG_DUMP, json.dumps(data, indent=2).encode())
            if spec is not None:
                writer.add_bytes(SPEC_DUMP, spec)
            rootfs: dict[str, Any] = {}
            if not opts.ignore_rootfs:
                rootfs = self._dump_rootfs(record.id, data, writer)
        except BaseException:
            if not opts.leave_running:
                self._rollback_checkpoint(record, opts)
            raise  # _write drops docker's checkpoint
        return {
            "checkpoint_seconds": seconds,
            "storage_driver": (data.get("GraphDriver") or {}).get("Name", ""),
            "rootfs": rootfs,
        }

    def _write(self, record: ContainerRecord, opts: CheckpointOptions, out: BinaryIO,
               progress: Any) -> Manifest:
        # The docker-side checkpoint outlives _dump: a failure while the manifest is written
        # still needs it to bring the container back.
        try:
            return super()._write(record, opts, out, progress)
        finally:
            # A stopped container keeps its checkpoint: resume() (the rollback of a failed
            # migration) starts it from there; removing the container removes it too.
            name = self._made.pop(record.id, None)
            if name is not None and opts.leave_running and not opts.keep:
                self._drop_checkpoint(record.id, name)

    def _checkpoint_safely(self, record: ContainerRecord, name: str, *, exit: bool) -> None:
        """Checkpoint, dodging containerd's "content ... already exists" (moby#42900).

        A checkpoint writes the container's spec to containerd's content store; while the
        previous checkpoint's copy awaits garbage collection, the same blob fails the
        commit. Seen here: a stopping checkpoint right after another one failed 6 times
        in 12 and left the container stopped with no checkpoint, its state lost. Waiting
        for dockerd's own containerd content store to be empty (0.04-0.5 s) made it 0 in
        12. A container still running after the error is retried.
        """
        self._wait_for_content_gc()
        for attempt in range(1, self.start_attempts + 1):
            try:
                self._checkpoint_create(record.id, name, exit=exit)
                return
            except CheckpointError as e:
                if not _is_start_race(e):
                    raise
                if not (self._inspect(record.id).get("State") or {}).get("Running"):
                    raise CheckpointError(
                        f"docker container {record.name!r} stopped but dockerd kept no "
                        "checkpoint (containerd: content already exists, moby#42900)",
                        hint="its memory state is lost; start it afresh",
                        stderr=e.stderr,
                    ) from e
                if attempt == self.start_attempts:
                    raise
                log.warning("checkpoint hit containerd's race (moby#42900), attempt %d; "
                            "retrying", attempt)
                self._wait_for_content_gc()
                time.sleep(min(0.25 * 2 ** (attempt - 1), 4))

    def _wait_for_content_gc(self, timeout: float = 60.0) -> None:
        """Wait until dockerd's private containerd holds no content blob (they are only
        checkpoint leftovers there). Unknown layouts (a system containerd): no wait."""
        blobs = (self._data_root() / "containerd" / "daemon" /
                 "io.containerd.content.v1.content" / "blobs" / "sha256")
        if not blobs.is_dir():
            log.debug("no private containerd content store at %s: not waiting", blobs)
            return
        start = time.monotonic()
        while any(blobs.iterdir()):
            if time.monotonic() - start > timeout:
                log.warning("containerd still holds content after %g s; checkpointing anyway",
                            timeout)
                return
            time.sleep(0.05)
        log.debug("waited %.2f s for containerd's garbage collection", time.monotonic() - start)

    def _drop_checkpoint(self, cid: str, name: str) -> None:
        try:
            self._checkpoint_delete(cid, name)
        except EngineError as e:
            log.warning("could not delete docker checkpoint %s of %s: %s", name, cid[:12], e)

    def _rollback_checkpoint(self, record: ContainerRecord, opts: CheckpointOptions) -> None:
        name = self._made.get(record.id)
        if name is None:
            return
        log.warning("checkpoint of %s failed: restarting it from checkpoint %s",
                    record.name, name)
        try:
            self._resume_from(record.id, name)
        except EngineError as e:
            # docker's checkpoint stays: it is the only copy of the container's state now.
            log.error("could not bring %s back from checkpoint %s: %s (retry: ctrmig resume "
                      "%s)", record.name, name, e, record.name)

    def resume(self, container: str) -> None:
        """Start a container a checkpoint stopped from the newest checkpoint ctrmig kept."""
        data = self._inspect(container)
        if (data.get("State") or {}).get("Running"):
            raise CheckpointError(f"docker container {container!r} is running: nothing to "
                                  "resume")
        cid = str(data["Id"])
        kept = sorted(
            (self._checkpoint_dir(cid, n) for n in self._checkpoint_names(cid)
             if n.startswith("ctrmig-")),
            key=lambda p: p.stat().st_mtime, reverse=True,
        )
        if not kept:
            raise CheckpointError(
                f"docker container {container!r} has no checkpoint kept by ctrmig",
                hint="restore it from its archive (ctrmig restore)",
            )
        self._resume_from(cid, kept[0].name)

    def _resume_from(self, cid: str, name: str) -> None:
        self._start_retrying(cid, name, self._checkpoint_dir(cid, name))
        self._drop_checkpoint(cid, name)

    def _checkpoint_dir(self, cid: str, name: str) -> Path:
        path = self._data_root() / "containers" / cid / "checkpoints" / name
        if not path.is_dir():
            raise CheckpointError(f"dockerd reported checkpoint {name} but {path} is missing")
        return path

    def _dump_rootfs(self, cid: str, data: dict[str, Any], writer: ArchiveWriter
                     ) -> dict[str, Any]:
        """rootfs-diff.tar (changed and added files) and deleted.files (podman's layout)."""
        changes = self._changes(cid)
        deleted = sorted(c["Path"] for c in changes if c["Kind"] == _DELETED)
        changed = sorted(c["Path"] for c in changes if c["Kind"] != _DELETED)
        upper = _upper_dir(data)
        fetched = 0
        with tempfile.TemporaryFile(dir=self.workdir) as tmp:
            with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in changed:
                    local = upper / path.lstrip("/") if upper else None
                    if local is not None and os.path.lexists(local):
                        tar.add(local, arcname=path.lstrip("/"), recursive=False)
                    elif not _has_children(path, changes):
                        fetched += 1
                        self._copy_from_container(cid, path, tar)
            size = tmp.tell()
            tmp.seek(0)
            writer.add_stream(ROOTFS_DIFF, tmp, size)
        writer.add_bytes(DELETED_FILES, json.dumps(deleted).encode())
        return {"changed": len(changed), "deleted": len(deleted),
                "method": "overlay2-upperdir" if upper and not fetched else "archive-api"}

    def _copy_from_container(self, cid: str, path: str, tar: tarfile.TarFile) -> None:
        """Add ``path`` of the container (GET /archive) to ``tar`` under its full path."""
        parent = PurePosixPath(path).parent.as_posix().lstrip("/")
        res = self._get_archive(cid, path)
        try:
            with self._errors(f"read {path} of {cid[:12]}"), \
                    tarfile.open(fileobj=res.raw, mode="r|") as src:
                for member in src:
                    member.name = f"{parent}/{member.name}" if parent else member.name
                    body = src.extractfile(member) if member.isfile() else None
                    tar.addfile(member, body)
        finally:
            res.close()

    # --- restore ---------------------------------------------------------------------------

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)
        # Before the base loads a carried image: a daemon that cannot restore says so first.
        self._require_checkpoints()

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        config = _load_config(source)
        body = _create_body(config, opts.publish_ports)
        if any(m.get("Type") == "volume" for m in config.get("Mounts") or []):
            log.warning("%s: volume contents are not in the archive; the new container "
                        "gets the volumes by name (empty if new)", manifest.container.name)
        name = self._pick_name(opts.name or manifest.container.name, explicit=bool(opts.name))
        with self._errors(f"create container {name}", error=RestoreError):
            cid = str(self.api.create_container_from_config(body, name)["Id"])
        try:
            if not opts.ignore_rootfs:
                self._apply_rootfs(cid, source)
            checkpoint = f"ctrmig-{uuid.uuid4().hex[:12]}"
            target = self._data_root() / "containers" / cid / "checkpoints" / checkpoint
            target.parent.mkdir(parents=True, exist_ok=True)
            # The extracted copy is ours and used once: move it (a rename on one filesystem).
            shutil.move(source / CHECKPOINT_DIR, target)
            opts.commit()  # dockerd finishes a start it got, whatever happens to us
            self._start_retrying(cid, checkpoint, target)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(cid)
            raise
        if not opts.keep:
            self._drop_checkpoint(cid, checkpoint)
        return name

    def _pick_name(self, wanted: str, *, explicit: bool) -> str:
        if explicit or not self.exists(wanted):
            return wanted
        return f"{wanted}-{uuid.uuid4().hex[:6]}"

    def _start_retrying(self, cid: str, checkpoint: str, path: Path | None = None) -> None:
        """Start ``cid`` from ``checkpoint`` (at ``path``), retrying only the moby#42900 race.

        dockerd uploads the checkpoint directory as a tar to containerd's content store;
        when a blob with the same digest is still there (containerd's own copy of a fresh
        checkpoint awaiting garbage collection, or a concurrent restore of the same
        archive) the upload fails with "already exists". A file unique to this start makes
        the digest unique: seen here, that removed the race (30 rounds, 12 concurrent
        restores, no retry). The bounded retry stays for daemons that behave otherwise.
        """
        if path is not None and self.unique_uploads:
            (path / NONCE_FILE).write_text(f"{cid} {checkpoint} {uuid.uuid4().hex}\n")
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.start_attempts),
            wait=tenacity.wait_exponential(multiplier=0.25, max=4),
            retry=tenacity.retry_if_exception(_is_start_race),
            before_sleep=_log_race,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                self._start_from(cid, checkpoint)

    def _apply_rootfs(self, cid: str, source: Path) -> None:
        diff = source / ROOTFS_DIFF
        if diff.is_file() and diff.stat().st_size > 0:
            with diff.open("rb") as f:
                self._put_archive(cid, "/", f)
        deleted_file = source / DELETED_FILES
        deleted: list[str] = []
        if deleted_file.is_file():
            try:
                deleted = json.loads(deleted_file.read_text())
            except ValueError:
                raise ArchiveError(f"{DELETED_FILES} is not valid JSON") from None
            if not isinstance(deleted, list) or not all(isinstance(p, str) for p in deleted):
                raise ArchiveError(f"{DELETED_FILES} must be a list of paths")
        if deleted:
            upper = _upper_dir(self._inspect(cid))
            if upper is None:
                raise RestoreError(
                    f"cannot delete {len(deleted)} recorded path(s) in the new container",
                    hint="only the overlay2 storage driver is supported for deletions; "
                         "or restore with ignore_rootfs",
                )
            for path in deleted:
                overlay_whiteout(upper, path)


# --- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _criu_missing() -> Iterator[None]:
    """dockerd (through runc) may not find criu on its own PATH, even when ctrmig does."""
    try:
        yield
    except EngineError as e:
        text = e.stderr or ""
        if re.search(r"criu.*(executable file not found|no such file)", text, re.I):
            raise ToolMissingError(
                "dockerd's runtime cannot find criu", stderr=text,
                hint="install criu where dockerd finds it (scripts/setup-host) and "
                     "restart dockerd",
            ) from e
        raise


def _log_race(state: tenacity.RetryCallState) -> None:
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("start from checkpoint hit containerd's race (moby#42900), attempt %d; "
                "retrying in %.2f s", state.attempt_number, wait)


def _is_start_race(exc: BaseException) -> bool:
    return isinstance(exc, EngineError) and bool(START_RACE.search(exc.stderr or str(exc)))


def _load_config(source: Path) -> dict[str, Any]:
    path = source / CONFIG_DUMP
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArchiveError(f"the archive has no {CONFIG_DUMP}") from None
    except ValueError:
        raise ArchiveError(f"{CONFIG_DUMP} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("Config"), dict):
        raise ArchiveError(f"{CONFIG_DUMP} is not a docker container inspect document")
    return data


def _create_body(config: dict[str, Any], publish: tuple[str, ...] = ()) -> dict[str, Any]:
    """The POST /containers/create body that recreates the recorded container.

    ``publish`` ("[ip:]hostport:containerport[/proto]", as for ``docker run -p``) replaces
    the recorded port bindings.
    """
    src = config.get("Config") or {}
    host = config.get("HostConfig") or {}
    body = {k: src[k] for k in _CONFIG_KEYS if src.get(k) is not None}
    body["HostConfig"] = {k: host[k] for k in _HOST_CONFIG_KEYS if host.get(k) is not None}
    if publish:
        exposed, bindings = _port_bindings(publish)
        body["ExposedPorts"] = {**(body.get("ExposedPorts") or {}), **exposed}
        body["HostConfig"]["PortBindings"] = bindings
    return body


def _port_bindings(specs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """ExposedPorts and PortBindings for ``docker run -p`` style specs."""
    raw: dict[str, list[Any]] = {}
    for spec in specs:
        try:
            internal, external = split_port(spec)
        except ValueError as e:
            raise OptionError(f"bad port mapping {spec!r}: {e}",
                              hint="use [ip:]hostport:containerport[/tcp|udp]") from None
        for i, port in enumerate(internal):
            key = port if "/" in port else f"{port}/tcp"
            raw.setdefault(key, []).append(external[i] if external else None)
    bindings: dict[str, Any] = convert_port_bindings(raw)
    return {key: {} for key in raw}, bindings


def _has_children(path: str, changes: list[dict[str, Any]]) -> bool:
    prefix = path.rstrip("/") + "/"
    return any(c["Path"].startswith(prefix) for c in changes)


def _upper_dir(data: dict[str, Any]) -> Path | None:
    """The writable overlay2 layer of a container, when it is on this host."""
    driver = data.get("GraphDriver") or {}
    upper = (driver.get("Data") or {}).get("UpperDir")
    if driver.get("Name") != "overlay2" or not upper or not Path(upper).is_dir():
        return None
    return Path(upper)


def _oci_spec(data: dict[str, Any]) -> bytes | None:
    """The OCI config.json containerd ran the container with, if it is readable here.

    containerd's shim (the init process's parent) runs in the task's bundle directory.
    """
    pid = (data.get("State") or {}).get("Pid")
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        if b"containerd-shim" not in os.path.basename(cmdline[0]) \
                or data["Id"].encode() not in cmdline:
            return None
        bundle = Path(os.readlink(f"/proc/{ppid}/cwd"))
        return (bundle / "config.json").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
