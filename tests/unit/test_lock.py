"""The per-container lock: one holder at a time, no lock files left behind, and what a
held lock tells ``ctrmig ls`` and ``ctrmig recover``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ctrmig import locks
from ctrmig.engines.base import listing
from ctrmig.errors import BusyError
from ctrmig.protocol import ContainerInfo
from tests.support import override_settings


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    override_settings(monkeypatch, lock_dir=tmp_path)
    return tmp_path


def test_second_holder_is_refused_and_lock_file_removed(lock_dir: Path) -> None:
    with locks.container_lock("podman", "web/1"):
        with pytest.raises(BusyError, match="busy"), locks.container_lock("podman", "web/1"):
            pass
        with locks.container_lock("podman", "other"):  # another container is independent
            pass
    assert list(lock_dir.iterdir()) == []
    with locks.container_lock("podman", "web/1"):  # free again
        pass


def test_each_engine_instance_has_its_own_locks() -> None:
    """Two podman hosts may both hold a ``web``: a migration checkpoints one while it
    restores the other, in one process."""
    with locks.container_lock("podman", "web", "unix:///a.sock", "checkpointing"), \
            locks.container_lock("podman", "web", "tcp://10.0.0.2:8791", "restoring"):
        assert locks.operations("podman", "unix:///a.sock") == {"web": "checkpointing"}
        assert locks.operations("podman", "tcp://10.0.0.2:8791") == {"web": "restoring"}
        assert locks.operations("podman") == {}
        assert locks.operations("runc", "unix:///a.sock") == {}
    assert locks.operations("podman", "unix:///a.sock") == {}


def test_a_dead_holders_lock_file_is_not_an_operation(lock_dir: Path) -> None:
    """A killed ctrmig leaves its lock file: its PID is gone (or another process's now)."""
    child = subprocess.Popen(["true"])
    child.wait()
    path = locks.lock_path("runc", "web", "/state")
    path.write_text(json.dumps({"container": "web", "operation": "restoring",
                                "pid": child.pid, "start": 1}))
    (lock_dir / "runc-garbage.lock").write_text("{not json")
    assert locks.operations("runc", "/state") == {}
    with locks.container_lock("runc", "web", "/state", "restoring"):  # and it is free
        assert locks.operations("runc", "/state") == {"web": "restoring"}


class _Listed:
    """A migrator whose lock shows through ``listing``: one container exists, one arrives."""

    engine = "runc"

    def list(self) -> list[ContainerInfo]:
        return [ContainerInfo("runc", "db", "id1", "img", "running"),
                ContainerInfo("runc", "web", "id2", "img", "running")]


def test_listing_shows_operations_under_way() -> None:
    from ctrmig.engines.runc import RuncMigrator

    m = RuncMigrator.__new__(RuncMigrator)  # only engine, list and lock_scope are used
    m.state_dir = Path("/state")
    m.list = _Listed().list  # type: ignore[method-assign]
    with locks.container_lock("runc", "web", "/state", "checkpointing"), \
            locks.container_lock("runc", "new", "/state", "restoring"):
        rows = {r.name: r.state for r in listing(m)}
    assert rows == {"db": "running", "web": "checkpointing", "new": "restoring"}
    assert {r.name: r.state for r in listing(m)} == {"db": "running", "web": "running"}
