"""The benchmark's workload: memhog (bench/memhog.c), built statically, in a tiny image.

memhog fills N MiB with a pattern derived from each page's index and a seed and keeps
re-verifying it, printing ``ok round=K mib=N pass=P gap_ms=G`` lines (or ``CORRUPT``).
The image ``localhost/ctrmig-memhog:latest`` is busybox + /memhog, built offline.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ctrmig.host import images, proc

SOURCE = Path(__file__).with_name("memhog.c")
IMAGE = "localhost/ctrmig-memhog:latest"
BINARY_IN_IMAGE = "/memhog"

_OK = re.compile(r"^ok round=(\d+) mib=(\d+) pass=(\d+) gap_ms=(\d+)", re.MULTILINE)


def build_memhog(out: Path) -> Path:
    """Compile memhog statically (gcc + libc6-dev's libc.a) into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(SOURCE)],
             timeout=120, what="gcc memhog")
    return out


def command(mib: int, seed: int = 7) -> list[str]:
    return [BINARY_IN_IMAGE, str(mib), str(seed)]


def ensure_image(workdir: Path, ref: str = IMAGE, *, rebuild: bool = False) -> str:
    """Build the memhog image into podman's default storage unless it is there already."""
    if images.podman_has_image(ref) and not rebuild:
        return ref
    tmp = Path(tempfile.mkdtemp(prefix="memhog-image-", dir=workdir))
    try:
        root = images.busybox_rootfs(tmp / "rootfs")
        build_memhog(root / BINARY_IN_IMAGE.lstrip("/"))
        tarball = images.rootfs_tarball(root, tmp / "rootfs.tar")
        images.podman_import(tarball, ref, cmd=command(64))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


@dataclass(frozen=True)
class Health:
    """What memhog's output says about its memory."""

    rounds: int  # "ok" lines seen
    last_round: int
    last_pass: int
    corrupt: bool
    max_gap_ms: int  # the longest wall-clock gap between rounds memhog saw
    filled: bool

    @property
    def intact(self) -> bool:
        return self.filled and not self.corrupt and self.rounds > 0


def health(log_text: str) -> Health:
    oks = _OK.findall(log_text)
    return Health(
        rounds=len(oks),
        last_round=int(oks[-1][0]) if oks else 0,
        last_pass=int(oks[-1][2]) if oks else 0,
        corrupt="CORRUPT" in log_text,
        max_gap_ms=max((int(o[3]) for o in oks), default=0),
        filled="filled mib=" in log_text,
    )


def gap_after(log_text: str, round_before: int) -> int:
    """The longest gap memhog reported in rounds after ``round_before`` (the freeze)."""
    return max((int(o[3]) for o in _OK.findall(log_text) if int(o[0]) > round_before),
               default=0)
