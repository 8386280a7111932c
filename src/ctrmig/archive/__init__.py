"""The one ctrmig archive format: podman/CRI-O checkpoint layout + manifest.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctrmig.archive.layout import MANIFEST_NAME
from ctrmig.archive.manifest import (
    FORMAT_VERSION,
    ContainerRecord,
    FileEntry,
    Manifest,
)
from ctrmig.archive.reader import Limits, extract, extracted, read_manifest, verify
from ctrmig.archive.writer import COMPRESSIONS, ArchiveWriter, Compression, atomic_output


@dataclass(frozen=True)
class Archive:
    """A checkpoint archive and its manifest; ``path`` is None when written to a stream."""

    path: Path | None
    manifest: Manifest

    @property
    def size(self) -> int:
        """Bytes on disk (compressed), or the members' total for a streamed archive."""
        return self.path.stat().st_size if self.path else self.manifest.total_bytes


__all__ = [
    "COMPRESSIONS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Archive",
    "ArchiveWriter",
    "Compression",
    "ContainerRecord",
    "FileEntry",
    "Limits",
    "Manifest",
    "atomic_output",
    "extract",
    "extracted",
    "read_manifest",
    "verify",
]
