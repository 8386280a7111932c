"""A migration freezes the source only once a target that says when it is ready (ctrmig
over ssh, RestoreOptions.on_ready) is: pure logic of ctrmig.migrate with fake ends (the
real route over ssh is in tests/integration/test_postcopy.py and test_failures.py)."""

from __future__ import annotations

import importlib
import io
import time
from types import SimpleNamespace
from typing import Any, BinaryIO

import pytest

from ctrmig.engines.remote import RemoteMigrator
from ctrmig.errors import READY_LINE, RUNNING_LINE, RestoreError
from ctrmig.options import CheckpointOptions, RestoreOptions

# ctrmig.migrate the module (the package exports the function of that name)
migrate_module = importlib.import_module("ctrmig.migrate")


class Source:
    engine = "fake"

    def __init__(self) -> None:
        self.checkpointed_at: float | None = None
        self.removed: list[str] = []

    def checkpoint(self, container: str, out: BinaryIO, options: CheckpointOptions,
                   progress: object = None) -> Any:
        self.checkpointed_at = time.monotonic()
        out.write(b"an archive")
        return SimpleNamespace(manifest=SimpleNamespace(extra={}))

    def remove(self, container: str) -> None:
        self.removed.append(container)

    def resume(self, container: str) -> None:
        raise AssertionError("nothing to roll back")


class Target:
    engine = "fake"
    signals_ready = True

    def __init__(self, *, delay: float = 0.3, fail: bool = False, silent: bool = False):
        self.delay, self.fail, self.silent = delay, fail, silent
        self.ready_at: float | None = None

    def restore(self, archive: BinaryIO, options: RestoreOptions) -> str:
        time.sleep(self.delay)  # ctrmig's start over there
        if self.fail:
            raise RestoreError("ctrmig restore on the target failed: no such engine")
        if not self.silent:
            self.ready_at = time.monotonic()
            assert options.on_ready is not None
            options.on_ready()
        assert archive.read() == b"an archive"
        return "restored"


def migrate(source: Source, target: Target) -> Any:
    return migrate_module._migrate("web", source, target, False,  # type: ignore[arg-type]
                                   CheckpointOptions(), RestoreOptions())


def test_the_source_freezes_once_the_target_is_ready() -> None:
    source, target = Source(), Target()
    report = migrate(source, target)
    assert target.ready_at is not None and source.checkpointed_at is not None
    assert source.checkpointed_at >= target.ready_at
    # the target's start is not downtime: it was before the freeze
    assert report.downtime_s < report.total_s - 0.2
    assert source.removed == ["web"]


def test_a_target_failing_before_it_is_ready_leaves_the_source_untouched() -> None:
    source = Source()
    with pytest.raises(RestoreError, match="no such engine"):
        migrate(source, Target(fail=True))
    assert source.checkpointed_at is None and source.removed == []


def test_a_target_that_never_says_ready_is_waited_for_only_so_long(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(migrate_module, "READY_TIMEOUT", 0.2)
    source = Source()
    assert migrate(source, Target(delay=0.0, silent=True)).target_name == "restored"
    assert "did not say it was ready" in caplog.text


def test_other_targets_are_not_waited_for() -> None:
    source, target = Source(), Target(delay=0.0)
    target.signals_ready = False  # a local engine: nothing to start over there
    seen: list[object] = []

    def restore(archive: BinaryIO, options: RestoreOptions) -> str:
        seen.append(options.on_ready)
        assert archive.read() == b"an archive"
        return "restored"

    target.restore = restore  # type: ignore[method-assign]
    migrate(source, target)
    assert seen == [None]


# --- post-copy: the downtime ends when the target says its restore runs --------------


class LazyTarget(Target):
    """A lazy-pages restore: it runs (on_running), then returns only once its pages came."""

    def restore(self, archive: BinaryIO, options: RestoreOptions) -> str:
        assert options.on_ready is not None and options.on_running is not None
        options.on_ready()
        assert archive.read() == b"an archive"
        options.on_running()
        self.ready_at = time.monotonic()  # here: when it said it runs
        time.sleep(self.delay)  # its pages arriving
        return "restored"


def test_post_copy_downtime_ends_when_the_target_runs_not_when_its_pages_came() -> None:
    source, target = Source(), LazyTarget(delay=0.2)
    options, resumed = migrate_module._told_running(RestoreOptions(lazy_pages=True))
    before = time.monotonic()
    report = migrate_module._migrate("web", source, target, False,  # type: ignore[arg-type]
                                     CheckpointOptions(), options, resumed=resumed)
    assert target.ready_at is not None
    # ordering only: the downtime ends at on_running, before the restore returned
    assert report.downtime_s <= target.ready_at - before
    assert report.downtime_s + report.restore_s <= report.total_s


def test_the_remote_ctrmig_s_running_line_reaches_on_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RemoteMigrator reads the remote restore's stderr lines: ready, running, errors."""
    remote = RemoteMigrator("runc", "ssh://nowhere.invalid", remote_command="ctrmig")
    said = (f"echo {READY_LINE} >&2; cat >/dev/null; echo other >&2; "
            f"echo {RUNNING_LINE} >&2; echo '{{\"name\": \"x\"}}'")
    # the remote side, run here: a shell saying what ctrmig there says
    monkeypatch.setattr(remote, "_argv", lambda *args, **kw: ["sh", "-c", said])
    seen: list[str] = []
    opts = RestoreOptions(lazy_pages=True, on_ready=lambda: seen.append("ready"),
                          on_running=lambda: seen.append("running"))
    assert remote.restore(io.BytesIO(b"an archive"), opts) == "x"
    assert seen == ["ready", "running"]
