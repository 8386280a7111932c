"""recover()'s patience with a source whose checkpoint the engine is still saving, and
migrate()'s choice of error when both sides failed (pure logic, fake migrators)."""

from __future__ import annotations

import importlib

import pytest
import tenacity

from ctrmig.errors import ArchiveCorruptError, BusyError, CheckpointError, RestoreError

mig = importlib.import_module("ctrmig.migrate")  # the module: ctrmig.migrate is a function


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
    monkeypatch.setattr(mig, "RESUME_WAIT", tenacity.wait_none())


def test_resume_retries_until_the_checkpoint_is_saved(caplog: pytest.LogCaptureFixture) -> None:
    m = FlakyResume(failures=2)
    mig._resume_when_ready(m, "c")  # type: ignore[arg-type]
    assert m.calls == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_resume_gives_up_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mig, "RESUME_PATIENCE", 0.0)
    m = FlakyResume(failures=100)
    with pytest.raises(CheckpointError):
        mig._resume_when_ready(m, "c")  # type: ignore[arg-type]
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
