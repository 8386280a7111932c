"""podman's and docker's migrations keep ALL of a container's memory, not only a counter.

memhog (bench/memhog.c) fills its memory with a pattern and keeps verifying all of it; it
is moved by ``ctrmig migrate`` from host A to host B of test_failures' two hosts (podman:
the direct route, into B's podman through its local socket; docker: to ctrmig on B over
ssh, which restores into B's own dockerd) and must complete full verifications on B, with
no CORRUPT line, while nothing of it runs on A. (runc and plain processes: test_direct.py,
test_postcopy.py and test_process_migrate.py.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import docker
import pytest
from bench import workload

from ctrmig.host import images
from tests.conftest import unique, wait_for
from tests.hosts import TwoHosts
from tests.integration import test_failures as failures
from tests.integration.test_failures import Pair

hosts = failures.hosts
pair = failures.pair
b_dockerd = failures.b_dockerd
MIB = 64


@pytest.fixture(scope="module")
def memhog_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """memhog's image, saved from the machine's podman storage (built offline once)."""
    work = tmp_path_factory.mktemp("memhog")
    return images.podman_save(workload.ensure_image(work), work / "memhog.tar")


@pytest.fixture(scope="module")
def on_podman_a(hosts: TwoHosts, memhog_archive: Path) -> None:
    hosts.a.podman_cli("load", "-q", "-i", str(memhog_archive))


@pytest.fixture(scope="module")
def on_dockerd(dockerd_socket: Path, memhog_archive: Path) -> None:
    client = docker.DockerClient(base_url=f"unix://{dockerd_socket}", timeout=300)
    try:
        with memhog_archive.open("rb") as f:
            client.images.load(f)
    finally:
        client.close()


def start(p: Pair) -> tuple[str, workload.Health]:
    """memhog on host A's engine, once it verifies; its name and health."""
    name = unique("ctrmig-m")
    p.names.append(name)
    if p.engine == "podman":
        p.hosts.a.podman_cli("run", "-d", "--name", name, "--network", "none",
                             workload.IMAGE, *workload.command(MIB))
    else:
        client = docker.APIClient(base_url=p.src_spec.removeprefix("docker+"), timeout=120)
        try:
            client.start(client.create_container(workload.IMAGE, workload.command(MIB),
                                                 name=name)["Id"])
        finally:
            client.close()
    wait_for(lambda: workload.health(p.source.logs(name)).rounds > 2, timeout=120,
             what=f"memhog {name} verifying on A")
    return name, workload.health(p.source.logs(name))


def moved_intact(p: Pair) -> None:
    name, before = start(p)
    res = p.ctrmig(p.migrate_argv(name, "--json"))
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["target_name"] == name
    assert [side for side, _ in p.running(name)] == ["B"]

    def verified() -> bool:
        h = workload.health(p.target.logs(name))
        assert not h.corrupt, p.target.logs(name)[-2000:]
        return h.last_round > before.last_round and h.last_pass >= before.last_pass + 2
    wait_for(verified, timeout=180, what=f"memhog {name} verifying its memory on B")
    assert not p.source.exists(name)


@pytest.mark.parametrize("pair", ["podman"], indirect=True)
def test_podman_direct_route_keeps_the_memory(pair: Pair, on_podman_a: None) -> None:
    # B's podman through its local socket: podman's direct route (not its import)
    moved_intact(dataclasses.replace(pair, dst_spec=f"podman+{pair.target_url}"))


@pytest.mark.parametrize("pair", ["docker"], indirect=True)
def test_docker_keeps_the_memory(pair: Pair, on_dockerd: None) -> None:
    moved_intact(pair)
