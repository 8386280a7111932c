"""``ctrmig doctor`` lists migrations a dead ctrmig left for ``ctrmig recover``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ctrmig.doctor import Report, check_migrations
from ctrmig.host import proc


def _journal(directory: Path, container: str, pid: int) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{container}-1.json").write_text(json.dumps(
        {"container": container, "pid": pid, "start": proc.start_time(pid)}))


def test_no_journals_pass(tmp_path: Path) -> None:
    assert [c.status for c in check_migrations(tmp_path)] == ["pass"]


def test_a_dead_migrations_journal_is_listed_with_the_fix(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _journal(tmp_path, "web", gone.pid)
    _journal(tmp_path, "db", os.getpid())  # still being migrated: not for recover
    [check] = check_migrations(tmp_path)
    assert check.status == "fail" and check.fix == "ctrmig recover"
    assert "web" in check.detail and "db" not in check.detail
    # Listed for the operator: no engine becomes unusable because of it.
    assert Report([check], ("runc",)).ok
