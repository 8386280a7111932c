"""Small helpers for tests that need other settings than the environment's."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ctrmig import settings


def override_settings(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Install settings with ``changes`` for this test only."""
    monkeypatch.setattr(settings, "_current", settings.current().replace(**changes))


def tampered_pages(archive: Path, out: Path) -> Path:
    """A copy of the uncompressed ``archive`` at ``out`` with one byte of a CRIU pages
    image flipped."""
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("checkpoint/pages-"))
    data = bytearray(archive.read_bytes())
    data[member.offset_data + 10] ^= 0xFF
    out.write_bytes(bytes(data))
    return out
