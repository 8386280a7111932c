"""The screen-locomotive demo: checkpoint Debian's ``sl`` mid-screen, restore it elsewhere.

``sl`` runs in a container with ``TERM=xterm`` and no tty, so its curses output (cursor
positions like ``ESC[15;76H``) lands in the container log. The demo checkpoints the
container while the train crosses the screen, restores the archive under a new name and
reads, from the two real logs, where the train stood at the checkpoint and where it
drove on after the restore.

The log is replayed through :class:`Screen`, a small terminal model, because curses
does not re-address every row each frame (it shifts rows with delete-character, moves
with ``ESC[Nd``/``ESC[NG``, ...): the train's column is the leftmost non-blank column of
the replayed screen, the front of the locomotive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import ctrmig
from ctrmig import settings
from ctrmig.errors import CtrmigError, EngineError, ToolMissingError
from ctrmig.host import images, proc

log = logging.getLogger(__name__)

IMAGE = "localhost/screen_locomotive:latest"
SL = Path("/usr/games/sl")
TERMINFO = (Path("/usr/share/terminfo/x/xterm"), Path("/lib/terminfo/x/xterm"))
ENV = {"TERM": "xterm"}
# The train keeps coming: a new sl as soon as one has left the screen. sl runs in the
# background so that the shell (PID 1, which ignores an untrapped SIGTERM) stops at once.
COMMAND = ["/bin/sh", "-c",
           "trap 'kill $! 2>/dev/null; exit 0' TERM; while :; do /usr/games/sl & wait $!; done"]
CONTAINERFILE = f"""\
# The screen-locomotive demo image: Debian's sl, its libraries, xterm's terminfo and
# busybox-static, assembled offline by `python -m ctrmig.demo rootfs rootfs/`.
FROM scratch
COPY rootfs/ /
ENV TERM=xterm
CMD {json.dumps(COMMAND)}
"""
ENGINES = ("podman", "docker", "runc")
# The train must be fully on screen, away from both edges, when the checkpoint is taken.
CHECKPOINT_WINDOW = (30, 55)
MAX_STEP = 1  # sl moves the train one column per frame
SPEED = 24.0  # columns per second: a frame every 40 ms, and the time to draw it
# Replay speed of the live view (sl writes about 5 KB/s of curses output off a tty).
PACE_RATE, PACE_CHUNK = 6000, 240

# --- the terminal model --------------------------------------------------------------------

_TOKEN = re.compile(
    r"\x1b\[([0-9;?]*)([@-~])"  # CSI sequence
    r"|\x1b[()*+][0-9A-Za-z]"  # character set designation
    r"|\x1b[^\[]"  # any other two-byte escape
    r"|([\x00-\x1f\x7f])"  # a control character
    r"|([^\x00-\x1f\x7f\x1b]+)"  # printable text
)
_CUP = re.compile(r"\x1b\[(\d+);(\d+)H")


def cursor_positions(text: str) -> list[tuple[int, int]]:
    """Every absolute cursor position ``ESC[row;colH`` in ``text``, as (row, col)."""
    return [(int(r), int(c)) for r, c in _CUP.findall(text)]


class Screen:
    """Just enough of an xterm to replay sl's curses output and see where the train is."""

    def __init__(self, rows: int = 24, cols: int = 80):
        self.rows, self.cols = rows, cols
        self.clear()

    def clear(self) -> None:
        self.grid = [[" "] * self.cols for _ in range(self.rows)]
        self.row = self.col = 0

    def leftmost(self) -> int | None:
        """1-based leftmost non-blank column on the screen (None if the screen is blank)."""
        found = [len(r) - len("".join(r).lstrip(" ")) for r in self.grid if "".join(r).strip()]
        return min(found) + 1 if found else None

    def feed(self, text: str, on_change: Callable[[], bool] | None = None) -> bool:
        """Apply ``text``; after each change call ``on_change``, stop early if it says so."""
        for m in _TOKEN.finditer(text):
            params, final, ctrl, printable = m.group(1), m.group(2), m.group(3), m.group(4)
            if printable is not None:
                self._put(printable)
            elif ctrl is not None:
                self._control(ctrl)
                continue
            elif final is not None:
                if not self._csi(params or "", final):
                    continue
            else:
                continue
            if on_change is not None and on_change():
                return True
        return False

    def _put(self, s: str) -> None:
        for ch in s:
            if self.col < self.cols:
                self.grid[self.row][self.col] = ch
            self.col = min(self.col + 1, self.cols)

    def _control(self, c: str) -> None:
        if c == "\r":
            self.col = 0
        elif c == "\n":
            self.row = min(self.row + 1, self.rows - 1)
        elif c == "\b":
            self.col = max(self.col - 1, 0)

    def _csi(self, params: str, final: str) -> bool:
        """Apply one CSI sequence; True if it changed the screen's content."""
        private = params.startswith("?")
        nums = [int(p) if p.isdigit() else 0 for p in params.lstrip("?").split(";")]
        n = nums[0] or 1
        line = self.grid[self.row]
        if private:
            if final in "hl" and nums[0] in (47, 1047, 1049):
                self.clear()  # switch between the normal and the alternate screen
                return True
            return False
        if final in "Hf":
            row = nums[0] or 1
            col = (nums[1] if len(nums) > 1 else 0) or 1
            self.row, self.col = min(row, self.rows) - 1, min(col, self.cols) - 1
        elif final == "d":
            self.row = min(n, self.rows) - 1
        elif final in "G`":
            self.col = min(n, self.cols) - 1
        elif final == "A":
            self.row = max(self.row - n, 0)
        elif final == "B":
            self.row = min(self.row + n, self.rows - 1)
        elif final == "C":
            self.col = min(self.col + n, self.cols - 1)
        elif final == "D":
            self.col = max(self.col - n, 0)
        elif final == "J":
            if nums[0] == 2:
                self.grid = [[" "] * self.cols for _ in range(self.rows)]
            elif nums[0] == 0:
                line[self.col:] = [" "] * (self.cols - self.col)
                for r in self.grid[self.row + 1:]:
                    r[:] = [" "] * self.cols
            return True
        elif final == "K":
            if nums[0] == 0:
                line[self.col:] = [" "] * (self.cols - self.col)
            elif nums[0] == 1:
                line[:self.col + 1] = [" "] * (self.col + 1)
            else:
                line[:] = [" "] * self.cols
            return True
        elif final == "P":
            del line[self.col:self.col + n]
            line.extend([" "] * (self.cols - len(line)))
            return True
        elif final == "@":
            line[self.col:self.col] = [" "] * n
            del line[self.cols:]
            return True
        elif final == "X":
            end = min(self.col + n, self.cols)
            line[self.col:end] = [" "] * (end - self.col)
            return True
        return False


def train_column(log_text: str) -> int | None:
    """The train's column (front of the locomotive) once all of ``log_text`` is shown."""
    screen = Screen()
    screen.feed(log_text)
    return screen.leftmost()


def resume_column(before: str, after: str) -> int | None:
    """The train's column at the first frame drawn after the restore.

    ``after`` is curses output relative to the screen that ``before`` left (the restored
    process remembers that screen), so it is replayed on top of it. The first change that
    moves the train (or blanks and refills the screen, as a fresh sl would, bringing the
    train back in at the right edge) gives the column; output that redraws without moving
    it gives the checkpoint's column. None if nothing was drawn.
    """
    screen = Screen()
    screen.feed(before)
    start = screen.leftmost()
    drawn: list[int] = []

    def changed() -> bool:
        col = screen.leftmost()
        if col is not None:
            drawn.append(col)
        return col is not None and col != start

    if screen.feed(after, changed):
        return drawn[-1]
    return start if drawn else None


def new_output(before: str, after: str) -> str:
    """What the restored container printed: its log, less the source's log if it is
    carried over as a prefix (engines differ in this)."""
    if before and after.startswith(before):
        return after[len(before):]
    return after


def resumed(at_checkpoint: int | None, at_restore: int | None, max_step: int = MAX_STEP) -> bool:
    """Did the train drive on from where it stopped (the same column, or a step left)?"""
    if at_checkpoint is None or at_restore is None:
        return False
    return 0 <= at_checkpoint - at_restore <= max_step


# --- the image -----------------------------------------------------------------------------


def build_rootfs(root: Path) -> Path:
    """Assemble the demo's rootfs in ``root``: busybox-static, sl and its libraries, and
    xterm's terminfo."""
    if not SL.exists():
        raise ToolMissingError("sl is not installed",
                               hint="apt-get install sl (scripts/setup-host)")
    terminfo = next((t for t in TERMINFO if t.exists()), None)
    if terminfo is None:
        raise ToolMissingError("xterm's terminfo is missing", hint="apt-get install ncurses-base")
    images.busybox_rootfs(root)
    images.add_program(root, SL)
    for t in TERMINFO:  # both places ncurses looks, whichever the host has
        dest = root / str(t).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(terminfo.resolve(), dest)
    return root


def build_image(ref: str = IMAGE) -> str:
    """Build the demo image into podman's storage with ``podman build`` (offline)."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-demo-build-") as tmp:
        ctx = Path(tmp)
        build_rootfs(ctx / "rootfs")
        (ctx / "Containerfile").write_text(CONTAINERFILE)
        proc.run(["podman", "build", "--network", "none", "-t", ref, "-f",
                  str(ctx / "Containerfile"), str(ctx)], timeout=images.TIMEOUT,
                 what="podman build screen_locomotive")
    return ref


def ensure_podman_image(ref: str = IMAGE) -> str:
    """The demo image in podman's storage, built if missing."""
    if not images.podman_has_image(ref):
        log.info("building %s", ref)
        build_image(ref)
    return ref


def ensure_docker_image(base_url: str, ref: str = IMAGE) -> str:
    """The demo image in the docker daemon at ``base_url``, loaded from podman if missing."""
    import docker
    import docker.errors

    try:
        with contextlib.closing(docker.DockerClient(base_url=base_url, timeout=300)) as client:
            try:
                client.images.get(ref)
                return ref
            except docker.errors.ImageNotFound:
                pass
            ensure_podman_image(ref)
            with tempfile.TemporaryDirectory(prefix="ctrmig-demo-") as tmp:
                archive = images.podman_save(ref, Path(tmp) / "image.tar")
                with archive.open("rb") as f:
                    client.images.load(f)
            return ref
    except docker.errors.DockerException as e:
        raise EngineError(f"cannot load {ref} into docker at {base_url}: {e}") from None


# --- running the demo ----------------------------------------------------------------------


@dataclass
class DemoResult:
    """What the demo saw in the real logs."""

    engine: str
    source: str
    restored: str
    checkpoint_column: int | None
    restore_column: int | None
    last_position_before: tuple[int, int] | None
    first_position_after: tuple[int, int] | None

    @property
    def ok(self) -> bool:
        return resumed(self.checkpoint_column, self.restore_column)


def default_url(engine: str) -> str | None:
    """The API URL the demo uses when none is given (environment, then default socket)."""
    if engine == "podman":
        return settings.current().podman_url
    if engine == "docker":
        return settings.current().docker_url
    return None


def _migrator(engine: str, url: str | None) -> ctrmig.Migrator:
    if engine == "podman":
        return ctrmig.migrator("podman", url=url)
    if engine == "docker":
        return ctrmig.migrator("docker", base_url=url)
    return ctrmig.migrator(engine)


def _start(m: ctrmig.Migrator, engine: str, url: str | None, name: str) -> None:
    """Start the demo container: the adapter's own ``run`` where it has one, else the
    engine's SDK (podman-py, docker). sl needs no network, so it gets none."""
    run = getattr(m, "run", None)
    if run is not None:
        run(IMAGE, name=name, command=COMMAND, env=ENV)
        return
    if engine == "podman":
        from podman import PodmanClient
        from podman.errors import APIError

        with PodmanClient(base_url=url) as client:
            try:
                client.containers.run(IMAGE, COMMAND, name=name, detach=True, environment=ENV,
                                      network_mode="none")
            except APIError as e:
                raise EngineError(f"podman run {IMAGE} failed: {e}") from None
        return
    if engine == "docker":
        import docker
        import docker.errors

        dclient = docker.DockerClient(base_url=url, timeout=120)
        try:
            dclient.containers.run(IMAGE, COMMAND, name=name, detach=True, environment=ENV,
                                   network_mode="none")
        except docker.errors.DockerException as e:
            raise EngineError(f"docker run {IMAGE} failed: {e}") from None
        finally:
            dclient.close()
        return
    raise EngineError(f"the {engine} engine cannot start containers for the demo")


def _ensure_image(engine: str, url: str | None) -> None:
    if engine == "docker":
        assert url is not None
        ensure_docker_image(url)
    else:
        # podman's storage; the runc adapter takes images from there too (skopeo).
        ensure_podman_image()


class _Display:
    """Shows the container's output live in the terminal (or nothing, off a terminal)."""

    def __init__(self, out: TextIO | None):
        self.out = out
        self.shown = 0

    def show(self, text: str) -> None:
        """Write what is new in ``text``, paced a little faster than sl writes, so that a
        backlog plays as motion rather than a jump."""
        if self.out is None:
            self.shown = len(text)
            return
        while self.shown < len(text):
            chunk = text[self.shown:self.shown + PACE_CHUNK]
            self.out.write(chunk)
            self.out.flush()
            self.shown += len(chunk)
            time.sleep(len(chunk) / PACE_RATE)

    def status(self, message: str) -> None:
        """A line at the bottom of the screen, below the train's rows."""
        if self.out is not None:
            self.out.write(f"\x1b7\x1b[24;1H\x1b[2K\x1b[7m {message} \x1b[m\x1b8")
            self.out.flush()

    def reset(self) -> None:
        """Follow another text (the restored container's output) from its start."""
        self.shown = 0

    def close(self) -> None:
        if self.out is not None:
            self.out.write("\x1b[?1049l\x1b[?25h\x1b[m")
            self.out.flush()


def _wait_for_train(m: ctrmig.Migrator, name: str, display: _Display,
                    timeout: float) -> None:
    """Return when the train is well inside the screen (the checkpoint window).

    Some engines' logs arrive in bursts (dockerd holds output without a newline until
    16 KiB have come), so a sighting of the train still coming in is extrapolated at
    sl's speed rather than waited for.
    """
    lo, hi = CHECKPOINT_WINDOW
    screen, seen = Screen(), 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = m.logs(name)
        seen_at = time.monotonic()
        fresh = len(text) > seen
        screen.feed(text[seen:])
        seen = len(text)
        display.show(text)
        col = screen.leftmost()
        if col is not None and lo <= col <= hi:
            return
        if fresh and col is not None and col > hi:
            time.sleep(max(0.0, seen_at + (col - (lo + hi) / 2) / SPEED - time.monotonic()))
            return
        time.sleep(0.05)
    raise EngineError(f"the train did not show up in {name}'s log within {timeout:g} s",
                      hint=f"look at the container's output: it must run {SL}")


def _follow(m: ctrmig.Migrator, name: str, display: _Display, before: str,
            seconds: float) -> str:
    """The restored container's new output, shown live for ``seconds``."""
    deadline = time.monotonic() + seconds
    after = ""
    while True:
        after = new_output(before, m.logs(name))
        display.show(after)
        if time.monotonic() > deadline or (display.out is None and len(after) > 4096):
            return after
        time.sleep(0.05)


def run_demo(
    engine: str = "podman",
    *,
    url: str | None = None,
    interactive: bool | None = None,
    out: TextIO | None = None,
    pause: float = 2.0,
    timeout: float = 60.0,
    say: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo once on ``engine`` and clean up; return what the logs showed.

    ``interactive`` (default: stdout is a terminal) shows the train live on ``out``;
    ``say`` receives progress lines when not interactive.
    """
    if engine not in ENGINES:
        raise ctrmig.errors.OptionError(f"the demo runs on {', '.join(ENGINES)}, not {engine!r}")
    out = out or sys.stdout
    if interactive is None:
        interactive = out.isatty()
    display = _Display(out if interactive else None)
    tell = say or (lambda _msg: None)
    url = url or default_url(engine)
    m = _migrator(engine, url)
    tag = os.urandom(3).hex()
    source, restored = f"screen-locomotive-{tag}", f"screen-locomotive-{tag}-restored"
    try:
        m.version()  # an unreachable engine fails here, with the adapter's hint
        _ensure_image(engine, url)
        with tempfile.TemporaryDirectory(prefix="ctrmig-demo-") as tmp, _cleanup(m, source,
                                                                                 restored):
            archive = Path(tmp) / "screen_locomotive.ckpt.tar"
            tell(f"starting {source} ({IMAGE}) on {engine}")
            _start(m, engine, url, source)
            _wait_for_train(m, source, display, timeout)
            display.status("checkpointing ...")
            tell(f"checkpointing {source} mid-screen")
            m.checkpoint(source, archive)
            before = m.logs(source)
            display.show(before)
            at_checkpoint = train_column(before)
            display.status(f"checkpointed at column {at_checkpoint} "
                           f"({archive.stat().st_size // 1024} KiB); restore in {pause:g} s")
            tell(f"checkpointed at column {at_checkpoint}; restoring as {restored}")
            time.sleep(pause)
            m.restore(archive, name=restored)
            display.reset()  # from here on the display follows the restored container
            display.status(f"restored as {restored}")
            after = _follow(m, restored, display, before, seconds=5.0 if interactive else 1.0)
            if display.out is None:
                deadline = time.monotonic() + timeout
                while resume_column(before, after) is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    after = new_output(before, m.logs(restored))
            at_restore = resume_column(before, after)
            display.status(f"restored: the train drives on from column {at_restore}")
            time.sleep(1.0 if interactive else 0)
            before_pos, after_pos = cursor_positions(before), cursor_positions(after)
            return DemoResult(engine, source, restored, at_checkpoint, at_restore,
                              before_pos[-1] if before_pos else None,
                              after_pos[0] if after_pos else None)
    finally:
        display.close()
        m.close()


@contextlib.contextmanager
def _cleanup(m: ctrmig.Migrator, *names: str) -> Iterator[None]:
    """Remove the demo's containers however the demo ends."""
    try:
        yield
    finally:
        for name in names:
            try:
                if m.exists(name):
                    m.remove(name)
            except CtrmigError as e:
                log.warning("could not remove %s: %s", name, e.message)


def main(argv: list[str]) -> int:
    """``python -m ctrmig.demo rootfs DIR``: assemble the image's rootfs (build.sh uses it)."""
    if len(argv) != 2 or argv[0] != "rootfs":
        print("usage: python -m ctrmig.demo rootfs DIR", file=sys.stderr)
        return 2
    build_rootfs(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["COMMAND", "CONTAINERFILE", "IMAGE", "DemoResult", "Screen", "build_image",
           "build_rootfs", "cursor_positions", "resume_column", "resumed", "run_demo",
           "train_column"]

