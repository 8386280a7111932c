"""The process engine against real CRIU: examples/simple_loop.c checkpointed and restored.

Every test starts its own counter, reads what it prints, and stops only the processes it
started, by PID. The test process makes itself a child subreaper, so that a restored
process (which CRIU detaches) becomes our child and can be reaped, freeing its PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import ctrmig
from ctrmig import cli
from ctrmig.archive.privileges import archive_privileges
from ctrmig.engines.process import ProcessMigrator, inherit
from ctrmig.errors import (
    ContainerNotFoundError,
    NameInUseError,
    OptionError,
    PrivilegeError,
    RestoreError,
)
from ctrmig.host import criu, proc

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "examples" / "simple_loop.c"
INTERVAL = "0.2"  # seconds between counts: short tests, still several lines a second
LINE = re.compile(r"^count (\d+) pid (\d+)$")
PR_SET_CHILD_SUBREAPER = 36


def _unusable(reason: str) -> None:
    """Like the shared fixtures: error (a green run must prove CRIU ran), or skip locally
    with CTRMIG_ALLOW_SKIP=1."""
    if os.environ.get("CTRMIG_ALLOW_SKIP") == "1":
        pytest.skip(reason)
    raise RuntimeError(reason)


@pytest.fixture(scope="module", autouse=True)
def _host() -> Iterator[None]:
    if os.geteuid() != 0:
        _unusable("CRIU needs root")
    if shutil.which("gcc") is None:
        _unusable("gcc is not installed: apt-get install gcc")
    ok, last = criu.check()
    if not ok:
        _unusable(f"criu check fails here: {last} (run scripts/setup-host)")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    """simple_loop compiled into this test's temp dir (tests may modify it)."""
    out = tmp_path / "simple_loop"
    proc.run(["gcc", "-O2", "-Wall", "-o", str(out), str(SOURCE)], timeout=60)
    return out


class Procs:
    """Processes a test started (or restored); stopped by PID at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        p = proc.spawn(argv, **kwargs)
        self.popens.append(p)
        return p

    def adopt(self, pid: int | str) -> int:
        self.pids.append(int(pid))
        return int(pid)

    def close(self) -> None:
        for p in self.popens:
            proc.stop(p, timeout=5)
        for pid in self.pids:
            proc.stop_pid(pid, timeout=5)
            reap(pid)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def reap(pid: int) -> None:
    """Collect a dead child (we are a subreaper), so that its PID is free again."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Reader:
    """Lines from a pipe or pty master, read with a deadline."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""
        self.lines: list[str] = []

    def until(self, done: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.lines):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; read so far: {self.lines[-5:]}")
            if not select.select([self.fd], [], [], left)[0]:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # a pty master whose slave side is gone
                chunk = b""
            if not chunk:
                return self.lines  # EOF
            self.buf += chunk.replace(b"\r\n", b"\n")
            *complete, self.buf = self.buf.split(b"\n")
            self.lines += [ln.decode() for ln in complete]
        return self.lines

    def counts(self) -> list[int]:
        return counts(self.lines)


def counts(lines: list[str]) -> list[int]:
    """The counts in ``lines``; every line must be a well-formed counter line."""
    result = []
    for line in lines:
        m = LINE.match(line)
        assert m, f"garbled output line: {line!r}"
        result.append(int(m.group(1)))
    return result


def n_counts(n: int) -> Callable[[list[str]], bool]:
    return lambda lines: len(lines) >= n


def assert_continues(before: list[int], after: list[int]) -> None:
    """The restored counter resumed right after the last count before the checkpoint."""
    assert before and after
    assert before == list(range(1, len(before) + 1)), before
    assert after[0] == before[-1] + 1, f"restored count started at {after[0]}, not {before[-1] + 1}"
    assert after == list(range(after[0], after[0] + len(after))), after


def start_piped(procs: Procs, binary: Path) -> tuple[subprocess.Popen[bytes], Reader]:
    p = procs.spawn([str(binary), "1", INTERVAL], stdout=subprocess.PIPE)
    assert p.stdout is not None
    reader = Reader(p.stdout.fileno())
    reader.until(n_counts(3))
    return p, reader


# --- pipe stdio ---------------------------------------------------------------------------


def test_pipe_stdout_count_continues_after_restore(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    p, old = start_piped(procs, binary)
    archive = tmp_path / "loop.ckpt.tar"
    r, w = os.pipe()
    try:
        m = ctrmig.migrator("process", stdout=w, state_dir=state)
        result = m.checkpoint(str(p.pid), archive)
        assert p.wait(timeout=5) == -signal.SIGKILL  # the source was ended by the checkpoint
        before = counts(old.until(lambda _: False))  # drain the old pipe to EOF

        extra = result.manifest.extra
        assert extra["pid"] == p.pid and extra["exe"] == str(binary)
        assert extra["stdio"] == {"0": "null", "1": "pipe", "2": "null"}
        assert extra["shell_job"] is False
        assert result.manifest.container.name == str(p.pid)
        assert result.manifest.container.image == str(binary)
        assert ctrmig.verify(archive).engine == "process"
        names = set(result.manifest.files)
        assert {"config.dump", "checkpoint/pstree.img", f"checkpoint/core-{p.pid}.img"} <= names

        restored = procs.adopt(m.restore(archive, allow_privileged=True))
        os.close(w)
        w = -1
        assert restored == p.pid  # CRIU restores a plain process under its own PID
        new = Reader(r)
        after = counts(new.until(n_counts(4)))
        assert_continues(before, after)
        assert all(f"pid {p.pid}" in ln for ln in new.lines)
        assert m.exists(str(restored))
        assert [c.name for c in m.list()] == [str(restored)]
        with pytest.raises(OptionError, match="not captured"):
            m.logs(str(restored))  # its stdout is our pipe: nothing on disk to read
        m.remove(str(restored))
        reap(restored)
        assert not m.exists(str(restored))
        assert m.list() == []
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_pipe_stdout_goes_to_log_file_by_default(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    p, old = start_piped(procs, binary)
    archive = tmp_path / "loop.ckpt.tar"
    m = ctrmig.migrator("process", state_dir=state)
    m.checkpoint(str(p.pid), archive, compression="gzip")
    p.wait(timeout=5)
    before = counts(old.until(lambda _: False))

    restored = procs.adopt(m.restore(archive, allow_privileged=True))
    log = state / f"{restored}.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(m.logs(restored).splitlines()) < 3:
        time.sleep(0.1)
    after = counts(m.logs(restored).splitlines())
    assert log.read_text() == m.logs(restored)
    assert_continues(before, after[:3])


def test_unix_socket_stdout_is_reconnected(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    # As under systemd, whose services write to a journald stream socket.
    ours, theirs = socket.socketpair()
    new_ours, new_theirs = socket.socketpair()
    with ours, new_ours, new_theirs:
        with theirs:
            p = procs.spawn([str(binary), "1", INTERVAL], stdout=theirs)
        old = Reader(ours.fileno())
        old.until(n_counts(3))
        m = ctrmig.migrator("process", stdout=new_theirs, state_dir=state)
        result = m.checkpoint(str(p.pid), tmp_path / "sock.tar")
        assert result.manifest.extra["stdio"]["1"] == "socket"
        p.wait(timeout=5)
        before = counts(old.until(lambda _: False))
        procs.adopt(m.restore(tmp_path / "sock.tar", allow_privileged=True))
        new_theirs.close()
        assert_continues(before, counts(Reader(new_ours.fileno()).until(n_counts(3))))


def test_shell_job_whose_session_leader_is_outside_the_tree(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    # sh leads the session and the process group; the counter is its background job.
    sh = procs.spawn(["sh", "-c", f"{binary} 1 {INTERVAL} & wait"], stdout=subprocess.PIPE)
    assert sh.stdout is not None
    old = Reader(sh.stdout.fileno())
    old.until(n_counts(3))
    pid = int(LINE.match(old.lines[0]).group(2))  # type: ignore[union-attr]
    procs.adopt(pid)
    r, w = os.pipe()
    try:
        m = ctrmig.migrator("process", stdout=w, state_dir=state)
        result = m.checkpoint(str(pid), tmp_path / "job.tar")
        assert result.manifest.extra["shell_job"] is True
        sh.wait(timeout=5)  # its job is gone, so sh's wait returned and it exited
        reap(pid)
        before = counts(old.until(lambda _: False))
        assert m.restore(tmp_path / "job.tar", allow_privileged=True) == str(pid)
        os.close(w)
        w = -1
        assert_continues(before, counts(Reader(r).until(n_counts(3))))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_terminal_job_restored_onto_a_new_pty(
    binary: Path, procs: Procs, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session leader (proc.spawn starts one) that opens a tty without O_NOCTTY gets it
    # as its controlling terminal; then it execs the counter with the tty as its stdio.
    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    on_tty = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
              "[os.dup2(fd, n) for n in (0, 1, 2)]; os.execv(sys.argv[2], sys.argv[2:])")
    p = procs.spawn([sys.executable, "-c", on_tty, slave_path, str(binary), "1", INTERVAL])
    old = Reader(master)
    old.until(n_counts(3))
    os.close(slave)  # only now: a pty that nobody holds open reads as EOF
    pid = p.pid
    assert os.readlink(f"/proc/{pid}/fd/1") == slave_path
    new_master, new_slave = os.openpty()
    try:
        m = ctrmig.migrator("process", stdin=new_slave, stdout=new_slave, state_dir=state)
        result = m.checkpoint(str(pid), tmp_path / "tty.tar")
        assert result.manifest.extra["stdio"] == {"0": "tty", "1": "tty", "2": "tty"}
        assert result.manifest.extra["shell_job"] is True
        p.wait(timeout=5)
        before = counts(old.until(lambda _: False))
        # A terminal can only be replaced by a terminal: without one, refuse up front.
        monkeypatch.setattr(inherit, "own_terminal", lambda: None)
        with pytest.raises(OptionError, match="no terminal to restore it onto"):
            ctrmig.migrator("process", state_dir=state).restore(tmp_path / "tty.tar",
                                                                allow_privileged=True)
        pid = procs.adopt(m.restore(tmp_path / "tty.tar", allow_privileged=True))
        assert pid == p.pid
        tty_nr = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[4])
        assert tty_nr == os.fstat(new_slave).st_rdev  # its controlling terminal is the new pty
        os.close(new_slave)
        new_slave = -1
        assert_continues(before, counts(Reader(new_master).until(n_counts(3))))
        assert os.readlink(f"/proc/{pid}/fd/1") != slave_path
    finally:
        os.close(master)
        os.close(new_master)
        if new_slave >= 0:
            os.close(new_slave)


# --- stdout to a file that keeps growing --------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "grow"),
    [("ab", True), ("wb", True), ("wb", False)],
    ids=["O_APPEND-file-grew", "plain-file-grew", "plain-file-unchanged"],
)
def test_file_stdout_keeps_growing_after_restore(
    binary: Path, procs: Procs, state: Path, tmp_path: Path, mode: str, grow: bool
) -> None:
    out = tmp_path / "loop.out"
    with open(out, mode) as f:
        p = procs.spawn([str(binary), "1", INTERVAL], stdout=f)
    wait_for(lambda: len(out.read_text().splitlines()) >= 3)
    m = ctrmig.migrator("process", state_dir=state)
    result = m.checkpoint(str(p.pid), tmp_path / "file.tar")
    p.wait(timeout=5)
    assert result.manifest.extra["stdio"]["1"] == f"file {out}"
    assert result.manifest.extra["files"] == [str(out)]
    before = counts(out.read_text().splitlines())
    size_at_checkpoint = out.stat().st_size
    if grow:  # another writer adds to the file while the process is checkpointed
        with open(out, "a") as f:
            f.write("MARKER written while the process was checkpointed\n")

    restored = procs.adopt(m.restore(tmp_path / "file.tar", allow_privileged=True))
    wait_for(lambda: len(out.read_text().splitlines()) >= len(before) + grow + 4)
    lines = out.read_text().splitlines()
    assert counts(lines[: len(before)]) == before  # nothing overwritten
    if grow:
        assert lines[len(before)].startswith("MARKER")
        flags = int(re.search(r"flags:\s*(\d+)", Path(f"/proc/{restored}/fdinfo/1")
                              .read_text()).group(1), 8)  # type: ignore[union-attr]
        assert flags & os.O_APPEND  # handed back O_APPEND: writes land after the marker
    assert_continues(before, counts(lines[len(before) + grow:]))
    assert m.logs(str(restored)) == out.read_text()[: len(m.logs(str(restored)))]
    grown = out.stat().st_size
    wait_for(lambda: out.stat().st_size > grown)  # and it keeps growing
    assert out.stat().st_size > size_at_checkpoint


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# --- refusals -----------------------------------------------------------------------------


def checkpointed_to_file(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> tuple[ctrmig.Migrator, Path, Path, int]:
    out = tmp_path / "loop.out"
    with open(out, "ab") as f:
        p = procs.spawn([str(binary), "1", INTERVAL], stdout=f)
    wait_for(lambda: len(out.read_text().splitlines()) >= 2)
    m = ctrmig.migrator("process", state_dir=state)
    m.checkpoint(str(p.pid), tmp_path / "c.tar")
    p.wait(timeout=5)
    return m, tmp_path / "c.tar", out, p.pid


def test_refuses_a_changed_executable(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    m, archive, _, pid = checkpointed_to_file(binary, procs, state, tmp_path)
    with open(binary, "ab") as f:
        f.write(b"\0")  # still runs, but it is not the binary that was checkpointed
    with pytest.raises(RestoreError, match=r"executable .* differs") as e:
        m.restore(archive, allow_privileged=True)
    assert "same binary" in (e.value.hint or "")
    assert not m.exists(str(pid))  # refused before CRIU ran


def test_refuses_a_missing_executable(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    m, archive, _, pid = checkpointed_to_file(binary, procs, state, tmp_path)
    binary.unlink()
    with pytest.raises(ctrmig.errors.ImageNotFoundError, match=r"executable .* missing"):
        m.restore(archive, allow_privileged=True)
    assert not m.exists(str(pid))


def test_refuses_a_missing_open_file(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    m, archive, out, pid = checkpointed_to_file(binary, procs, state, tmp_path)
    out.unlink()
    with pytest.raises(RestoreError, match=f"held open is missing: {out}") as e:
        m.restore(archive, allow_privileged=True)
    assert "touch" in (e.value.hint or "")
    assert not m.exists(str(pid))
    out.touch()  # the hint works: a fresh, empty output file is accepted
    assert procs.adopt(m.restore(archive, allow_privileged=True)) == pid
    wait_for(lambda: len(out.read_text().splitlines()) >= 2)
    assert counts(out.read_text().splitlines())[0] > 2  # resumed, not started afresh


HOLDER = """
import sys, tempfile, time
data = open(sys.argv[1])              # a file it reads: must be the same at restore
proc_file = open("/proc/self/stat")   # content made up on each read: not compared
ghost = tempfile.TemporaryFile()      # deleted at once: CRIU carries its content
ghost.write(b"ghost"); ghost.flush()
for i in range(1, 10**9):
    ghost.seek(0)
    print(f"count {i} pid {data.read().strip()}{ghost.read().decode()}", flush=True)
    data.seek(0)
    time.sleep(0.2)
"""


def test_refuses_a_changed_input_file_and_carries_a_deleted_one(
    procs: Procs, state: Path, tmp_path: Path
) -> None:
    script, data = tmp_path / "holder.py", tmp_path / "data.txt"
    script.write_text(HOLDER)
    data.write_text("1")
    p = procs.spawn([sys.executable, str(script), str(data)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    old = Reader(p.stdout.fileno())
    old.until(n_counts(3))
    m = ctrmig.migrator("process", state_dir=state)
    result = m.checkpoint(str(p.pid), tmp_path / "h.tar")
    p.wait(timeout=5)
    assert str(data) in result.manifest.extra["files"]
    assert old.until(lambda _: False)[-1].endswith("pid 1ghost")

    data.write_text("2")  # same size, other content
    with pytest.raises(RestoreError, match=f"{data} changed since the checkpoint"):
        m.restore(tmp_path / "h.tar", allow_privileged=True)
    data.write_text("1")
    r, w = os.pipe()
    try:
        m = ctrmig.migrator("process", stdout=w, state_dir=state)
        procs.adopt(m.restore(tmp_path / "h.tar", allow_privileged=True))
        os.close(w)
        w = -1
        lines = Reader(r).until(n_counts(2))
        assert all(ln.endswith("pid 1ghost") for ln in lines), lines  # ghost file came back
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_refuses_while_the_source_still_runs(
    binary: Path, procs: Procs, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, reader = start_piped(procs, binary)
    m = ctrmig.migrator("process", state_dir=state)
    m.checkpoint(str(p.pid), tmp_path / "live.tar", leave_running=True)
    n = len(reader.lines)
    reader.until(n_counts(n + 2))  # leave_running: it goes on counting
    with pytest.raises(NameInUseError, match=f"PID {p.pid}.* taken") as e:
        m.restore(tmp_path / "live.tar", allow_privileged=True)
    assert "stop it first" in (e.value.hint or "")
    assert p.poll() is None  # untouched by the refused restore

    # Should the PID be taken between that check and CRIU (a race), CRIU's own error is
    # turned into the same clear one.
    monkeypatch.setattr(ProcessMigrator, "_check_name_free", lambda self, name, source=None: None)
    with pytest.raises(NameInUseError, match="taken") as e:
        m.restore(tmp_path / "live.tar", allow_privileged=True)
    assert "Can't fork for" in (e.value.stderr or "")
    assert "stop it first" in (e.value.hint or "")
    n = len(reader.lines)
    reader.until(n_counts(n + 2))
    assert p.poll() is None


def test_refuses_another_name_and_unknown_pids(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    m, archive, _, pid = checkpointed_to_file(binary, procs, state, tmp_path)
    assert [(c.name, c.state) for c in m.list()] == [(str(pid), "checkpointed")]
    with pytest.raises(OptionError, match="original PID"):
        m.restore(archive, name="web", allow_privileged=True)
    with pytest.raises(ContainerNotFoundError):
        m.checkpoint("not-a-pid", tmp_path / "x.tar")
    with pytest.raises(ContainerNotFoundError):
        m.checkpoint(str(pid), tmp_path / "x.tar")  # it was ended by the checkpoint
    assert not (tmp_path / "x.tar").exists()
    with pytest.raises(ContainerNotFoundError):
        m.logs(str(pid))
    # Its own PID is the one name it takes; the base's name check then finds it free.
    assert procs.adopt(m.restore(archive, name=str(pid), allow_privileged=True)) == pid
    with pytest.raises(NameInUseError, match=f"PID {pid}.* taken"):
        m.restore(archive, name=str(pid), allow_privileged=True)


def test_refused_without_allow_privileged_and_inspect_says_why(
    binary: Path, procs: Procs, state: Path, tmp_path: Path
) -> None:
    """A plain process runs on the host, outside any container: restoring one always
    needs the flag, whatever it holds; inspect lists the same request."""
    m, archive, out, pid = checkpointed_to_file(binary, procs, state, tmp_path)
    with pytest.raises(PrivilegeError) as e:
        m.restore(archive)
    assert "host process runs on the host as uid 0 with" in str(e.value)
    assert "--allow-privileged" in (e.value.hint or "")
    assert not m.exists(str(pid))  # refused before CRIU ran

    found = archive_privileges(archive)
    assert [r.kind for r in found] == ["host process"]
    assert found[0].detail.startswith("runs on the host as uid 0 with ")
    res = CliRunner().invoke(cli.cli, ["inspect", str(archive)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "host process runs on the host as uid 0" in res.output
    res = CliRunner().invoke(cli.cli, ["inspect", "--json", str(archive)])
    assert json.loads(res.output)["privileges"] == [
        {"kind": "host process", "detail": found[0].detail}]

    res = CliRunner().invoke(cli.cli, ["restore", str(archive), "--engine", "process"])
    assert res.exit_code == 1
    assert "host process" in res.output and "--allow-privileged" in res.output
    assert procs.adopt(m.restore(archive, allow_privileged=True)) == pid
    wait_for(lambda: counts(out.read_text().splitlines())[-1] > 3)
