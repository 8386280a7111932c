"""ctrmig: checkpoint running containers with CRIU and move them.

>>> import ctrmig
>>> m = ctrmig.migrator("podman")
>>> archive = m.checkpoint("web", "web.ckpt.tar")
>>> m.restore("web.ckpt.tar", name="web2")
'web2'
>>> ctrmig.inspect("web.ckpt.tar").container.name
'web'
"""

from __future__ import annotations

import os
from pathlib import Path

from ctrmig import errors
from ctrmig.archive import Archive, ContainerRecord, FileEntry, Manifest
from ctrmig.archive import read_manifest as _read_manifest
from ctrmig.archive import verify as _verify
from ctrmig.errors import CtrmigError
from ctrmig.migrate import MigrationReport, migrate, recover
from ctrmig.preflight import PreflightReport, preflight
from ctrmig.protocol import CheckpointOptions, ContainerInfo, Migrator, RestoreOptions
from ctrmig.registry import engine_names, migrator, register

__version__ = "0.1.0"


def inspect(archive: str | os.PathLike[str]) -> Manifest:
    """Read an archive's manifest; needs no engine and does not verify checksums."""
    return _read_manifest(Path(os.fspath(archive)))


def verify(archive: str | os.PathLike[str]) -> Manifest:
    """Read the whole archive and check every file against the manifest's sha256."""
    return _verify(Path(os.fspath(archive)))


__all__ = [
    "Archive",
    "CheckpointOptions",
    "ContainerInfo",
    "ContainerRecord",
    "CtrmigError",
    "FileEntry",
    "Manifest",
    "MigrationReport",
    "Migrator",
    "PreflightReport",
    "RestoreOptions",
    "__version__",
    "engine_names",
    "errors",
    "inspect",
    "migrate",
    "migrator",
    "preflight",
    "recover",
    "register",
    "verify",
]
