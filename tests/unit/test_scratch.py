"""Each CLI process's private scratch directory, and recover's sweep of dead ones'."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from ctrmig.host import mounts, proc, scratch


@pytest.fixture
def tmpdir_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _scratch_of(pid: int, start: int | None, namespace: int | None = None) -> str:
    ns = namespace if namespace is not None else os.stat("/proc/self/ns/pid").st_ino
    return f"{scratch.PREFIX}{ns}.{pid}.{start}"


def test_temporary_files_go_into_a_private_directory_removed_at_the_end(
        tmpdir_base: Path) -> None:
    with scratch.private() as directory:
        assert directory.parent == tmpdir_base and directory.stat().st_mode & 0o777 == 0o700
        with tempfile.NamedTemporaryFile() as f:
            assert Path(f.name).parent == directory
        assert scratch.base() == tmpdir_base
        with scratch.private() as inner:  # nested: the same directory
            assert inner == directory
        (directory / "spool.tar").write_bytes(b"memory")
    assert not directory.exists() and Path(tempfile.gettempdir()) == tmpdir_base


def test_sweep_removes_only_dead_processes_scratch_of_this_pid_namespace(
        tmpdir_base: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # its PID is gone now
    me = os.getpid()
    dead = tmpdir_base / _scratch_of(child.pid, 1)
    reused = tmpdir_base / _scratch_of(me, 1)  # this PID, but an earlier process
    alive = tmpdir_base / _scratch_of(me, proc.start_time(me))
    foreign = tmpdir_base / _scratch_of(child.pid, 1, namespace=1)
    other = tmpdir_base / "ctrmig-scratch.not-ours"
    for d in (dead, reused, alive, foreign, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "pages.img").write_bytes(b"x")
    assert sorted(scratch.sweep()) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and foreign.exists() and other.exists()


def test_sweep_never_deletes_through_a_mount(tmpdir_base: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dead = tmpdir_base / _scratch_of(2**22 + 1, 1)  # above pid_max's default: never alive
    (dead / "rootfs").mkdir(parents=True)
    monkeypatch.setattr(mounts, "mounts_under", lambda path: [path / "rootfs"])
    assert scratch.sweep() == []
    assert (dead / "rootfs").exists()
