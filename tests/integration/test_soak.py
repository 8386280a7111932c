"""Soak: one runc container checkpointed and restored many times in a row.

The workload is the benchmark's memhog (bench/memhog.c): it fills its memory with a
per-page pattern and keeps re-verifying all of it, printing a round counter that lives in
that memory. After every restore the first round seen must follow the round reached before
the checkpoint (memory carried over, not a fresh start) and no "CORRUPT" line may appear.
At the end nothing may have leaked: containers, runc state, mounts, processes, temp files.
CTRMIG_SOAK_CYCLES overrides the number of cycles (default 100).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench import workload

from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import mounts
from tests.conftest import cleanup_runc_state, need, processes_naming, unique, wait_for

CYCLES = int(os.environ.get("CTRMIG_SOAK_CYCLES", "100"))
MIB = 16  # every round re-verifies all of it (memhog checks 32 MiB per round)
ROUND = re.compile(r"ok round=(\d+)")


def _rounds(text: str) -> list[int]:
    return [int(r) for r in ROUND.findall(text)]


@pytest.fixture
def runc_state(tmp_path: Path) -> Iterator[RuncMigrator]:
    for tool in ("runc", "criu", "skopeo", "umoci", "gcc"):
        need(tool)
    m = RuncMigrator(state_dir=tmp_path / "state", workdir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    yield m
    cleanup_runc_state(m)  # the test itself checks for leaks, cycle by cycle


@pytest.mark.slow
@pytest.mark.runc
def test_checkpoint_restore_many_times(runc_state: RuncMigrator, tmp_path: Path) -> None:
    m = runc_state
    image = workload.ensure_image(tmp_path)
    name = m.run(image, name=unique("ctrmig-soak"), command=workload.command(MIB))
    wait_for(lambda: len(_rounds(m.logs(name))) >= 3, timeout=60, what="memhog rounds")
    mounts_before = sorted(mounts.mounts_under(m.state_dir))
    procs_before = len(processes_naming(str(m.state_dir)))
    archive = tmp_path / "work" / "soak.tar"

    for cycle in range(1, CYCLES + 1):
        m.checkpoint(name, archive, compression="none")
        before = m.logs(name)
        assert "CORRUPT" not in before, f"cycle {cycle}: {before[-500:]}"
        reached = _rounds(before)[-1]
        m.remove(name)
        assert m.restore(archive) == name
        archive.unlink()
        wait_for(lambda: _rounds(m.logs(name)), timeout=60,
                 what=f"memhog's first round after restore {cycle}")
        after = m.logs(name)
        assert "CORRUPT" not in after, f"cycle {cycle}: {after[-500:]}"
        first = _rounds(after)[0]
        assert first > reached, (
            f"cycle {cycle}: round {first} after the restore, {reached} before: "
            "memory did not carry over")

    # Still the same one container, intact, and nothing piled up on the way.
    assert [(c.name, c.state) for c in m.list()] == [(name, "running")]
    assert [s["id"] for s in m.runc.containers()] == [name]
    assert sorted(mounts.mounts_under(m.state_dir)) == mounts_before
    assert len(processes_naming(str(m.state_dir))) == procs_before
    assert list((m.state_dir / "tmp").iterdir()) == []
    assert list((tmp_path / "work").iterdir()) == [], "temp files left in the workdir"
    assert not (m.logs_dir / "failed").exists(), "a runc/CRIU call failed on the way"

