"""recover()'s patience with a source whose checkpoint the engine is still saving, and
migrate()'s choice of error when both sides failed (pure logic, fake migrators)."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest
import tenacity

from ctrmig.errors import ArchiveCorruptError, BusyError, CheckpointError, RestoreError
from ctrmig.protocol import ContainerInfo
from tests.support import override_settings

mig = importlib.import_module("ctrmig.migrate")  # the module: ctrmig.migrate is a function
rec = importlib.import_module("ctrmig.recovery")


class FlakyResume:
    engine = "fake"

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def resume(self, container: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise CheckpointError("descriptors.json: no such file or directory")


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "RESUME_WAIT", tenacity.wait_none())


def test_resume_retries_until_the_checkpoint_is_saved(caplog: pytest.LogCaptureFixture) -> None:
    m = FlakyResume(failures=2)
    rec._resume_when_ready(m, "c")  # type: ignore[arg-type]
    assert m.calls == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_resume_gives_up_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "RESUME_PATIENCE", 0.0)
    m = FlakyResume(failures=100)
    with pytest.raises(CheckpointError):
        rec._resume_when_ready(m, "c")  # type: ignore[arg-type]
    assert m.calls == 1


def test_the_side_that_failed_first_is_reported() -> None:
    # The source failed on its own: the target then only saw a cut-off archive.
    assert mig._source_failed_first(BusyError("busy"), ArchiveCorruptError("empty file"))
    # The target failed: the source then wrote into a closed pipe.
    assert not mig._source_failed_first(BrokenPipeError(32, "Broken pipe"),
                                        RestoreError("no space left on device"))
    wrapped = CheckpointError("write failed")
    wrapped.__cause__ = BrokenPipeError(32, "Broken pipe")
    assert not mig._source_failed_first(wrapped, RestoreError("name in use"))
    # Ctrl-C is what happened, whatever the source said after it.
    assert not mig._source_failed_first(BusyError("busy"), KeyboardInterrupt())


# --- recover() after the point of no return ----------------------------------------------


class Host:
    """A fake engine whose containers' states change on a schedule of list() calls."""

    def __init__(self, engine: str, states: dict[str, list[str | None]]):
        self.engine = engine
        self.states = states
        self.removed: list[str] = []
        self.resumed: list[str] = []

    def close(self) -> None:
        """recover() closes the engines it connected (Migrator.close)."""

    def list(self) -> list[ContainerInfo]:
        rows = []
        for name, schedule in self.states.items():
            state = schedule.pop(0) if len(schedule) > 1 else schedule[0]
            if state is not None:
                rows.append(ContainerInfo(self.engine, name, name, "img", state))
        return rows

    def remove(self, container: str) -> None:
        self.removed.append(container)

    def resume(self, container: str) -> None:
        self.resumed.append(container)


def _journal(tmp_path: Path, **data: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "web-1234.json"
    path.write_text(json.dumps({"container": "web", "name": "web", "from": "src", "to": "dst",
                                "keep_source": False, "pid": 999999999, "start": 1,
                                "phase": "migrating", **data}))
    return tmp_path


def _hosts(monkeypatch: pytest.MonkeyPatch, source: Host, target: Host) -> None:
    monkeypatch.setattr(rec.endpoints, "connect",
                        lambda spec: {"src": source, "dst": target}[spec])
    monkeypatch.setattr(rec.time, "sleep", lambda s: None)
    monkeypatch.setattr(rec.scratch, "sweep", lambda: [])  # not the host's TMPDIR


def test_a_committed_target_that_appears_late_is_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """podman got the whole upload: recover watches for the container instead of resuming
    the source beside it."""
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": [None, None, None, "running"]})
    _hosts(monkeypatch, source, target)
    done = rec.recover(_journal(tmp_path, phase="committed", helpers=[]))
    assert done == ["web: finished; it runs on dst as web"]
    assert source.removed == ["web"] and source.resumed == [] and target.removed == []


def test_a_committed_target_still_created_is_watched_until_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """podman 5.4 lists a container it is importing as created until CRIU restored it:
    removing it then would roll back a migration that is about to finish."""
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": ["created", "created", "created", "running"]})
    _hosts(monkeypatch, source, target)
    done = rec.recover(_journal(tmp_path, phase="committed", helpers=[]))
    assert done == ["web: finished; it runs on dst as web"]
    assert target.removed == [] and source.removed == ["web"]


def test_a_committed_target_left_created_is_removed_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": ["created"]})
    _hosts(monkeypatch, source, target)
    override_settings(monkeypatch, recover_grace=0.0)
    done = rec.recover(_journal(tmp_path, phase="committed", helpers=[]))
    assert done == ["web: rolled back; it runs on src"]
    assert target.removed == ["web"] and source.resumed == ["web"]


def test_a_committed_target_that_never_appears_is_rolled_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": [None]})
    _hosts(monkeypatch, source, target)
    override_settings(monkeypatch, recover_grace=0.0)
    done = rec.recover(_journal(tmp_path, phase="committed", helpers=[]))
    assert done == ["web: rolled back; it runs on src"]
    assert source.resumed == ["web"]


def test_before_the_commit_an_absent_target_is_not_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": [None, "running"]})  # would come, were it committed
    _hosts(monkeypatch, source, target)
    done = rec.recover(_journal(tmp_path, phase="migrating"))
    assert done == ["web: rolled back; it runs on src"]


def test_an_ssh_session_still_carrying_the_restore_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The killed ctrmig's ssh lives until ctrmig on the target host has restored."""
    ssh = subprocess.Popen(["sleep", "0.5"])
    source = Host("runc", {"web": ["stopped"]})
    target = Host("runc", {"web": [None]})
    _hosts(monkeypatch, source, target)

    def ssh_alive(pid: int) -> bool:
        if ssh.poll() is None:
            return True
        target.states["web"] = ["running"]  # what the remote ctrmig made meanwhile
        return False

    monkeypatch.setattr(rec.proc, "alive", ssh_alive)
    monkeypatch.setattr(rec.proc, "start_time", lambda pid: 42)
    journal = _journal(tmp_path, phase="committed", helpers=[{"pid": ssh.pid, "start": 42}])
    done = rec.recover(journal)
    ssh.wait()
    assert done == ["web: finished; it runs on dst as web"]
    assert source.removed == ["web"] and source.resumed == []


def test_two_recovers_never_act_on_one_migration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrmig import locks

    override_settings(monkeypatch, lock_dir=tmp_path / "locks")
    source = Host("podman", {"web": ["exited"]})
    target = Host("podman", {"web": [None]})
    _hosts(monkeypatch, source, target)
    journal = _journal(tmp_path / "journal")
    with locks.container_lock("journal", "web-1234", str(journal.absolute()), "recovering"):
        assert rec.recover(journal) == ["web-1234: being recovered by another ctrmig"]
    assert source.resumed == [] and (journal / "web-1234.json").exists()
    assert rec.recover(journal) == ["web: rolled back; it runs on src"]
    assert source.resumed == ["web"]


def test_pages_a_killed_direct_migration_left_on_the_target_are_discarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-copy pages wait in a directory outside any process's scratch for the restore
    to take them; when none will, recover removes them (they are the container's memory)."""
    received = tmp_path / "tmp" / "ctrmig-pages-abc"
    received.mkdir(parents=True)
    (received / "pages-1.img").write_bytes(b"secret memory")
    source = Host("runc", {"web": ["paused"]})
    target = Host("runc", {"web": [None]})
    _hosts(monkeypatch, source, target)
    done = rec.recover(_journal(tmp_path / "journals", pages_dir=str(received)))
    assert done == ["web: rolled back; it runs on src"]
    assert not received.exists()


class DockerHost(Host):
    def __init__(self, states: dict[str, list[str | None]]):
        super().__init__("docker", states)
        self.volumes_removed: list[str] = []

    def remove_volumes(self, names: list[str]) -> None:
        self.volumes_removed += names


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_docker_migration_takes_its_named_volumes_along(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    """As migrate() does when it ends well: the volumes whose content went along leave the
    source with the container (kept with keep_source), even if the container went first."""
    source = DockerHost({"web": [None]})  # the killed ctrmig had removed the container
    target = Host("docker", {"web": ["running"]})
    _hosts(monkeypatch, source, target)
    done = rec.recover(_journal(tmp_path, phase="committed", helpers=[], keep_source=keep,
                                volumes=["data"]))
    assert done == ["web: finished; it runs on dst as web"]
    assert source.volumes_removed == ([] if keep else ["data"])
