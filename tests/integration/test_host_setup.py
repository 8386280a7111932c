"""What scripts/setup-host leaves on the host for CRIU, checked against CRIU itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrmig.host import proc

pytestmark = pytest.mark.process


def test_criu_finds_its_kernel_feature_cache(tmp_path: Path) -> None:
    """CRIU keeps its kernel probes in /run/criu.kdat only on a tmpfs; where /run is not
    one (this VM), setup-host keeps it for CRIU. Without it every criu call probed the
    kernel: 30-90 ms each here, ~0.1 s of post-copy's downtime."""
    log = tmp_path / "check.log"
    proc.run(["criu", "check", "-v4", "--log-file", str(log)], timeout=60, what="criu check")
    text = log.read_text(errors="replace")
    assert "Loaded kdat cache from /run/criu.kdat" in text, text[:2000]
