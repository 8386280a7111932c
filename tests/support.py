"""Small helpers for tests that need other settings than the environment's."""

from __future__ import annotations

import pytest

from ctrmig import settings


def override_settings(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Install settings with ``changes`` for this test only."""
    monkeypatch.setattr(settings, "_current", settings.current().replace(**changes))
