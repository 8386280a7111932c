"""Named volumes of an archive that a podman host already has.

podman's import creates each named volume the archive carries (``volumes/<name>.tar``)
and refuses the whole restore when one of that name exists, whatever its content (seen
with podman 4.3 and 5.4): it neither reuses nor overwrites it. ctrmig says so before
podman is asked anything, naming the volume and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ctrmig.archive import Manifest
from ctrmig.archive.layout import VOLUMES_DIR
from ctrmig.errors import VolumeConflictError
from ctrmig.options import RestoreOptions

#: podman's rule for volume names; a member named otherwise is podman's import's to refuse.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def carried(manifest: Manifest) -> list[str]:
    """The names of the volumes whose content the archive carries."""
    prefix, suffix = f"{VOLUMES_DIR}/", ".tar"
    names = (n[len(prefix):-len(suffix)] for n in manifest.files
             if n.startswith(prefix) and n.endswith(suffix))
    return sorted(n for n in names if _NAME.fullmatch(n))


def check(manifest: Manifest, opts: RestoreOptions,
          inspect: Callable[[str], dict[str, Any] | None]) -> None:
    """Refuse (VolumeConflictError) an archive carrying a volume that exists here already;
    ``inspect(name)`` is podman's record of volume ``name`` (None: there is none)."""
    if opts.ignore_volumes:
        return
    existing = [name for name in carried(manifest) if inspect(name) is not None]
    if existing:
        names = ", ".join(existing)
        raise VolumeConflictError(
            f"volume(s) {names} exist on this podman host: podman's import neither reuses "
            "nor replaces an existing volume",
            hint=f"remove them (podman volume rm {' '.join(existing)}) to restore the "
                 "archive's content, or restore with --ignore-volumes to use them as they are")
