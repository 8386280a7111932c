"""The steps every adapter shares, written once.

:class:`BaseMigrator` implements the public half of the :class:`~ctrmig.protocol.Migrator`
protocol: option checking, the per-container lock, writing the archive atomically with
its manifest, verifying or safely extracting an archive before any engine call, and
refusing archives of another engine or (unless allowed) asking for privileges. An adapter
fills in a few ``_``-prefixed hooks.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, cast

from ctrmig.archive import (
    Archive,
    ArchiveWriter,
    ContainerRecord,
    Manifest,
    atomic_output,
    crypto,
    extracted,
    foreign,
    portable,
    privileges,
)
from ctrmig.archive.layout import image_member
from ctrmig.archive.portable import Portable
from ctrmig.archive.spool import copy_member, spooled
from ctrmig.archive.streams import Progress
from ctrmig.direct import pages
from ctrmig.errors import (
    CheckpointError,
    CtrmigError,
    EngineMismatchError,
    ImageNotFoundError,
    NameInUseError,
    OptionError,
)
from ctrmig.host import criu, images
from ctrmig.locks import container_lock, operations
from ctrmig.options import build, for_engine
from ctrmig.protocol import (
    ArchivePath,
    ArchiveSource,
    CheckpointOptions,
    ContainerInfo,
    RestoreOptions,
    as_path,
)

log = logging.getLogger(__name__)

def _nothing() -> None:
    """A no-op commit: the engine keeps nothing it must release."""


@dataclass
class Dump:
    """A checkpoint an engine took, before its archive is complete.

    An adapter's ``_dump`` returns one once the engine has checkpointed the container
    (stopped it, unless ``leave_running``); a dump that fails inside ``_dump`` itself must
    leave the container running (CRIU resumes it) and raise there. The base then calls
    ``write`` (every archive member but the manifest; returns facts for the manifest's
    ``extra``) and exactly one of ``commit`` (the archive is complete) or ``rollback`` (it
    is not: bring the container back as it was before, and drop what the dump made).
    Rollback after a failed checkpoint happens in :meth:`BaseMigrator._write` only.
    """

    write: Callable[[ArchiveWriter], dict[str, Any]]
    rollback: Callable[[], None]
    commit: Callable[[], None] = _nothing


class BaseMigrator(ABC):
    """Shared implementation of the Migrator protocol; adapters fill in the hooks."""

    engine: ClassVar[str]
    #: True: restore gets a verified, extracted directory. False: the verified archive file.
    needs_extracted: ClassVar[bool] = True
    #: Boolean/list options (beyond leave_running) this engine honours.
    checkpoint_options: ClassVar[frozenset[str]] = frozenset()
    restore_options: ClassVar[frozenset[str]] = frozenset()
    #: True: ``_restore`` calls ``opts.commit()`` itself, right before the engine can
    #: finish without ctrmig (podman: before the upload's last bytes). False: the base
    #: commits just before ``_restore``.
    commits_in_restore: ClassVar[bool] = False
    #: Engines whose archives this one restores by translating them (see
    #: :mod:`ctrmig.archive.portable` and ``_restore_foreign``).
    imports_from: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, workdir: str | os.PathLike[str] | None = None, timeout: float = 900.0):
        self.workdir = Path(workdir) if workdir is not None else None
        self.timeout = timeout

    # --- public API ----------------------------------------------------------------------

    def checkpoint(
        self,
        container: str,
        archive: ArchivePath | BinaryIO,
        options: CheckpointOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> Archive:
        opts = build(CheckpointOptions, options, overrides)
        if opts.pre_checkpoint:
            criu.require_memory_tracking()
        # Unusable keys are refused before the container is stopped for nothing.
        crypto.check_recipients(opts.encrypt_to)
        crypto.check_signing_key(opts.sign)
        self._refuse_unsupported(for_engine(opts), self.checkpoint_options, "checkpoint")
        if opts.include_image and not self.carries_images:
            raise OptionError(f"the {self.engine} engine cannot carry images in archives")
        with self._lock(container, "checkpointing"):
            record = self._describe(container)
            taken: builtins.list[Dump] = []  # the dump, once the engine took it
            path = as_path(archive) if isinstance(archive, (str, os.PathLike)) else None
            try:
                if path is not None:
                    with atomic_output(path) as out:
                        manifest = self._write(record, opts, out, progress, taken)
                else:
                    manifest = self._write(record, opts, cast(BinaryIO, archive), progress,
                                           taken)
            except BaseException as e:
                if taken:
                    self._roll_back(record, taken[0], e)
                raise
            # Only now, with the archive complete (and renamed into place), may the engine
            # drop the container's running state.
            if taken:
                taken[0].commit()
            return Archive(path, manifest)

    def restore(
        self,
        archive: ArchiveSource,
        options: RestoreOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> str:
        opts = build(RestoreOptions, options, overrides)
        if opts.lazy_pages:
            criu.require_lazy_pages()
        # allow_privileged is honoured below, for every engine (privileges.check).
        self._refuse_unsupported(for_engine(opts), self.restore_options, "restore")
        # Verify (or extract) first: a bad archive is refused before any engine call.
        with contextlib.ExitStack() as stack:
            if opts.page_images:  # pre-copy pages left for this restore: merged, or dropped
                stack.callback(pages.remove_directory, opts.page_images)
            if opts.name is not None:
                # Locked from the start: while the archive still arrives, `ctrmig ls` (and so
                # a `ctrmig recover` elsewhere) sees the container as being restored.
                stack.enter_context(self._lock(opts.name, "restoring"))
            # Decrypted on the fly (opts.identity); with opts.trusted_keys the manifest's
            # signature is checked here too: before any engine call.
            keys: dict[str, Any] = {"identities": opts.identity,
                                    "trusted_keys": opts.trusted_keys}
            if self.needs_extracted:
                root, manifest = stack.enter_context(
                    extracted(self._source(archive), workdir=self.workdir, progress=progress,
                              **keys)
                )
            else:
                root, manifest = stack.enter_context(
                    spooled(self._source(archive), workdir=self.workdir, progress=progress,
                            **keys))
            self._check_archive(manifest, root, opts)
            translated = self._translate(manifest, root, opts)
            # The one name policy: the name asked for, else the recorded one; taken -> refused.
            if opts.name is None:
                stack.enter_context(self._lock(manifest.container.name, "restoring"))
                opts = dataclasses.replace(opts, name=manifest.container.name)
            assert opts.name is not None
            self._check_name_free(opts.name, root)
            if translated is None:
                self._ensure_image(manifest, root)  # a foreign one's: _restore_foreign's
            if not self.commits_in_restore:
                opts.commit()
            if translated is not None:
                return self._restore_foreign(root, manifest, translated, opts)
            return self._restore(root, manifest, opts)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def lock_scope(self) -> str:
        """Which instance of the engine this is (an API address, a state dir): two podman
        hosts may both hold a container ``web``, and each gets its own lock."""
        return ""

    def operations(self) -> dict[str, str]:
        """Containers a live ctrmig is checkpointing or restoring here: name -> operation."""
        return operations(self.engine, self.lock_scope)

    def _lock(self, container: str, operation: str) -> contextlib.AbstractContextManager[None]:
        return container_lock(self.engine, container, self.lock_scope, operation)

    def criu_version(self) -> str:
        """The CRIU version the engine uses (the local one unless overridden)."""
        return criu.version()

    def close(self) -> None:
        """Release connections (nothing by default)."""

    def __enter__(self) -> BaseMigrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- hooks for adapters ----------------------------------------------------------------

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def list(self) -> list[ContainerInfo]: ...

    @abstractmethod
    def exists(self, container: str) -> bool: ...

    @abstractmethod
    def remove(self, container: str) -> None: ...

    @abstractmethod
    def logs(self, container: str) -> str: ...

    @abstractmethod
    def _describe(self, container: str) -> ContainerRecord:
        """Look the container up; raise ContainerNotFoundError if there is none."""

    @abstractmethod
    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        """Checkpoint the container; return the :class:`Dump` that writes its archive."""

    @abstractmethod
    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        """Restore from a verified archive; ``source`` is the extracted directory if
        ``needs_extracted``, else the archive file. ``opts.name`` is set, and no container
        holds it (checked). Return the running container's name.
        On failure, leave nothing of the new container behind."""

    def resume(self, container: str) -> None:
        """Run again a container that a checkpoint stopped, from the checkpoint it kept."""
        raise CheckpointError(
            f"the {self.engine} engine cannot resume {container!r} in place",
            hint="restore it from its archive with `ctrmig restore`",
        )

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        """Refuse an archive this engine must not restore: another engine's, or one that
        asks for privileges (declared, or held in its CRIU images) unless allowed.

        Adapters extend this and call it first: the archive is judged before the engine
        is asked anything."""
        foreign.check_restorable(manifest, self.engine, opts.name)
        if not foreign.native(manifest, self.engine) and manifest.engine not in self.imports_from:
            raise EngineMismatchError(
                f"archive was written by {manifest.engine!r}; this is the {self.engine!r} engine",
                hint=f"restore it with --engine {foreign.restore_engine(manifest)}",
            )
        privileges.check(
            privileges.archive_requests(source, manifest, extracted=self.needs_extracted),
            opts.allow_privileged,
        )

    def _translate(self, manifest: Manifest, source: Path, opts: RestoreOptions
                   ) -> Portable | None:
        """None for this engine's own archive; else the foreign archive's neutral
        description, judged: the host paths it binds need allow_privileged, as its
        writer's own restore would judge them (the rest was judged as the writer's
        archive, and CRIU restores the credentials its images hold, judged too), and
        the adapter refuses what it cannot provide."""
        if foreign.native(manifest, self.engine):
            return None
        translated = portable.load(source, manifest, extracted=self.needs_extracted)
        privileges.check(privileges.host_binds(translated), opts.allow_privileged)
        self._check_foreign(translated, opts)
        log.info("restoring a %s archive into %s by translation", manifest.engine, self.engine)
        return translated

    def _check_foreign(self, foreign: Portable, opts: RestoreOptions) -> None:
        """Refuse (UntranslatableError) a foreign archive this engine cannot restore,
        before any engine call. Adapters that import foreign archives override it."""

    def _restore_foreign(self, source: Path, manifest: Manifest, foreign: Portable,
                         opts: RestoreOptions) -> str:
        """Restore another engine's archive from its neutral description ``foreign``:
        the image (present, or carried in whatever format its writer used), a container
        in this engine's dialect, then this engine's own restore. As ``_restore``."""
        raise EngineMismatchError(f"the {self.engine} engine cannot restore "
                                  f"{manifest.engine} archives")

    def _ensure_foreign_image(self, source: Path, manifest: Manifest, foreign: Portable
                              ) -> None:
        """The foreign archive's image, if the engine lacks it, from the archive: skopeo
        re-saves whatever its writer carried (podman's or runc's oci-archive, docker's
        docker-archive) as a docker-archive under the container's image name (runc's is
        tagged by its digest), which podman and docker both load."""
        if self._has_image(foreign.image) is not False:
            return
        carried = carried_image(manifest, foreign.image, self.engine)
        with carried_file(source, str(carried["member"]), extracted=self.needs_extracted,
                          workdir=self.workdir) as path:
            converted = path.with_name("converted.tar")
            self._load_image(images.as_docker_archive(str(carried.get("format")), path,
                                                      foreign.image, converted),
                             "docker-archive")
        log.info("loaded image %s from the %s archive", foreign.image, manifest.engine)

    @property
    def carries_images(self) -> bool:
        """Whether this engine can carry its images in archives (include_image)."""
        return type(self)._export_image is not BaseMigrator._export_image

    def has_image(self, ref: str) -> bool | None:
        """Whether the engine holds image ``ref``; None when it cannot tell."""
        return self._has_image(ref)

    def _has_image(self, ref: str) -> bool | None:
        """Whether the engine holds image ``ref`` (default: None, it cannot tell)."""
        return None

    def _export_image(self, ref: str, dest: Path) -> str:
        """Save image ``ref`` into the file ``dest``; return its format (e.g. oci-archive)."""
        raise OptionError(f"the {self.engine} engine cannot carry images in archives")

    def _load_image(self, path: Path, fmt: str) -> None:
        """Load an image saved by ``_export_image`` into the engine."""
        raise OptionError(f"the {self.engine} engine cannot load images from archives")

    # --- shared steps ----------------------------------------------------------------------

    def _add_image(self, record: ContainerRecord, writer: ArchiveWriter) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="ctrmig-image-", dir=self.workdir) as tmp:
            path = Path(tmp) / "image.tar"
            fmt = self._export_image(record.image or record.image_id, path)
            member = image_member(fmt)
            writer.add_file(member, path)
        return {"member": member, "format": fmt, "ref": record.image}

    def _ensure_image(self, manifest: Manifest, source: Path) -> None:
        """Load the archive's image if the engine lacks it; fail clearly if neither has it."""
        ref = manifest.container.image
        if not ref or self._has_image(ref) is not False:
            return
        carried = carried_image(manifest, ref, self.engine)
        with carried_file(source, str(carried["member"]), extracted=self.needs_extracted,
                          workdir=self.workdir) as path:
            self._load_image(path, str(carried["format"]))
        log.info("loaded image %s from the archive", ref)

    def _write(
        self,
        record: ContainerRecord,
        opts: CheckpointOptions,
        out: BinaryIO,
        progress: Progress | None,
        taken: builtins.list[Dump],
    ) -> Manifest:
        """Write the whole archive; the engine's dump goes into ``taken`` once it exists."""
        with crypto.encrypting(out, opts.encrypt_to) as sink:  # as is, without recipients
            writer = ArchiveWriter(sink, opts.compression, progress, crypto.signer(opts.sign))
            # The image goes first, and the versions are asked, while the container still
            # runs: they add no downtime (`runc --version` was 10-19 ms of it here).
            image = self._add_image(record, writer) if opts.include_image else None
            versions = self.version(), self.criu_version()
            dump = self._dump(record, opts)
            taken.append(dump)
            extra = dump.write(writer)
            if image:
                extra["image_archive"] = image
            return writer.finish(Manifest(
                engine=self.engine,
                container=record,
                engine_version=versions[0],
                criu_version=versions[1],
                options=dataclasses.asdict(opts),
                extra=extra,
            ))

    @staticmethod
    def _roll_back(record: ContainerRecord, dump: Dump, cause: BaseException) -> None:
        """The one rollback of a failed checkpoint; never masks ``cause``."""
        log.warning("checkpoint of %s failed (%s); bringing it back", record.name,
                    cause or type(cause).__name__)
        try:
            dump.rollback()
        except CtrmigError as undo:
            log.error("could not bring %s back after the failed checkpoint: %s "
                      "(retry: ctrmig resume %s)", record.name, undo, record.name)

    def _check_name_free(self, name: str, source: Path | None = None) -> None:
        """Refuse a taken name; ``source`` is the verified archive being restored, if any."""
        if self.exists(name):
            raise NameInUseError(
                f"a {self.engine} container named {name!r} already exists",
                hint="pick another --name or remove that container",
            )

    def _refuse_unsupported(self, wanted: set[str], supported: frozenset[str], verb: str) -> None:
        unsupported = sorted(wanted - supported)
        if unsupported:
            raise OptionError(
                f"the {self.engine} engine cannot {verb} with: {', '.join(unsupported)}",
                hint=f"supported: {', '.join(sorted(supported)) or 'none'}",
            )

    @staticmethod
    def _source(archive: ArchiveSource) -> Path | BinaryIO:
        if isinstance(archive, (str, os.PathLike)):
            return as_path(archive)
        return archive


def listing(m: Any) -> list[ContainerInfo]:
    """``m.list()``, with the state of each container a live ctrmig is checkpointing or
    restoring here replaced by that operation (and a row for one still arriving)."""
    rows = m.list()
    busy = m.operations() if isinstance(m, BaseMigrator) else {}
    shown = [dataclasses.replace(r, state=busy.pop(r.name, r.state)) for r in rows]
    shown += [ContainerInfo(m.engine, name, "", "", op) for name, op in sorted(busy.items())]
    return shown


def carried_image(manifest: Manifest, ref: str, engine: str) -> dict[str, Any]:
    """The manifest's record of the image it carries; ImageNotFoundError if none."""
    carried = manifest.extra.get("image_archive")
    if not isinstance(carried, dict) or carried.get("member") not in manifest.files:
        raise ImageNotFoundError(
            f"image {ref!r} is not on this {engine} host and the archive does not carry it",
            hint="load the image here first, or checkpoint with --include-image",
        )
    return carried


@contextlib.contextmanager
def carried_file(source: Path, member: str, *, extracted: bool,
                 workdir: Path | None) -> Iterator[Path]:
    """Member ``member`` of the verified archive ``source`` as a file, in a private temp
    dir (a copy out of an archive file; an extracted archive's own file is linked there)."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-image-", dir=workdir) as tmp:
        path = Path(tmp) / "image.tar"
        if extracted:
            path.symlink_to(source / member)
        else:
            copy_member(source, member, path)
        yield path
