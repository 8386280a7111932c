"""An archive written by one engine restores into another (issue #14): every pair of
podman, docker and runc, with the counter workload going on from where it was frozen."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.engines.runc import RuncMigrator
from tests.conftest import (
    COUNTER_CMD,
    last_count,
    podman_read_file,
    resumed_count,
    unique,
    wait_for,
)


class Side:
    """One engine of a pair: its migrator, how to start the counter and read a file."""

    def __init__(self, m: Any, start: Callable[[str], None], read: Callable[[str, str], str]):
        self.m = m
        self._start = start
        self.read = read
        self.names: list[str] = []

    def track(self, name: str) -> str:
        self.names.append(name)
        return name

    def counter(self) -> str:
        name = self.track(unique("ctrmig-x"))
        self._start(name)
        wait_for(lambda: last_count(self.m.logs(name)) >= 5, what=f"{name} counting")
        return name

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(ctrmig.CtrmigError):
                self.m.remove(name)


def _podman(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> Side:
    sock: Path = request.getfixturevalue("podman_socket")
    image: str = request.getfixturevalue("test_image")
    client = PodmanClient(base_url=f"unix://{sock}")
    stack.callback(client.close)
    m = ctrmig.migrator("podman", url=f"unix://{sock}")
    stack.callback(m.close)
    def start(name: str) -> None:
        client.containers.run(image, COUNTER_CMD, name=name, detach=True)

    return Side(m, start, lambda n, p: podman_read_file(client, n, p))


def _docker(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> Side:
    sock: Path = request.getfixturevalue("dockerd_socket")
    image: str = request.getfixturevalue("test_image")
    api = docker.APIClient(base_url=f"unix://{sock}", timeout=120)
    stack.callback(api.close)
    m = ctrmig.migrator("docker", base_url=f"unix://{sock}")
    stack.callback(m.close)

    def start(name: str) -> None:
        api.start(api.create_container(image, COUNTER_CMD, name=name)["Id"])

    def read(name: str, path: str) -> str:
        return bytes(api.exec_start(api.exec_create(name, ["cat", path]))).decode()

    return Side(m, start, read)


def _runc(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> Side:
    m: RuncMigrator = request.getfixturevalue("runc_state")  # its teardown checks leaks
    image: str = request.getfixturevalue("test_image")
    def start(name: str) -> None:
        m.run(image, name=name, command=COUNTER_CMD)

    return Side(m, start,
                lambda n, p: (m.bundles_dir / n / "rootfs" / p.lstrip("/")).read_text())


SIDES = {"podman": _podman, "docker": _docker, "runc": _runc}
PAIRS = [("podman", "runc"), ("runc", "podman"), ("docker", "runc"), ("runc", "docker"),
         ("podman", "docker"), ("docker", "podman")]


@pytest.fixture
def sides(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Side]]:
    made: list[Side] = []
    with contextlib.ExitStack() as stack:
        def side(engine: str) -> Side:
            s = SIDES[engine](request, stack)
            made.append(s)
            return s

        yield side
        for s in made:
            s.cleanup()


@pytest.mark.parametrize(("source", "target"), [
    pytest.param(s, t, id=f"{s}-to-{t}", marks=[getattr(pytest.mark, s),
                                                getattr(pytest.mark, t)])
    for s, t in PAIRS])
def test_archive_restores_into_another_engine(
    source: str, target: str, sides: Callable[[str], Side], tmp_path: Path
) -> None:
    src, dst = sides(source), sides(target)
    name = src.counter()
    archive = tmp_path / "c.tar"
    src.m.checkpoint(name, archive, compression="none")
    before = last_count(src.m.logs(name))
    src.m.remove(name)

    restored = dst.track(dst.m.restore(archive, name=unique("ctrmig-x")))
    after = resumed_count(lambda: dst.m.logs(restored), f"the {target} counter")
    # The memory image went on: the first count after the restore follows the last one
    # before the checkpoint, it does not start again from 1.
    assert before < after <= before + 5, (before, after)
    wait_for(lambda: last_count(dst.m.logs(restored)) > after, what="counting on")
    assert dst.read(restored, "/state.txt") == "written-after-start\n"  # the rootfs diff
    dst.m.remove(restored)
    assert not dst.m.exists(restored)
