"""Concurrency: many containers at once on one engine, and one container twice at once.

- 8 checkpoint -> remove -> restore cycles of different containers run in parallel on one
  podman service, and on one runc state dir: all succeed, every counter counts on.
- A second checkpoint or migration of a container that a first one is working on gets
  a clear BusyError, without touching the container: the first one proceeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig import locks
from ctrmig.engines.runc import RuncMigrator
from ctrmig.errors import BusyError
from tests.conftest import COUNTER_CMD, first_count, last_count, unique, wait_for

PARALLEL = 8
CTRMIG = str(Path(sys.executable).with_name("ctrmig"))
# The counter beside 128 MiB of memory: a checkpoint that holds its lock for a moment.
MEMORY_CMD = ["/bin/sh", "-c", "(head -c 134217728 /dev/urandom; sleep 100000) | "
              f"tail -c 134217728 > /dev/null & sleep 3; {COUNTER_CMD[2]}"]


def _counting(logs: Callable[[], str], above: int = 0) -> int:
    wait_for(lambda: last_count(logs()) > above + 3, timeout=120,
             what=f"counting past {above + 3}")
    return last_count(logs())


# --- many containers in parallel ----------------------------------------------------------


@pytest.fixture
def podman_names(podman_socket: Path) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    for c in client.containers.list(all=True):
        if c.name in names:
            c.remove(force=True)
    client.close()
    for name in names:
        locks.lock_path("podman", name, f"unix://{podman_socket}").unlink(missing_ok=True)


def test_parallel_podman_cycles(podman_socket: Path, test_image: str, tmp_path: Path,
                                podman_names: list[str]) -> None:
    url = f"unix://{podman_socket}"

    def cycle(i: int) -> tuple[str, int, int]:
        name = unique(f"ctrmig-par{i}")
        podman_names.append(name)
        client = PodmanClient(base_url=url)
        m = ctrmig.migrator("podman", url=url)  # one client per thread
        try:
            client.containers.run(test_image, COUNTER_CMD, name=name, detach=True,
                                  network_mode="none")
            logs = lambda: m.logs(name)  # noqa: E731
            _counting(logs)
            archive = m.checkpoint(name, tmp_path / f"{name}.tar", compression="none")
            at_dump = last_count(logs())
            m.remove(name)
            assert m.restore(archive.path) == name  # type: ignore[arg-type]
            return name, at_dump, _counting(logs, above=at_dump)
        finally:
            m.close()
            client.close()

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(cycle, range(PARALLEL)))
    assert len({name for name, _, _ in results}) == PARALLEL
    for name, at_dump, now in results:
        assert now > at_dump, name
    m = ctrmig.migrator("podman", url=url)
    running = {c.name for c in m.list() if c.state.lower() == "running"}
    m.close()
    assert {name for name, _, _ in results} <= running


def test_parallel_runc_cycles(runc_state: RuncMigrator, test_image: str,
                              tmp_path: Path) -> None:
    m = runc_state

    def cycle(i: int) -> tuple[str, int, int]:
        name = m.run(test_image, name=unique(f"ctrmig-par{i}"), command=COUNTER_CMD)
        logs = lambda: m.logs(name)  # noqa: E731
        _counting(logs)
        archive = m.checkpoint(name, tmp_path / f"archive-{i}.tar")
        at_dump = last_count(logs())
        m.remove(name)
        restored = m.restore(archive.path)  # type: ignore[arg-type]
        assert restored == name
        now = _counting(logs, above=at_dump)
        assert first_count(logs()) > 1, "restored, not started again"
        return name, at_dump, now

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(cycle, range(PARALLEL)))
    for name, at_dump, now in results:
        assert now > at_dump, name
    assert sorted((c.name, c.state) for c in m.list()) == sorted(
        (name, "running") for name, _, _ in results)


# --- one container, twice at once ----------------------------------------------------------


def _flock_held(path: Path) -> bool:
    """Whether some process holds a flock on ``path`` (read from /proc/locks: probing
    with flock ourselves could make the real holder fail)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and any(f.endswith(f":{inode}") for f in fields):
            return True
    return False


def test_same_container_twice_at_once(runc_state: RuncMigrator, test_image: str,
                                      tmp_path: Path) -> None:
    """A `ctrmig checkpoint` runs; a second checkpoint and a migration of the same container
    get BusyError and change nothing; the first completes and its archive restores."""
    m = runc_state
    name = m.run(test_image, name=unique("ctrmig-busy"), command=MEMORY_CMD)
    before = _counting(lambda: m.logs(name))
    lock = locks.lock_path("runc", name, m.lock_scope)
    first_archive = tmp_path / "first.tar"
    env = {**os.environ, "CTRMIG_RUNC_STATE_DIR": str(m.state_dir),
           "CTRMIG_LOCK_DIR": str(locks.lock_dir())}
    first = subprocess.Popen([CTRMIG, "checkpoint", name, "-o", str(first_archive),
                              "--engine", "runc"], env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _flock_held(lock) or first.poll() is not None, timeout=60,
                 what="the first checkpoint to hold the lock")
        assert first.poll() is None, "the first checkpoint ended before it could be raced"
        first.send_signal(signal.SIGSTOP)  # hold it inside its locked section
        try:
            with pytest.raises(BusyError) as err:
                m.checkpoint(name, tmp_path / "second.tar")
            assert "busy" in str(err.value) and name in str(err.value)
            assert "wait for it to finish" in str(err.value)
            target = RuncMigrator(state_dir=tmp_path / "target", workdir=tmp_path)
            with pytest.raises(BusyError):
                ctrmig.migrate(name, source=m, target=target)
            assert target.list() == []
            assert not (tmp_path / "second.tar").exists()
        finally:
            first.send_signal(signal.SIGCONT)
        _, err_text = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err_text.decode()
    # The first one did its whole job: the container stopped at the dump, and restores.
    assert [(c.name, c.state) for c in m.list()] == [(name, "checkpointed")]
    m.remove(name)
    assert m.restore(first_archive) == name
    assert _counting(lambda: m.logs(name), above=before) > before
