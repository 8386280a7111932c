"""The one protocol every engine adapter implements, and its option types."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from ctrmig.archive import Archive, Compression
from ctrmig.archive.streams import Progress
from ctrmig.archive.writer import check_compression
from ctrmig.errors import OptionError

ArchivePath = str | os.PathLike[str]
ArchiveSource = ArchivePath | BinaryIO


@dataclass(frozen=True)
class ContainerInfo:
    """One container (or process) an engine can checkpoint."""

    engine: str
    name: str
    id: str
    image: str = ""
    state: str = ""


@dataclass(frozen=True)
class CheckpointOptions:
    """What to checkpoint and how; engines refuse options they cannot honour."""

    leave_running: bool = False
    tcp_established: bool = False
    file_locks: bool = False
    keep: bool = False
    ignore_rootfs: bool = False
    ignore_volumes: bool = False
    pre_checkpoint: bool = False
    print_stats: bool = False
    include_image: bool = False
    compression: Compression = "zstd"

    def __post_init__(self) -> None:
        check_compression(self.compression)

    def set_options(self) -> set[str]:
        """Names of the boolean options switched on."""
        return _switched_on(self)


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore; ``name`` None keeps the engine's choice (usually a fresh name)."""

    name: str | None = None
    tcp_established: bool = False
    file_locks: bool = False
    keep: bool = False
    ignore_rootfs: bool = False
    ignore_volumes: bool = False
    print_stats: bool = False
    lazy_pages: bool = False
    allow_privileged: bool = False
    publish_ports: tuple[str, ...] = field(default_factory=tuple)
    #: Called right before the target can finish the restore without the caller (the
    #: archive's last bytes leave for an engine that restores on its own, or the engine's
    #: final call is made), with the PIDs of local helper processes that may still carry
    #: it on (an ssh session). :func:`ctrmig.migrate` journals it for :func:`ctrmig.recover`.
    on_commit: Callable[[Sequence[int]], None] | None = field(
        default=None, compare=False, repr=False)

    def set_options(self) -> set[str]:
        """Names of the options switched on (publish_ports counts when given)."""
        names = _switched_on(self)
        if self.publish_ports:
            names.add("publish_ports")
        return names

    def commit(self, helpers: Sequence[int] = ()) -> None:
        """Report the point of no return to ``on_commit``, if anyone asked."""
        if self.on_commit is not None:
            self.on_commit(list(helpers))


def _switched_on(options: Any) -> set[str]:
    return {f.name for f in fields(options) if getattr(options, f.name) is True}


def build_options(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    """Build ``cls`` from keyword arguments, turning unknown names into OptionError."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise OptionError(
            f"unknown option(s): {', '.join(unknown)}", hint=f"valid: {', '.join(sorted(known))}"
        )
    if "publish_ports" in kwargs:
        kwargs = {**kwargs, "publish_ports": tuple(kwargs["publish_ports"] or ())}
    return cls(**kwargs)


@runtime_checkable
class Migrator(Protocol):
    """Checkpoint containers of one engine into ctrmig archives, and restore them."""

    engine: str

    def version(self) -> str:
        """The engine's version (e.g. podman's server version)."""
        ...

    def list(self) -> list[ContainerInfo]:
        """Containers this engine holds (running or not)."""
        ...

    def exists(self, container: str) -> bool:
        """Whether a container by that name or id exists."""
        ...

    def remove(self, container: str) -> None:
        """Remove a container (stopping it first); no error if it is already gone."""
        ...

    def logs(self, container: str) -> str:
        """The container's output so far (stdout and stderr)."""
        ...

    def resume(self, container: str) -> None:
        """Run again a container that a checkpoint (not left running) stopped, from the
        checkpoint the engine kept: the rollback of a failed migration."""
        ...

    def checkpoint(
        self,
        container: str,
        archive: ArchivePath | BinaryIO,
        *,
        leave_running: bool = False,
        compression: Compression = "zstd",
        progress: Progress | None = None,
        **options: Any,
    ) -> Archive:
        """Checkpoint ``container`` into ``archive`` (a path, or a binary stream).

        ``options`` are the other fields of :class:`CheckpointOptions`.
        """
        ...

    def restore(
        self,
        archive: ArchiveSource,
        *,
        name: str | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> str:
        """Restore the archive into a running container; return its name.

        The archive's checksums are verified before the engine is touched. ``options``
        are the other fields of :class:`RestoreOptions`.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def as_path(archive: ArchivePath) -> Path:
    return Path(os.fspath(archive))
