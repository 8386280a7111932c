"""A podman archive of a --privileged container is refused on restore unless the caller
allows privileges, before podman is asked anything; allowed, it restores and runs on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.archive import ArchiveWriter, atomic_output, extracted
from ctrmig.archive.criu_images import capability_names, core_pid, read_core_creds
from ctrmig.archive.privileges import DEFAULT_CAPABILITIES, archive_privileges
from ctrmig.errors import PrivilegeError
from tests.conftest import COUNTER_CMD, last_count, unique, wait_for
from tests.unit.test_hostile_archives import make_hostile


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
        # Its real CRIU images were read: podman's default capabilities, no more.
        with extracted(archive.path) as (root, manifest):  # type: ignore[arg-type]
            cores = [n for n in manifest.files if core_pid(n) is not None]
            assert cores
            for core in cores:
                creds = read_core_creds((root / core).read_bytes(), core)
                assert creds.cap_bnd, core
                assert set(capability_names(creds.cap_bnd)) <= DEFAULT_CAPABILITIES
        client.containers.get(name).remove(force=True)
        assert podman.restore(archive.path) == name  # type: ignore[arg-type]
        assert client.containers.get(name).status == "running"


def test_ordinary_spec_with_a_hostile_core_image_is_refused(
    client: PodmanClient, podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    """A real ordinary archive whose task's core image is swapped for one that holds
    CAP_SYS_ADMIN (what spec.dump says is unchanged): refused before podman is asked."""
    name = unique("ctrmig-priv-core")
    client.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
    wait_for(lambda: last_count(_logs(client, name)) >= 2, what="counter to count")
    with ctrmig.migrator("podman", url=f"unix://{podman_socket}") as podman:
        archive = podman.checkpoint(name, tmp_path / "plain.tar")
        client.containers.get(name).remove(force=True)
        hostile = tmp_path / "hostile.tar"
        with extracted(archive.path) as (root, manifest):  # type: ignore[arg-type]
            core = next(n for n in manifest.files if core_pid(n) == 1)
            creds = read_core_creds((root / core).read_bytes(), core)
            raised = make_hostile.creds_message(caps=creds.cap_prm | 1 << 21,
                                                bounding=creds.cap_bnd | 1 << 21)
            (root / core).write_bytes(make_hostile.core_image(raised))
            with atomic_output(hostile) as out:
                writer = ArchiveWriter(out)
                for member in sorted(manifest.files):
                    writer.add_file(member, root / member)
                writer.finish(manifest)
        assert [(r.kind, r.detail) for r in archive_privileges(hostile)] == [
            ("capability", "task 1 holds CAP_SYS_ADMIN in its CRIU image")]
        with pytest.raises(PrivilegeError, match="CAP_SYS_ADMIN") as caught:
            podman.restore(hostile, name=unique("ctrmig-priv-core-restored"))
        assert caught.value.hint and "--allow-privileged" in caught.value.hint
        assert not any(c.name.startswith("ctrmig-priv-core-restored")
                       for c in client.containers.list(all=True))
