"""podman's checkpoint files, read and placed directly where ctrmig shares podman's storage.

podman 4.3's API moves a checkpoint only as an export (podman tars the container's bundle
into a temp file, then serves it over HTTP in 32 KiB pieces: ~4-5 s of a 1 GiB migration)
and an import (podman saves the upload to a temp file, then untars it into the new
container's bundle). Where ctrmig runs as root beside podman's storage, it skips both:

- out: podman checkpoints with export and keep. The export leaves every file of its
  archive in the container's bundle (``userdata/``), so ctrmig reads them from there,
  hashing (and compressing) as it writes its own archive, and never reads the HTTP body.
- in: the archive is extracted (every member hashed as it lands, checked against the
  manifest before anything runs) next to podman's storage. podman creates the container
  from config.dump and spec.dump alone: an import of just those two, which creates the
  container and then refuses to restore it for lack of CRIU images (:data:`.bundle.CREATED_ONLY`;
  no other call of podman 4.3's API creates a container from a recorded config). The
  verified files are renamed into the new bundle, the bundle's runtime spec is the
  source's with the new container's paths, and podman's own local restore runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

from ctrmig.archive import ArchiveWriter, Manifest, foreign, privileges
from ctrmig.archive.layout import CONFIG_DUMP
from ctrmig.archive.streams import CHUNK
from ctrmig.engines.podman import bundle
from ctrmig.engines.podman.bundle import RUNTIME_SPEC, Storage
from ctrmig.engines.podman.migrator import PodmanMigrator
from ctrmig.errors import ArchiveError, NameInUseError, RestoreError
from ctrmig.options import RestoreOptions, podman_params

log = logging.getLogger(__name__)


class DirectTarget(PodmanMigrator):
    """A restore into podman's storage on this host, without podman's import: the archive
    is extracted and verified beside the storage (one pass), podman creates the container
    from its config, the verified files are renamed into its bundle, podman restores it
    in place (see :mod:`.direct`)."""

    needs_extracted: ClassVar[bool] = True

    def __init__(self, parent: PodmanMigrator, store: Storage):
        super().__init__(parent.url, direct=False, workdir=store.incoming,
                         timeout=parent.timeout)
        self.store = store

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)
        spec = source / RUNTIME_SPEC
        if spec.is_file():  # what runs is this spec: judged like spec.dump
            try:
                runtime = json.loads(spec.read_bytes())
                config = json.loads((source / CONFIG_DUMP).read_bytes())
            except (OSError, ValueError) as e:
                raise ArchiveError(f"{RUNTIME_SPEC} or {CONFIG_DUMP} is unreadable: {e}") from None
            if not isinstance(runtime, dict):
                raise ArchiveError(f"{RUNTIME_SPEC} is not an OCI runtime spec")
            privileges.check(privileges.requests(runtime, config), opts.allow_privileged)

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        assert opts.name is not None
        name, old = opts.name, manifest.extra.get("podman_paths")
        if not isinstance(old, dict) or not (source / RUNTIME_SPEC).is_file():
            foreign.podman_dialect(source, manifest)  # CRI-O's config.dump, as libpod's
            return self._import_dir(source, opts)  # podman's own export: podman imports it
        data = self._create(source, opts)
        try:
            new = self.store.paths(data)
            if new is None:  # the storage is not this host's after all
                log.info("%s: podman's new bundle is not here; importing instead", name)
                self._clean_failed_restore(name)
                return self._import_dir(source, opts)
            spec = bundle.runtime_spec((source / RUNTIME_SPEC).read_bytes(), old, new)
            bundle.place(source, Path(new["static_dir"]), spec)
            params = {k: v for k, v in podman_params(opts).items() if k not in ("name", "import")}
            opts.commit()  # podman finishes a restore it was asked for, whatever happens to us
            with self._api(f"podman restore {name} (in place)", error=RestoreError):
                resp = self.client.api.post(f"/containers/{data['Id']}/restore", params=params,
                                            timeout=self.timeout)
                resp.raise_for_status()
        except BaseException:
            self._clean_failed_restore(name)
            raise
        return name

    def _create(self, source: Path, opts: RestoreOptions) -> dict[str, Any]:
        """Have podman create the container from the archive's config.dump and spec.dump
        (an import of only those, which podman refuses to restore); return its inspect."""
        assert opts.name is not None
        what = f"podman create {opts.name} (from config.dump)"
        params = {**podman_params(opts), "import": True, "name": opts.name}
        try:
            with self._api(what, error=RestoreError):
                resp = self.client.api.post(
                    "/containers/import/restore", params=params, data=bundle.config_tar(source),
                    headers={"Content-Type": "application/x-tar"},
                    timeout=(self.send_timeout, self.timeout))
                if resp.status_code < 400:
                    raise RestoreError(f"{what}: podman restored a container without images")
                # podman refuses to restore it (no CRIU images: bundle.CREATED_ONLY) but has
                # created it: decided by that state, not by the refusal's wording.
                if not self.exists(opts.name):
                    resp.raise_for_status()
            data: dict[str, Any] = self._get(f"/containers/{opts.name}/json", what)
        except NameInUseError:
            raise
        except BaseException:
            self._clean_failed_restore(opts.name)
            raise
        return data

    def _import_dir(self, source: Path, opts: RestoreOptions) -> str:
        """podman's import of the extracted archive ``source``, re-packed on the way."""
        read_fd, write_fd = os.pipe()

        def pack() -> None:
            with contextlib.suppress(OSError), os.fdopen(write_fd, "wb", CHUNK) as out:
                writer = ArchiveWriter(out)
                writer.add_tree(source)
                writer.close()

        packer = threading.Thread(target=pack, name="ctrmig-pack", daemon=True)
        packer.start()
        try:
            with os.fdopen(read_fd, "rb", CHUNK) as body:
                return self._import(body, opts)
        finally:
            packer.join()
