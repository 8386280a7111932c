"""Mount bookkeeping: which mounts exist, and undoing those an engine left below a dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ctrmig.host import proc


def mount_points() -> list[Path]:
    """Every mount point of our mount namespace (mountinfo's octal escapes undone)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [Path(unescape(fields[4])) for fields in (ln.split() for ln in lines)
            if len(fields) > 4]


def is_mounted(path: Path) -> bool:
    """Whether ``path`` itself is a mount point."""
    return Path(os.path.abspath(path)) in mount_points()


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    root = Path(os.path.realpath(path))
    found = {mp for mp in mount_points() if mp == root or root in mp.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> None:
    """Unmount everything at or below ``path`` (lazily if busy), deepest first."""
    for mountpoint in mounts_under(path):
        res = proc.run(["umount", str(mountpoint)], timeout=60, check=False)
        if res.returncode != 0:
            proc.run(["umount", "-l", str(mountpoint)], timeout=60, check=False)


def unescape(s: str) -> str:
    """A mountinfo field as the path it names (its octal escapes, e.g. \\040, undone)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
