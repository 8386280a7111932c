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
    if not any(_on_tmpfs(Path(d)) for d in ("/run", "/dev/shm")):
        pytest.skip("neither /run nor /dev/shm is a tmpfs: CRIU cannot keep its cache here")
    log = tmp_path / "check.log"
    proc.run(["criu", "check", "-v4", "--log-file", str(log)], timeout=60, what="criu check")
    text = log.read_text(errors="replace")
    assert "Loaded kdat cache from /run/criu.kdat" in text, text[:2000]


def _on_tmpfs(path: Path) -> bool:
    return proc.output(["stat", "-f", "-c", "%T", str(path)], timeout=10).strip() == "tmpfs"
