"""``ctrmig demo`` end to end: sl is checkpointed mid-screen and drives on after restore.

The columns come from the real container logs (the demo replays sl's cursor
addressing); the demo itself removes its containers and archive.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from podman import PodmanClient

from ctrmig import demo
from tests.conftest import need, unique, wait_for

pytestmark = pytest.mark.cli

CTRMIG = Path(sys.executable).with_name("ctrmig")


def run_demo(*args: str) -> tuple[int, int]:
    """Run ``ctrmig demo`` off a terminal; return (column at checkpoint, at restore)."""
    res = subprocess.run([str(CTRMIG), "demo", "--no-tty", "--pause", "1", *args],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    at_checkpoint = int(re.search(r"column at checkpoint: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    at_restore = int(re.search(r"column at restore: +(\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    assert "the train drove on from where it stopped" in res.stdout
    return at_checkpoint, at_restore


def check_resumed(at_checkpoint: int, at_restore: int) -> None:
    assert 1 <= at_restore <= 80
    # sl moves the train one column left per frame: the same column or one step on.
    assert 0 <= at_checkpoint - at_restore <= 1


def test_demo_podman(podman_socket: Path) -> None:
    check_resumed(*run_demo("--engine", "podman", "--url", f"unix://{podman_socket}"))


def test_demo_docker(dockerd_socket: Path) -> None:
    check_resumed(*run_demo("--engine", "docker", "--url", f"unix://{dockerd_socket}"))


@pytest.mark.runc
def test_demo_runc() -> None:
    for tool in ("runc", "criu", "skopeo", "umoci"):
        need(tool)
    check_resumed(*run_demo("--engine", "runc"))


def test_demo_result_in_python(podman_socket: Path) -> None:
    result = demo.run_demo("podman", url=f"unix://{podman_socket}", interactive=False,
                           pause=0.5)
    assert result.ok
    assert result.first_position_after is not None
    assert result.last_position_before is not None
    with PodmanClient(base_url=f"unix://{podman_socket}") as client:
        left = [c.name for c in client.containers.list(all=True)
                if c.name in (result.source, result.restored)]
    assert not left, f"demo left containers behind: {left}"


def test_a_fresh_container_does_not_pass_for_a_restore(podman_socket: Path) -> None:
    """The check can fail on real logs: a new sl, not a restored one, starts over."""
    demo.ensure_podman_image()
    with PodmanClient(base_url=f"unix://{podman_socket}") as client:
        names = [unique("ctrmig-sl"), unique("ctrmig-sl")]
        try:
            first = client.containers.run(demo.IMAGE, demo.COMMAND, name=names[0],
                                          detach=True, environment=demo.ENV)

            def logs(c: object) -> str:
                return b"".join(c.logs()).decode(errors="replace")  # type: ignore[attr-defined]

            wait_for(lambda: (demo.train_column(logs(first)) or 99) <= 60, what="train")
            # Read before stopping: a stopped sl clears the screen on its way out.
            before = logs(first)
            first.stop(timeout=1)
            second = client.containers.run(demo.IMAGE, demo.COMMAND, name=names[1],
                                           detach=True, environment=demo.ENV)
            wait_for(lambda: demo.train_column(logs(second)) is not None, what="second train")
            time.sleep(0.2)
            at_checkpoint = demo.train_column(before)
            at_restore = demo.resume_column(before, logs(second))
            assert at_restore is not None and at_checkpoint is not None
            assert at_restore > at_checkpoint
            assert not demo.resumed(at_checkpoint, at_restore)
        finally:
            for name in names:
                if client.containers.exists(name):
                    client.containers.get(name).remove(force=True)
