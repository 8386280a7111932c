"""The one protocol every engine adapter implements, and its option types."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from ctrmig.archive import Archive
from ctrmig.archive.streams import Progress
from ctrmig.options import CheckpointOptions, RestoreOptions

__all__ = ["ArchivePath", "ArchiveSource", "CheckpointOptions", "ContainerInfo", "Migrator",
           "RestoreOptions", "as_path"]

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
        options: CheckpointOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> Archive:
        """Checkpoint ``container`` into ``archive`` (a path, or a binary stream).

        ``overrides`` set fields of ``options`` by name (``leave_running=True``); an
        unknown name or an option the engine cannot honour raises OptionError.
        """
        ...

    def restore(
        self,
        archive: ArchiveSource,
        options: RestoreOptions | None = None,
        *,
        progress: Progress | None = None,
        **overrides: object,
    ) -> str:
        """Restore the archive into a running container; return its name.

        The archive's checksums are verified before the engine is touched. ``overrides``
        set fields of ``options`` by name (``name="web2"``).
        """
        ...

    def has_image(self, ref: str) -> bool | None:
        """Whether the engine holds image ``ref``; None when it cannot tell."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def as_path(archive: ArchivePath) -> Path:
    return Path(os.fspath(archive))
