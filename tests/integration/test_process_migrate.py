"""The process engine's direct route and post-copy, end to end between two hosts.

A plain process is restored under its own PIDs, so its target must be a host whose PIDs
are not this machine's: host B of tests/hosts.py runs an sshd in a PID namespace of its
own (``start_sshd(own_pids=True)``), reached over the veth from host A, and ctrmig there
restores into that PID space, as on another machine. The workload is bench/memhog.c,
started by the test as a plain process in host A's network namespace: it keeps verifying
all of its memory, so an intact move shows as full passes on B without a CORRUPT line.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bench import workload

from ctrmig.host import criu, proc, services
from tests.conftest import need, wait_for
from tests.hosts import TwoHosts
from tests.integration.test_failures import (
    set_link,
    slow_link,
    tx_bytes,
    wait_exit,
    wait_until,
)

pytestmark = pytest.mark.process

CTRMIG = str(Path(sys.executable).with_name("ctrmig"))
SSH_PORT = 2293
MIB = 64


@dataclass
class Apart:
    """Hosts A and B, B's sshd in its own PID space; memhog built for both."""

    hosts: TwoHosts
    ssh_options: list[str]
    memhog: Path


@pytest.fixture(scope="module")
def apart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apart]:
    for tool in ("ip", "tc", "criu", "sshd", "gcc", "unshare"):
        need(tool)
    base = tmp_path_factory.mktemp("process-migrate")
    memhog = workload.build_memhog(base / "memhog")
    with TwoHosts(base / "h") as two:
        options = two.b.start_sshd(port=SSH_PORT, own_pids=True)
        yield Apart(two, [*options, "-o", "ServerAliveInterval=1",
                          "-o", "ServerAliveCountMax=3"], memhog)


@dataclass
class Memhog:
    """memhog as a plain process on host A; its stdout (a pipe) read on a thread."""

    child: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.child.stdout is not None
        for raw in self.child.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.lines)


@dataclass
class Move:
    """One migration's ends: memhog on A, ctrmig's environment on A, B's ctrmig."""

    apart: Apart
    tmp: Path
    memhog: Memhog | None = None

    @property
    def address(self) -> str:
        return f"ssh://root@{self.apart.hosts.b.address}:{SSH_PORT}"

    @property
    def remote_command(self) -> str:
        # B's own locks, as another machine's /run would hold them: a process's lock is
        # named by its PID, the same on both ends
        return (f"env CTRMIG_PROCESS_STATE_DIR={self.tmp / 'b'} "
                f"CTRMIG_LOCK_DIR={self.tmp / 'b-locks'} {CTRMIG}")

    def on_b(self, *args: str) -> str:
        """``ctrmig ARGS --engine process`` on B, as its admin would run it there."""
        argv = [*self.apart.hosts.b.own_pids_prefix(), *shlex.split(self.remote_command),
                *args, "--engine", "process"]
        return proc.output(argv, timeout=60)

    def start(self, mib: int = MIB) -> str:
        a = self.apart.hosts.a
        child = proc.spawn([*services.netns_prefix(a.netns), str(self.apart.memhog),
                            str(mib), "7"], stdout=subprocess.PIPE)
        self.memhog = Memhog(child)
        threading.Thread(target=self.memhog.read, daemon=True).start()
        wait_for(lambda: workload.health(self.memhog_text()).rounds > 2, timeout=120,
                 what="memhog filled and verifying on A")
        return str(child.pid)

    def memhog_text(self) -> str:
        assert self.memhog is not None
        return self.memhog.text()

    def migrate(self, name: str, *flags: str) -> subprocess.Popen[bytes]:
        return self.ctrmig("migrate", name, "--from", "process",
                           "--to", f"process+{self.address}", "--json", *flags)

    def ctrmig(self, *args: str) -> subprocess.Popen[bytes]:
        """``ctrmig ARGS`` on host A."""
        env = {**os.environ, "CTRMIG_PROCESS_STATE_DIR": str(self.tmp / "a"),
               "CTRMIG_JOURNAL_DIR": str(self.tmp / "journal"),
               "CTRMIG_SSH_OPTIONS": " ".join(self.apart.ssh_options),
               "CTRMIG_REMOTE_COMMAND": self.remote_command}
        argv = [*services.netns_prefix(self.apart.hosts.a.netns), CTRMIG, *args]
        return proc.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def names_on_b(self) -> list[str]:
        return [str(c["name"]) for c in json.loads(self.on_b("ls", "--all", "--json"))]

    def running_on_a(self) -> bool:
        """memhog runs on A (not ended, not stopped) and verifies on."""
        assert self.memhog is not None
        if self.memhog.child.poll() is not None:
            return False
        rounds = workload.health(self.memhog_text()).rounds
        wait_for(lambda: workload.health(self.memhog_text()).rounds > rounds + 2,
                 timeout=60, what="memhog verifying on A")
        return not workload.health(self.memhog_text()).corrupt

    def close(self) -> None:
        set_link(self.apart.hosts, up=True)
        for name in self.names_on_b():
            self.on_b("rm", name)
        if self.memhog is not None:
            proc.stop(self.memhog.child, timeout=5)


@pytest.fixture
def move(apart: Apart, tmp_path: Path) -> Iterator[Move]:
    m = Move(apart, tmp_path)
    try:
        yield m
    finally:
        m.close()
    assert not list((tmp_path / "journal").glob("*.json")), "a journal was left behind"


def moved_intact(move: Move, name: str, *flags: str) -> dict[str, object]:
    """Migrate memhog ``name`` A -> B with ``flags``: it ended on A, runs on B under its
    PID, and completes two more full verifications there; the report."""
    before = workload.health(move.memhog_text())
    code, out, err = finished(move.migrate(name, "--allow-privileged", *flags))
    assert code == 0, err
    assert "the target's relay reported" not in err, err  # the pages' sha256 compared
    report: dict[str, object] = json.loads(out)
    assert move.memhog is not None
    assert move.memhog.child.wait(timeout=60) != 0  # ended by the move, not by itself
    assert move.names_on_b() == [name]
    assert int(str(report["bytes_moved"])) > MIB << 20  # the pages crossed the link

    def verified() -> bool:
        text = move.on_b("logs", name)
        h = workload.health(text)
        assert not h.corrupt, text[-2000:]
        return h.last_round > before.last_round and h.last_pass >= before.last_pass + 2
    wait_for(verified, timeout=120, what=f"memhog {name} verifying its memory on B")
    return report


def test_direct_route_between_pid_spaces(move: Move) -> None:
    report = moved_intact(move, move.start(), "--route", "direct")
    assert report["route"] == "direct"


def test_post_copy_between_pid_spaces(move: Move) -> None:
    criu.require_post_copy()
    report = moved_intact(move, move.start(), "--lazy-pages")
    assert report["route"] == "post-copy"


def finished(child: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=300)
    return child.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_refused_without_allow_privileged_before_anything_froze(move: Move) -> None:
    """A plain process's archive asks for more than a container has: without the flag
    the move is refused up front, and memhog runs on at A."""
    name = move.start(16)
    code, _, err = finished(move.migrate(name, "--lazy-pages"))
    assert code != 0 and "--allow-privileged" in err, err
    assert "Traceback" not in err, err
    assert move.running_on_a()
    assert move.names_on_b() == []


def test_link_breaks_mid_post_copy(move: Move) -> None:
    """The veth goes down while B runs on part of its memory: B's copy ends, and memhog
    runs on at A, once, memory intact."""
    criu.require_post_copy()
    name = move.start(256)  # at 40 Mbit/s its pages take ~50 s to fetch
    code, err = interrupted(move, move.migrate(name, "--allow-privileged", "--lazy-pages"),
                            lambda: name in move.names_on_b(), "memhog running on B",
                            cut=True)
    assert code == 1, err
    assert "Traceback" not in err, err
    runs_on_a_only(move)


def test_page_stream_breaks_mid_dump(move: Move) -> None:
    """The link goes down while the pages stream (pre-copy, the dump itself): the dump
    fails, and memhog, stopped for it, runs on at A."""
    name = move.start(128)
    base = tx_bytes(move.apart.hosts)
    code, err = interrupted(move, move.migrate(name, "--allow-privileged", "--route", "direct"),
                            lambda: tx_bytes(move.apart.hosts) - base > 8 << 20,
                            "pages on the wire", cut=True)
    assert code == 1, err
    assert "Traceback" not in err, err
    runs_on_a_only(move)


def test_killed_mid_post_copy_then_recover(move: Move) -> None:
    """SIGKILL of ``ctrmig migrate`` while B runs on lazy pages: B's cut-off copy ends,
    and ``ctrmig recover`` finds memhog running once, at A, memory intact."""
    criu.require_post_copy()
    name = move.start(256)
    interrupted(move, move.migrate(name, "--allow-privileged", "--lazy-pages"),
                lambda: name in move.names_on_b(), "memhog running on B", cut=False)
    code, out, err = finished(move.ctrmig("recover"))
    assert code == 0, out + err
    runs_on_a_only(move)


def test_killed_while_stopped_then_recover(move: Move) -> None:
    """SIGKILL of ``ctrmig migrate`` while memhog is held stopped for the direct route
    (its pages sent, its memory still whole on A): ``ctrmig recover`` continues it."""
    name = move.start(32)  # its pages take ~7 s at 40 Mbit/s
    interrupted(move, move.migrate(name, "--allow-privileged", "--route", "direct"),
                lambda: proc.state(int(name)) == "T", "memhog held stopped", cut=False)
    code, out, err = finished(move.ctrmig("recover"))
    assert code == 0, out + err
    assert "rolled back" in out + err, out + err
    runs_on_a_only(move)


@pytest.mark.parametrize("lazy", [True, False], ids=["post-copy", "pre-copy"])
def test_ctrl_c_while_the_pages_stream(move: Move, lazy: bool) -> None:
    """SIGINT (Ctrl-C) to ``ctrmig migrate`` while the pages cross: it rolls back (B's
    copy, if it ran, ends) and exits non-zero; memhog runs on at A."""
    if lazy:
        criu.require_post_copy()
    name = move.start(64)
    base = tx_bytes(move.apart.hosts)
    code, err = interrupted(
        move, move.migrate(name, "--allow-privileged",
                           *(["--lazy-pages"] if lazy else ["--route", "direct"])),
        lambda: tx_bytes(move.apart.hosts) - base > 8 << 20, "pages on the wire",
        cut=False, sig=signal.SIGINT)
    assert code != 0, err
    assert "Traceback" not in err, err
    runs_on_a_only(move)


def interrupted(move: Move, child: subprocess.Popen[bytes], ready: Callable[[], object],
                what: str, *, cut: bool, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Let ``child`` run over the slowed link until ``ready``, then take the link down
    (``cut``) or send the child ``sig``; its exit code and stderr."""
    with slow_link(move.apart.hosts, "40mbit"):
        try:
            assert wait_until(child, ready, what), f"the move ended before {what}"
            if cut:
                set_link(move.apart.hosts, up=False)
            else:
                child.send_signal(sig)
            return wait_exit(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            set_link(move.apart.hosts, up=True)


def runs_on_a_only(move: Move) -> None:
    """memhog runs on A only; B's ctrmig dropped whatever pages it had received."""
    wait_for(lambda: move.names_on_b() == [], timeout=90, what="B's cut-off copy ended")
    assert move.running_on_a()
    assert move.names_on_b() == []
    # B's sshd ends a session whose client is gone within seconds (ClientAlive*); B's
    # ctrmig has the session's TMPDIR (tests/conftest.py, tests/hosts.py)
    b_tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    wait_for(lambda: not list(b_tmp.glob("ctrmig-pages-*")),
             timeout=60, what="B's page receiver dropping its pages")
