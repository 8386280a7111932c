"""What the host's CRIU and kernel can do."""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

from ctrmig.errors import CommandError, CtrmigError, FeatureUnavailableError
from ctrmig.host import proc

TIMEOUT = 30.0
#: The log level of the CRIU calls ctrmig makes itself: 2, errors and warnings (what a
#: failure quotes). At 4 lazy-pages logs three lines per fault and the page server one
#: per chunk, which slowed post-copy's faults and pre-copy (bench.profile_runc's notes in
#: docs/benchmarks.md). runc runs its own CRIU at 4, hard-coded (runc 1.1).
LOG_LEVEL = 2


def log_flag() -> str:
    """``-vN`` for :data:`LOG_LEVEL` (read at each call: bench.profile_runc raises it)."""
    return f"-v{LOG_LEVEL}"
#: CRIU prints this on every run on hosts without CAP_SYS_RESOURCE: never the cause.
NOISE = "Can't setup RLIMIT_NOFILE for self"


def error_lines(text: str) -> list[str]:
    """CRIU's error lines in a log or stderr, without the harmless rlimit one."""
    return [ln for ln in text.splitlines() if "Error" in ln and NOISE not in ln]


def first_error(text: str) -> str | None:
    """The message of CRIU's first real error ("Error (file:line): msg"), if any.

    Skips the rlimit noise and the closing "Dumping FAILED." / "Restoring FAILED." lines.
    """
    for line in text.splitlines():
        m = re.search(r"Error \([^)]*\):\s*(.*)", line)
        if m and NOISE not in line and "FAILED" not in line:
            return m.group(1).strip()
    return None


@functools.cache
def version() -> str:
    """CRIU's version, e.g. "4.1.1" ("" when criu is missing)."""
    try:
        text = proc.output(["criu", "--version"], timeout=TIMEOUT)
    except CtrmigError:
        return ""
    m = re.search(r"Version:\s*(\S+)", text)
    return m.group(1) if m else text.splitlines()[0] if text else ""


def version_key(text: str) -> tuple[int, ...]:
    """"4.2.1" -> (4, 2, 1), for comparing CRIU versions (() when there are no numbers)."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(n) for n in m.group(0).split(".")) if m else ()


#: The CPU description CRIU writes into every dump and checks at restore.
CPUINFO_IMAGE = "cpuinfo.img"


def cpuinfo_dump() -> bytes:
    """``criu cpuinfo dump``: this host's CPU as CRIU records it in a dump (cpuinfo.img)."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-cpuinfo-") as tmp:
        proc.run(["criu", "cpuinfo", "dump", "-D", tmp], timeout=TIMEOUT,
                 what="criu cpuinfo dump")
        return (Path(tmp) / CPUINFO_IMAGE).read_bytes()


def cpuinfo_check(image: bytes) -> tuple[bool, str]:
    """``criu cpuinfo check`` of another host's cpuinfo.img: whether a process dumped there
    can run on this CPU (CRIU's defaults, as a restore uses them), and CRIU's reason."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-cpuinfo-") as tmp:
        (Path(tmp) / CPUINFO_IMAGE).write_bytes(image)
        res = proc.run(["criu", "cpuinfo", "check", "-D", tmp], timeout=TIMEOUT, check=False)
    text = (res.stdout + res.stderr).decode(errors="replace")
    return res.returncode == 0, first_error(text) or proc.tail(text, 1)


def check() -> tuple[bool, str]:
    """Run ``criu check``; return (passed, the last line it printed)."""
    try:
        res = proc.run(["criu", "check"], timeout=TIMEOUT, check=False)
    except CtrmigError as e:
        return False, str(e)
    lines = (res.stdout + res.stderr).decode(errors="replace").strip().splitlines()
    return res.returncode == 0, lines[-1] if lines else ""


@functools.cache
def has_feature(feature: str) -> bool:
    """``criu check --feature NAME`` (e.g. "uffd-noncoop", "mem_dirty_track")."""
    try:
        proc.run(["criu", "check", "--feature", feature], timeout=TIMEOUT)
    except (CommandError, CtrmigError):
        return False
    return True


def lazy_pages_supported() -> bool:
    return has_feature("uffd-noncoop")


def memory_tracking_supported() -> bool:
    return has_feature("mem_dirty_track")


def require_memory_tracking() -> None:
    if not memory_tracking_supported():
        raise FeatureUnavailableError(
            "pre-checkpoint needs memory tracking, which this kernel lacks",
            hint="CONFIG_MEM_SOFT_DIRTY is not set; checkpoint without pre-checkpoint",
        )


def require_lazy_pages() -> None:
    if not lazy_pages_supported():
        raise FeatureUnavailableError(
            "lazy pages need userfaultfd, which this kernel or CRIU lacks",
            hint="restore without lazy pages",
        )


#: CRIU's page server sizes a pipe to 819 pages (the kernel rounds it to 4 MiB); without
#: CAP_SYS_RESOURCE that fails above fs.pipe-max-size, CRIU ignores the failure and then
#: breaks on the first page a lazy restore fetches ("page-pipe: splice: -1: Bad file
#: descriptor", criu/page-xfer.c page_server_serve; unchanged upstream as of 2025-11).
POST_COPY_PIPE = 4194304
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
CAP_SYS_RESOURCE = 24


def pipe_max_size() -> int:
    """The host's fs.pipe-max-size (0 if unreadable)."""
    try:
        with open(PIPE_MAX_SIZE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def has_cap_sys_resource() -> bool:
    """Whether this process (and so the CRIU it starts) has CAP_SYS_RESOURCE."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def require_post_copy() -> None:
    """Refuse a post-copy migration this host's CRIU would break on its first page."""
    require_lazy_pages()
    size = pipe_max_size()
    if size < POST_COPY_PIPE and not has_cap_sys_resource():
        raise FeatureUnavailableError(
            f"post-copy needs fs.pipe-max-size >= {POST_COPY_PIPE} (it is {size}) or "
            "CAP_SYS_RESOURCE: CRIU's page server would fail on the first page",
            hint="run scripts/setup-host (it sets fs.pipe-max-size = 4194304 in "
                 "/etc/sysctl.d), or `sysctl fs.pipe-max-size=4194304`; or migrate "
                 "without --lazy-pages",
        )
