"""The Migrator contract, one body per point, run against every engine (issue 13).

Each test takes ``harness`` (tests/contract/conftest.py) and so runs on podman, docker,
runc and plain processes, and where it applies on runc driven by ctrmig over ssh. The
workload is a counter: memory (the shell's variable) and a file written after start
(/state.txt in its rootfs) must come back, and the count must go on, not start again.
Engine quirks stay in tests/integration.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import pytest

import ctrmig
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    ContainerNotFoundError,
    CtrmigError,
    NameInUseError,
    OptionError,
    RestoreError,
)
from tests.conftest import wait_for
from tests.contract.conftest import (
    Harness,
    Side,
    assert_continued,
    engine_options,
    engines,
    rewrite_archive,
    supported_options,
)

STATE = ("/state.txt", "written-after-start\n")


def assert_state_file(side: Side, name: str) -> None:
    if side.read_file is not None:  # a plain process has no rootfs of its own
        assert side.read_file(name, STATE[0]) == STATE[1]


def assert_no_archive(path: Path) -> None:
    assert not path.exists(), f"{path} was left behind"
    assert not list(path.parent.glob(f"{path.name}.*")), "a partial archive was left behind"


def assert_ran_on(side: Side, name: str, since: int = 0, after: str = "") -> None:
    """``name`` runs, and its one counter went on past ``since`` without a restart
    (``after``: what happened to it before, for the failure's message)."""
    # Listed as running within 10 s: twice in ~50 suite runs dockerd did not list it
    # right after a refused checkpoint (not reproduced in 52 tries, alone or beside 4
    # CPU burners).
    # A container that stopped and started again fails the counter check below.
    try:
        wait_for(lambda: side.running(name), timeout=10, what=f"{name} listed as running")
    except AssertionError:
        states = [(c.name, c.state) for c in side.m.list() if name in (c.name, c.id)]
        pytest.fail(f"{name} is not running (listed as {states}) after: {after}")
    side.wait_counting(name, above=since)
    seen = side.counts(name)
    assert seen == list(range(1, len(seen) + 1)), f"a gap or a restart: {seen}"


@engines("podman", "docker", "runc", "runc-ssh", "process")
def test_round_trip_keeps_memory_and_files(harness: Harness) -> None:
    """checkpoint stops the container; restore brings it back under its recorded name,
    counting on from exactly the next number, its rootfs file intact."""
    side = harness.side
    name = side.start()
    archive = side.m.checkpoint(name, harness.tmp / "c.tar")
    assert archive.path is not None
    assert archive.manifest.engine == side.m.engine
    assert archive.manifest.container.name == name
    assert archive.manifest.memory_bytes > 0
    assert "checkpoint/inventory.img" in archive.manifest.files
    if side.read_file is not None:
        assert "rootfs-diff.tar" in archive.manifest.files
    stopped_at = side.assert_stopped(name)

    side.m.remove(name)
    assert not side.m.exists(name)
    assert side.m.restore(archive.path, **side.restore_options) == name
    assert side.running(name)
    side.wait_counting(name, above=stopped_at)
    assert_continued(side.counts(name), stopped_at, stopped_at)
    assert_state_file(side, name)


def test_leave_running_keeps_counting_and_the_archive_restores(harness: Harness) -> None:
    side = harness.side
    name = side.start()
    before = side.last(name)
    archive = side.m.checkpoint(name, harness.tmp / "live.tar", leave_running=True)
    after = side.last(name)
    assert archive.path is not None
    assert_ran_on(side, name, since=after)

    side.m.remove(name)
    assert side.m.restore(archive.path, **side.restore_options) == name
    side.wait_counting(name, above=after)
    assert_continued(side.counts(name), before, after)
    assert_state_file(side, name)


def test_failed_checkpoint_leaves_it_running(harness: Harness) -> None:
    """CRIU refuses an established TCP connection (no tcp_established): a clear
    CheckpointError, no archive, and the container never stopped."""
    side = harness.side
    name = side.start(tcp=True)
    before = side.last(name)
    path = harness.tmp / "tcp.tar"
    with pytest.raises(CheckpointError) as refused:
        side.m.checkpoint(name, path)
    assert_no_archive(path)
    error = refused.value
    assert_ran_on(side, name, since=before, after=f"{error} {getattr(error, 'stderr', '')}")


class FullDisk(io.RawIOBase):
    """An archive destination that fails like a full disk after 4 KiB."""

    left = 4096

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return len(data)


def test_failed_archive_write_brings_it_back(harness: Harness) -> None:
    """The archive cannot be written once the container stopped for its dump: the
    container runs on from where it stopped, and no checkpoint is kept to resume."""
    side = harness.side
    name = side.start()
    before = side.last(name)
    with pytest.raises(OSError, match="No space left"):
        side.m.checkpoint(name, FullDisk(), compression="none")  # type: ignore[arg-type]
    assert_ran_on(side, name, since=before)
    with pytest.raises(CheckpointError):
        side.m.resume(name)
    assert_ran_on(side, name, since=side.last(name))


def test_resume_after_checkpoint(harness: Harness) -> None:
    """The rollback of a failed migration: the stopped container runs on in place, once
    (the kept checkpoint is used up)."""
    side = harness.side
    name = side.start()
    side.m.checkpoint(name, harness.tmp / "r.tar")
    stopped_at = side.assert_stopped(name)
    side.m.resume(name)
    assert_ran_on(side, name, since=stopped_at)
    with pytest.raises(CheckpointError):
        side.m.resume(name)
    assert_ran_on(side, name, since=side.last(name))


def test_unknown_container(harness: Harness) -> None:
    side = harness.side
    unknown = side.unknown_name()
    path = harness.tmp / "x.tar"
    with pytest.raises(ContainerNotFoundError):
        side.m.checkpoint(unknown, path)
    assert_no_archive(path)
    with pytest.raises(ContainerNotFoundError):
        side.m.logs(unknown)
    assert not side.m.exists(unknown)
    side.m.remove(unknown)  # already gone: no error


@engines("podman", "docker", "runc", "runc-ssh", "process")
def test_failed_migration_rolls_back(harness: Harness) -> None:
    """The target refuses the restore after the whole archive arrived (its name was
    taken meanwhile): the source runs again, exactly once; the target holds nothing."""
    with harness.migration(False) as mig:
        name = mig.source.start()
        there = {c.name for c in mig.target.m.list()}
        sabotaged: list[int] = []

        def progress(size: int) -> None:
            if not sabotaged:
                sabotaged.append(size)
                mig.sabotage()

        with pytest.raises(CtrmigError):
            ctrmig.migrate(name, source=mig.source.m, target=mig.target.m,
                           name=mig.target_name, progress=progress,
                           restore_options=mig.target.restore_options)
        assert sabotaged, "the source never wrote"
        assert_ran_on(mig.source, name, since=mig.source.last(name))
        # On the target, nothing new but the container that took the name, untouched.
        # (Only this test's names: other runs on this host share podman's default storage.)
        ours = (mig.source.tag, mig.target.tag)
        new = {c.name for c in mig.target.m.list() if c.name.startswith(ours)} - there
        assert new <= {mig.target_name}, f"left on the target: {new}"
        assert not mig.target.running(mig.target_name)
        if new:
            assert "count" not in mig.target.output(mig.target_name), "it was replaced"


@engines("podman", "docker", "runc", "runc-ssh")
def test_migration_carries_the_image(harness: Harness) -> None:
    """ctrmig.migrate() with default options, to a target that lacks the image: the
    image travels in the archive, and the container runs there from where it stopped."""
    with harness.migration(True) as mig:
        name = mig.source.start()
        before = mig.source.last(name)
        pieces: list[int] = []
        report = ctrmig.migrate(name, source=mig.source.m, target=mig.target.m,
                                progress=pieces.append,
                                restore_options=mig.target.restore_options)
        assert report.target_name == name
        assert report.bytes_moved > 0 and len(pieces) > 1  # what a progress bar shows
        assert not mig.source.m.exists(name), "the source is removed"
        assert mig.target.running(name)
        mig.target.wait_counting(name, above=before)
        assert_continued(mig.target.counts(name), before)
        assert_state_file(mig.target, name)


def break_pstree(root: Path) -> None:
    (root / "checkpoint" / "pstree.img").write_bytes(b"\0" * 64)


def test_failed_restore_leaves_nothing(harness: Harness) -> None:
    """A cut-off archive is refused; one whose CRIU images are broken (checksums
    matching) fails in the engine: either way nothing is left, and the name is free for
    the good archive."""
    side = harness.side
    name = side.start()
    good = side.m.checkpoint(name, harness.tmp / "good.tar", compression="none").path
    assert good is not None
    stopped_at = side.assert_stopped(name)
    side.m.remove(name)
    cut = harness.tmp / "cut.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    broken = rewrite_archive(good, harness.tmp / "broken.tar", break_pstree)
    there = {c.name for c in side.m.list()}

    with pytest.raises(ArchiveError):
        side.m.restore(cut, **side.restore_options)
    with pytest.raises(RestoreError):
        side.m.restore(broken, **side.restore_options)
    assert not side.m.exists(name)
    assert {c.name for c in side.m.list()} == there

    assert side.m.restore(good, **side.restore_options) == name
    side.wait_counting(name, above=stopped_at)
    assert_continued(side.counts(name), stopped_at, stopped_at)


def test_taken_name_is_refused(harness: Harness) -> None:
    """Name policy: restore under the recorded name, or the given one; if a container
    holds it, NameInUseError, and that container is left alone (no suffix added)."""
    side = harness.side
    name = side.start()
    archive = side.m.checkpoint(name, harness.tmp / "live.tar", leave_running=True).path
    assert archive is not None
    there = {c.name for c in side.m.list()}
    with pytest.raises(NameInUseError):
        side.m.restore(archive, **side.restore_options)
    with pytest.raises(NameInUseError):
        side.m.restore(archive, name=name, **side.restore_options)
    assert {c.name for c in side.m.list()} == there
    assert_ran_on(side, name, since=side.last(name))


@engines("podman", "docker", "runc")  # a plain process is restored under its own PID only
def test_restore_under_a_given_name(harness: Harness) -> None:
    side = harness.side
    assert side.occupy is not None
    name = side.start()
    at_dump = side.last(name)
    archive = side.m.checkpoint(name, harness.tmp / "live.tar", leave_running=True).path
    assert archive is not None
    taken = side.fresh_name()
    side.occupy(taken)
    with pytest.raises(NameInUseError):
        side.m.restore(archive, name=taken)
    assert side.m.exists(taken) and "count" not in side.output(taken), "it was replaced"

    new = side.fresh_name()
    assert side.m.restore(archive, name=new) == new
    assert side.running(new)
    side.wait_counting(new, above=at_dump)
    assert_continued(side.counts(new), at_dump)
    assert_state_file(side, new)
    assert_ran_on(side, name, since=side.last(name))  # the source was not touched


# Options with a value other than True when switched on; the rest are booleans.
OPTION_VALUES: dict[str, Any] = {"publish_ports": ["127.0.0.1:18080:80"]}


def switched_on(option: str) -> dict[str, Any]:
    return {option: OPTION_VALUES.get(option, True)}


def unsupported(m: ctrmig.Migrator, verb: str) -> list[str]:
    return sorted(engine_options(verb) - supported_options(m, verb))


def assert_names(err: pytest.ExceptionInfo[OptionError], option: str) -> None:
    message = str(err.value)
    assert option in message or option.replace("_", "-") in message, message


def test_unsupported_options_are_refused(harness: Harness) -> None:
    """An option the engine cannot honour: OptionError naming it, before anything is
    touched (the container runs on, no archive, nothing restored)."""
    side = harness.side
    name = side.start()
    path = harness.tmp / "x.tar"
    refused = unsupported(side.m, "checkpoint")
    assert refused, "every engine lacks some checkpoint option (pre_checkpoint here)"
    for option in refused:
        with pytest.raises(OptionError) as err:
            side.m.checkpoint(name, path, **switched_on(option))
        assert_names(err, option)
        assert_no_archive(path)
    with pytest.raises(OptionError) as err:
        side.m.checkpoint(name, path, no_such_option=True)
    assert_names(err, "no_such_option")
    assert_ran_on(side, name, since=side.last(name))

    archive = side.m.checkpoint(name, harness.tmp / "live.tar", leave_running=True).path
    assert archive is not None
    there = {c.name for c in side.m.list()}
    refused = unsupported(side.m, "restore")
    assert refused
    for option in refused:
        with pytest.raises(OptionError) as err:
            side.m.restore(archive, **side.restore_options, **switched_on(option))
        assert_names(err, option)
    assert {c.name for c in side.m.list()} == there
    assert_ran_on(side, name, since=side.last(name))
