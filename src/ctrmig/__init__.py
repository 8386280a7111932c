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
from collections.abc import Sequence
from pathlib import Path

from ctrmig import errors
from ctrmig.archive import Archive, ContainerRecord, FileEntry, Manifest
from ctrmig.archive import read_manifest as _read_manifest
from ctrmig.archive import verify as _verify
from ctrmig.errors import CtrmigError
from ctrmig.migrate import MigrationReport, migrate
from ctrmig.preflight import PreflightReport, preflight
from ctrmig.protocol import CheckpointOptions, ContainerInfo, Migrator, RestoreOptions
from ctrmig.recovery import recover
from ctrmig.registry import engine_names, migrator, register

__version__ = "0.1.0"


def inspect(archive: str | os.PathLike[str], *,
            identities: Sequence[str | os.PathLike[str]] = ()) -> Manifest:
    """Read an archive's manifest; needs no engine and does not verify checksums.
    An encrypted archive is decrypted on the fly with ``identities`` (age or ssh keys)."""
    return _read_manifest(Path(os.fspath(archive)), identities=_paths(identities))


def verify(archive: str | os.PathLike[str], *,
           identities: Sequence[str | os.PathLike[str]] = (),
           trusted_keys: str | os.PathLike[str] | None = None) -> Manifest:
    """Read the whole archive and check every file against the manifest's sha256; with
    ``trusted_keys`` (an allowed_signers or authorized_keys file), also that one of those
    keys signed the manifest (:class:`~ctrmig.errors.SignatureError` if not)."""
    return _verify(Path(os.fspath(archive)), identities=_paths(identities),
                   trusted_keys=None if trusted_keys is None else Path(trusted_keys))


def _paths(names: Sequence[str | os.PathLike[str]]) -> list[Path]:
    return [Path(os.fspath(n)) for n in names]


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
