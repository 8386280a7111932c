"""A podman archive of a --privileged container is refused on restore unless the caller
allows privileges, before podman is asked anything; allowed, it restores and runs on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.archive.privileges import archive_privileges
from ctrmig.errors import PrivilegeError
from tests.conftest import COUNTER_CMD, last_count, unique, wait_for


@pytest.fixture
def client(podman_socket: Path) -> Iterator[PodmanClient]:
    """A podman client; every container whose name starts with "ctrmig-priv" is removed."""
    c = PodmanClient(base_url=f"unix://{podman_socket}")
    yield c
    for container in c.containers.list(all=True):
        if container.name.startswith("ctrmig-priv"):
            container.remove(force=True)
    c.close()


def _logs(client: PodmanClient, name: str) -> str:
    return b"".join(client.containers.get(name).logs()).decode()


def test_privileged_archive_needs_allow_privileged(
    client: PodmanClient, podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    name = unique("ctrmig-priv")
    client.containers.run(test_image, COUNTER_CMD, name=name, detach=True, privileged=True)
    wait_for(lambda: last_count(_logs(client, name)) >= 3, what="counter to count")
    with ctrmig.migrator("podman", url=f"unix://{podman_socket}") as podman:
        archive = podman.checkpoint(name, tmp_path / "priv.tar.zst")
        stopped_at = last_count(_logs(client, name))
        client.containers.get(name).remove(force=True)

        found = {(r.kind, r.detail) for r in archive_privileges(archive.path)}  # type: ignore[arg-type]
        assert ("privileged", "podman --privileged") in found
        assert ("capability", "SYS_ADMIN") in found

        target = unique("ctrmig-priv-restored")
        with pytest.raises(PrivilegeError, match="SYS_ADMIN") as caught:
            podman.restore(archive.path, name=target)  # type: ignore[arg-type]
        assert caught.value.hint and "--allow-privileged" in caught.value.hint
        assert not any(c.name == target for c in client.containers.list(all=True))

        restored = podman.restore(archive.path, name=target,  # type: ignore[arg-type]
                                  allow_privileged=True)
        assert restored == target
        assert client.containers.get(target).status == "running"
        wait_for(lambda: last_count(_logs(client, target)) > stopped_at + 2,
                 what="restored counter to go on")


def test_ordinary_archive_restores_without_the_flag(
    client: PodmanClient, podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    name = unique("ctrmig-priv-plain")
    client.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
    wait_for(lambda: last_count(_logs(client, name)) >= 3, what="counter to count")
    with ctrmig.migrator("podman", url=f"unix://{podman_socket}") as podman:
        archive = podman.checkpoint(name, tmp_path / "plain.tar")
        assert archive_privileges(archive.path) == []  # type: ignore[arg-type]
        client.containers.get(name).remove(force=True)
        assert podman.restore(archive.path) == name  # type: ignore[arg-type]
        assert client.containers.get(name).status == "running"
