"""Mount bookkeeping: find and undo the mounts an engine left below a directory."""

from __future__ import annotations

import os
from pathlib import Path

from ctrmig.host import proc


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == root or mountpoint.startswith(root + "/"):
                found.append(Path(mountpoint))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> None:
    """Unmount everything at or below ``path`` (lazily if busy), deepest first."""
    for mountpoint in mounts_under(path):
        res = proc.run(["umount", str(mountpoint)], timeout=60, check=False)
        if res.returncode != 0:
            proc.run(["umount", "-l", str(mountpoint)], timeout=60, check=False)
