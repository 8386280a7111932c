"""The podman adapter against a real podman API service (issue 3's acceptance)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.errors import ChecksumError, EngineUnavailableError
from tests.conftest import last_count
from tests.support import tampered_pages


@pytest.fixture
def podman(podman_socket: Path) -> Iterator[ctrmig.Migrator]:
    m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
    yield m
    m.close()


def _logs(client: PodmanClient, name: str) -> str:
    return b"".join(client.containers.get(name).logs()).decode()


def test_podmans_own_import_accepts_a_ctrmig_archive(
    podman: ctrmig.Migrator, podman_counter: Callable[[], str], tmp_path: Path,
    podman_socket: Path,
) -> None:
    name = podman_counter()
    archive = podman.checkpoint(name, tmp_path / "c.tar.zst", compression="zstd")
    new = name + "-cli"
    subprocess.run(
        ["podman", "container", "restore", "--import", str(archive.path), "--name", new],
        check=True, capture_output=True, timeout=300,
    )
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    assert client.containers.get(new).status == "running"
    assert last_count(_logs(client, new)) >= last_count(_logs(client, name))
    client.close()


def test_inspect_needs_no_engine_and_tampering_is_refused_before_the_engine(
    podman: ctrmig.Migrator, podman_counter: Callable[[], str], tmp_path: Path
) -> None:
    name = podman_counter()
    archive = podman.checkpoint(name, tmp_path / "c.tar", compression="none")
    assert archive.path is not None
    dead = ctrmig.migrator("podman", url=f"unix://{tmp_path}/no-such.sock")
    manifest = ctrmig.inspect(archive.path)  # no engine involved
    assert manifest.container.name == name
    assert ctrmig.verify(archive.path).files == manifest.files

    # Flip one byte inside a CRIU image: restore must refuse before calling podman (the
    # migrator points at a dead socket, so any engine call would raise EngineUnavailable).
    tampered = tampered_pages(archive.path, tmp_path / "tampered.tar")
    with pytest.raises(ChecksumError, match="pages-"):
        dead.restore(tampered, name="never-created")
    with pytest.raises(EngineUnavailableError):
        dead.list()
    assert not podman.exists("never-created")
