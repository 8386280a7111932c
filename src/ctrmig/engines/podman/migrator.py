"""Podman adapter: podman's checkpoint/restore REST API through podman-py's API client.

podman-py has no checkpoint methods, so the libpod endpoints are called through its
APIClient. The archive podman exports is streamed straight into ctrmig's writer (every
member hashed on the way) and the archive ctrmig restores is streamed to podman's import,
so neither is held in memory. Podman's own layout is kept as is, so a ctrmig archive from
podman also restores with plain ``podman container restore --import``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar

import requests
import tenacity
from podman import PodmanClient
from podman.errors import APIError

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, foreign
from ctrmig.archive.reader import decompressed
from ctrmig.archive.streams import CHUNK, Progress, pieces
from ctrmig.engines.base import BaseMigrator, Dump
from ctrmig.engines.podman import bundle, volumes
from ctrmig.engines.podman import foreign as podman_foreign
from ctrmig.engines.podman.bundle import Storage
from ctrmig.errors import (
    CheckpointError,
    EngineError,
    NameInUseError,
    RestoreError,
)
from ctrmig.host import http, proc
from ctrmig.host.files import open_private
from ctrmig.host.ssh import SocketTunnel
from ctrmig.options import CheckpointOptions, RestoreOptions, podman_params
from ctrmig.protocol import ArchiveSource, ContainerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

RESPONSE_BUFFER = 4 * CHUNK
START_HINT = (
    "start podman's API service: `ctrmig service start podman` "
    f"(or `podman system service --time=0 {settings.DEFAULT_PODMAN_URL} &`)"
)


class PodmanMigrator(BaseMigrator):
    """Checkpoint and restore podman containers through podman's REST API."""

    engine: ClassVar[str] = "podman"
    imports_from: ClassVar[frozenset[str]] = frozenset({"runc", "docker"})
    needs_extracted: ClassVar[bool] = False  # podman imports the archive file itself
    commits_in_restore: ClassVar[bool] = True  # before the upload's last piece
    checkpoint_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "keep", "ignore_rootfs", "ignore_volumes",
         "print_stats"}
    )
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "keep", "ignore_rootfs", "ignore_volumes",
         "print_stats", "publish_ports", "allow_privileged"}
    )

    #: Tries of an idempotent call (GET, DELETE) that failed transiently (5xx, dropped
    #: connection), and the wait between them. Checkpoint and restore POSTs are never
    #: retried: a call that failed half-way may have stopped or created a container.
    retry_attempts: ClassVar[int] = http.RETRY_ATTEMPTS
    #: Seconds an upload (an archive to import, an image to load) may stall before the
    #: link counts as broken. The whole call may take ``timeout``: podman answers only
    #: once the restore is done. Without this, a link that dies without a reset held the
    #: migration (and the stopped source) for the full ``timeout``.
    send_timeout: ClassVar[float] = 60.0
    retry_wait: ClassVar[tenacity.wait.wait_base] = http.RETRY_WAIT

    def __init__(self, url: str | None = None, *, ssh_options: Sequence[str] | None = None,
                 direct: bool = True, **kwargs: Any):
        """``url``: ``unix://``, ``tcp://``, or ``ssh://[user@]host[:port][/socket]`` (the
        remote socket, default podman's rootful one, forwarded through ssh as podman-remote
        does; ``ssh_options`` are added to ssh's flags). ``direct``: where podman's storage
        is on this host (a unix:// socket), read checkpoints from it and restore into it
        directly instead of through export and import (see :mod:`.direct`); False: always
        podman's export and import."""
        super().__init__(**kwargs)
        self.url = url or settings.current().podman_url
        self._tunnel: SocketTunnel | None = None
        api_url = self.url
        if self.url.startswith("ssh://"):
            opts = settings.current().ssh_options if ssh_options is None else ssh_options
            self._tunnel = SocketTunnel(self.url, default_socket=str(
                settings.DEFAULT_PODMAN_SOCKET), ssh_options=opts)
            api_url = self._tunnel.url
        self.client = PodmanClient(base_url=api_url, timeout=self.timeout)
        # Only a podman on a local socket keeps its storage on this host.
        self.direct = direct and self.url.startswith("unix://")
        self._store: Storage | None = None
        self._store_known = False

    def _storage(self) -> Storage | None:
        """podman's storage when ctrmig can use it here (direct routes), else None."""
        if self.direct and not self._store_known:
            try:
                info = self.info()
            except EngineError:
                return None  # the import route then says so, after verifying the archive
            store = Storage.of(info)
            self._store = store if store is not None and store.local else None
            self._store_known = True
        return self._store if self.direct else None

    # --- one place for every API call ---------------------------------------------------------

    def _api(self, what: str, *,
             error: type[EngineError] = EngineError) -> contextlib.AbstractContextManager[None]:
        """Translate podman-py/requests failures of ``what`` into ctrmig errors."""
        return http.api_errors("podman", what, start_hint=START_HINT,
                               catch=(APIError, requests.RequestException), error=error)

    def _idempotent(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call``, an idempotent API call (a GET or DELETE) that raises podman-py's
        errors, retrying transient failures a bounded number of times; translate the rest."""
        with self._api(what):
            return http.idempotent("podman", what, call, attempts=self.retry_attempts,
                                   wait=self.retry_wait)

    def _get(self, path: str, what: str, **params: Any) -> Any:
        def call() -> Any:
            resp = self.client.api.get(path, params=params or None, timeout=60)
            resp.raise_for_status()
            return resp.json()

        return self._idempotent(what, call)

    # --- protocol ------------------------------------------------------------------------------

    @property
    def lock_scope(self) -> str:
        """This instance of podman: the API address."""
        return self.url

    def version(self) -> str:
        return str(self._get("/version", "podman version").get("Version", ""))

    def info(self) -> dict[str, Any]:
        """podman's ``/info`` (host, runtime, storage)."""
        info: dict[str, Any] = self._get("/info", "podman info")
        return info

    def list(self) -> list[ContainerInfo]:
        rows = self._get("/containers/json", "podman list", all=True)
        return [
            ContainerInfo(self.engine, (r.get("Names") or [r["Id"][:12]])[0], r["Id"],
                          r.get("Image", ""), r.get("State", ""))
            for r in rows
        ]

    def exists(self, container: str) -> bool:
        def call() -> bool:
            resp = self.client.api.get(f"/containers/{container}/exists", timeout=60)
            if resp.status_code == 404:
                return False
            resp.raise_for_status()
            return True

        return self._idempotent("podman exists", call)

    def remove(self, container: str) -> None:
        def call() -> None:
            resp = self.client.api.delete(
                f"/containers/{container}", params={"force": True, "v": True}, timeout=120
            )
            if resp.status_code != 404:  # gone already (also: a retry after it went)
                resp.raise_for_status()

        self._idempotent(f"podman rm {container}", call)

    def logs(self, container: str) -> str:
        def call() -> str:
            resp = self.client.api.get(
                f"/containers/{container}/logs", params={"stdout": True, "stderr": True},
                timeout=60,
            )
            resp.raise_for_status()
            return _demux_logs(resp.content)

        return self._idempotent(f"podman logs {container}", call)

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    # --- hooks -----------------------------------------------------------------------------------

    def _has_image(self, ref: str) -> bool:
        def call() -> bool:
            resp = self.client.api.get(f"/images/{ref}/exists", timeout=60)
            if resp.status_code >= 500:
                resp.raise_for_status()  # a daemon error is not "no such image"
            return bool(resp.status_code == 204)

        return self._idempotent(f"podman image exists {ref}", call)

    def _export_image(self, ref: str, dest: Path) -> str:
        with self._api(f"podman image save {ref}", error=CheckpointError):
            resp = self.client.api.get(
                f"/images/{ref}/get", params={"format": "oci-archive"}, stream=True,
                timeout=self.timeout,
            )
            resp.raise_for_status()
            with open_private(dest) as f:
                for chunk in resp.iter_content(1 << 20):
                    f.write(chunk)
        return "oci-archive"

    def _load_image(self, path: Path, fmt: str) -> None:
        with self._api("podman image load", error=RestoreError), path.open("rb") as body:
            resp = self.client.api.post(
                "/images/load", data=body, headers={"Content-Type": "application/x-tar"},
                timeout=(self.send_timeout, self.timeout),
            )
            resp.raise_for_status()

    def _describe(self, container: str) -> ContainerRecord:
        data = self._get(f"/containers/{container}/json", f"podman inspect {container}")
        if not data.get("State", {}).get("Running"):
            raise CheckpointError(
                f"podman container {container!r} is not running (state: "
                f"{data.get('State', {}).get('Status', '?')})",
                hint="only a running container can be checkpointed",
            )
        config = data.get("Config") or {}
        return ContainerRecord(
            name=data.get("Name", container).lstrip("/"),
            id=data.get("Id", ""),
            image=data.get("ImageName", "") or config.get("Image", ""),
            image_id=data.get("Image", ""),
            command=list(config.get("Entrypoint") or []) + list(config.get("Cmd") or []),
        )

    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        params = {
            **podman_params(opts),
            "export": True,
            # Keep podman's checkpoint images until we are done: if writing the archive
            # fails, the container can still be restored in place (see rollback).
            "keep": True,
        }
        what = f"podman checkpoint {record.name}"
        store = self._storage()
        data = self._get(f"/containers/{record.id}/json", f"podman inspect {record.name}")
        paths = store.paths(data) if store is not None else None
        since = time.time()
        with self._api(what, error=CheckpointError):
            resp = self.client.api.post(
                f"/containers/{record.id}/checkpoint", params=params, stream=True,
                timeout=self.timeout,
            )
            resp.raise_for_status()
        # podman answers once its export is written: its files are in the bundle now.
        ready = self._bundle_ready(record, opts, data, paths, since)

        def write(writer: ArchiveWriter) -> dict[str, Any]:
            if ready is not None:
                resp.close()  # the export's body is not needed: podman drops its temp file
                bundle.write_bundle(writer, ready)
                return {"podman_url": self.url, "podman_paths": paths}
            with self._api(what, error=CheckpointError):
                # A big buffer: tarfile reads in small pieces, and each read of the raw
                # HTTP response is costly (1 GiB: 28 s unbuffered, 15 s buffered, measured).
                body = io.BufferedReader(resp.raw, RESPONSE_BUFFER)
                writer.copy_tar(decompressed(body)[0])
            return {"podman_url": self.url}

        def rollback() -> None:
            resp.close()
            if not opts.leave_running:
                self.resume(record.id)

        return Dump(write=write, rollback=rollback, commit=resp.close)

    def _bundle_ready(self, record: ContainerRecord, opts: CheckpointOptions,
                      data: dict[str, Any], paths: dict[str, str] | None,
                      since: float) -> Path | None:
        """The container's bundle, if it holds all that podman's export carried."""
        if paths is None:
            return None
        where = Path(paths["static_dir"])

        def changes() -> list[dict[str, Any]]:
            return list(self._get(f"/containers/{record.id}/changes", "podman diff") or [])

        why = bundle.missing(where, data, ignore_volumes=opts.ignore_volumes,
                             changes=None if opts.ignore_rootfs else changes, since=since)
        if why:
            log.info("%s: reading podman's export instead of its bundle (%s)", record.name, why)
            return None
        return where

    def resume(self, container: str) -> None:
        """Restore a checkpointed container in place from the images podman kept."""
        with self._api(f"podman restore {container} (in place)", error=CheckpointError):
            resp = self.client.api.post(
                f"/containers/{container}/restore", params={"keep": True}, timeout=self.timeout
            )
            resp.raise_for_status()

    def restore(self, archive: ArchiveSource, options: RestoreOptions | None = None, *,
                progress: Progress | None = None, **overrides: object) -> str:
        """Restore an archive; into a podman on this host (a unix socket, its storage
        writable here), without podman's import (see :mod:`.direct`)."""
        # Only through a local socket: a podman reached over TCP is another host's, even
        # where its storage path happens to exist here too.
        store = self._storage() if self.url.startswith("unix://") else None
        if store is None:
            return super().restore(archive, options, progress=progress, **overrides)
        # Imported here: the direct target is a PodmanMigrator itself.
        from ctrmig.engines.podman.direct import DirectTarget

        with DirectTarget(self, store) as target:
            return target.restore(archive, options, progress=progress, **overrides)

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)
        volumes.check(manifest, opts, self._volume)

    def _volume(self, name: str) -> dict[str, Any] | None:
        """podman's record of volume ``name``; None if there is none."""
        def call() -> dict[str, Any] | None:
            resp = self.client.api.get(f"/volumes/{name}/json", timeout=60)
            if resp.status_code == 404:
                return None
            resp.raise_for_status()
            found: dict[str, Any] = resp.json()
            return found

        return self._idempotent(f"podman volume inspect {name}", call)

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        with foreign.podman_import_file(source, manifest, self.workdir) as path, \
                path.open("rb") as body:
            return self._import(body, opts)

    _check_foreign = staticmethod(podman_foreign.check)  # another engine's archive
    _restore_foreign = podman_foreign.restore

    def _import(self, body: BinaryIO, opts: RestoreOptions) -> str:
        """podman's import of the archive read from ``body``; returns the name."""
        assert opts.name is not None
        name = opts.name
        params = {**podman_params(opts), "import": True, "name": name}
        what = f"podman restore {name}"
        try:
            with self._api(what, error=RestoreError):
                resp = self.client.api.post(
                    "/containers/import/restore", params=params,
                    # In CHUNK pieces (sent chunked): requests sends a file object in 8 KiB
                    # writes, which made importing 1 GiB ~5 s slower (measured). With the
                    # last piece, podman finishes the restore even if ctrmig dies before
                    # the answer (seen: the container ran 0.4 s later): commit before it.
                    data=pieces(body, before_last=opts.commit),  # type: ignore[arg-type]
                    headers={"Content-Type": "application/x-tar"},
                    timeout=(self.send_timeout, self.timeout),  # (connect+send, answer)
                )
                resp.raise_for_status()
        except NameInUseError:
            raise
        except BaseException:
            self._clean_failed_restore(name)
            raise
        return name

    def _clean_failed_restore(self, name: str) -> None:
        """Remove what a failed import left: the container, or its storage-only name."""
        with contextlib.suppress(EngineError):
            self.remove(name)
        if self.url.startswith("unix://") and os.path.exists(self.url[len("unix://"):]):
            # A failed import can hold the name in container storage only; the API has no
            # call for that, the local CLI has.
            proc.run(["podman", "rm", "--storage", name], timeout=60, check=False)


def _demux_logs(data: bytes) -> str:
    """Podman's logs endpoint multiplexes streams with 8-byte frame headers."""
    out, i = bytearray(), 0
    while i + 8 <= len(data) and data[i] in (0, 1, 2) and data[i + 1:i + 4] == b"\0\0\0":
        size = int.from_bytes(data[i + 4:i + 8], "big")
        out += data[i + 8:i + 8 + size]
        i += 8 + size
    if i == 0:
        return data.decode(errors="replace")
    return out.decode(errors="replace")
