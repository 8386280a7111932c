"""The per-container lock: one holder at a time, and no lock files left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrmig.engines import base
from ctrmig.errors import BusyError


def test_second_holder_is_refused_and_lock_file_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "LOCK_DIR", tmp_path)
    with base.container_lock("podman", "web/1"):
        with pytest.raises(BusyError, match="busy"), base.container_lock("podman", "web/1"):
            pass
        with base.container_lock("podman", "other"):  # another container is independent
            pass
    assert list(tmp_path.iterdir()) == []
    with base.container_lock("podman", "web/1"):  # free again
        pass
