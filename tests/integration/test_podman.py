"""The podman adapter against a real podman API service (issue 3's acceptance)."""

from __future__ import annotations

import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.errors import (
    ChecksumError,
    ContainerNotFoundError,
    EngineMismatchError,
    EngineUnavailableError,
    NameInUseError,
    OptionError,
)
from tests.conftest import first_count, last_count, podman_read_file, wait_for


@pytest.fixture
def podman(podman_socket: Path) -> Iterator[ctrmig.Migrator]:
    m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
    yield m
    m.close()


def _logs(client: PodmanClient, name: str) -> str:
    return b"".join(client.containers.get(name).logs()).decode()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_checkpoint_restore_continues_counter_and_keeps_file(
    podman: ctrmig.Migrator, podman_counter: Callable[[], str], podman_socket: Path,
    tmp_path: Path, compression: str,
) -> None:
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    name = podman_counter()
    archive = podman.checkpoint(name, tmp_path / "c.tar", compression=compression)  # type: ignore[arg-type]
    stopped_at = last_count(_logs(client, name))
    assert client.containers.get(name).status == "exited"
    assert archive.manifest.engine == "podman"
    assert archive.manifest.container.name == name
    assert archive.manifest.memory_bytes > 0
    assert "checkpoint/inventory.img" in archive.manifest.files
    assert "rootfs-diff.tar" in archive.manifest.files

    time.sleep(1)  # the source is frozen: the restored counter must not have moved on
    new = name + "-restored"
    assert podman.restore(archive.path, name=new) == new  # type: ignore[arg-type]
    assert client.containers.get(new).status == "running"
    wait_for(lambda: last_count(_logs(client, new)) > stopped_at, what="restored counter")
    resumed = first_count(_logs(client, new).split(f"count={stopped_at}\n")[-1])
    assert resumed == stopped_at + 1, "the counter continued from where it stopped"
    assert podman_read_file(client, new, "/state.txt").strip() == "written-after-start"
    client.close()


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
    with tarfile.open(archive.path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("checkpoint/pages-"))
    data = bytearray(archive.path.read_bytes())
    data[member.offset_data + 10] ^= 0xFF
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="pages-"):
        dead.restore(tampered, name="never-created")
    with pytest.raises(EngineUnavailableError):
        dead.list()
    assert not podman.exists("never-created")


def test_clear_errors(podman: ctrmig.Migrator, podman_counter: Callable[[], str],
                      tmp_path: Path) -> None:
    with pytest.raises(ContainerNotFoundError):
        podman.checkpoint("no-such-container-xyz", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
    assert not (tmp_path / "x.tar.partial").exists()
    with pytest.raises(OptionError, match="memory tracking"):
        podman.checkpoint("whatever", tmp_path / "x.tar", pre_checkpoint=True)
    with pytest.raises(OptionError, match="unknown option"):
        podman.checkpoint("whatever", tmp_path / "x.tar", no_such_option=True)

    name = podman_counter()
    archive = podman.checkpoint(name, tmp_path / "c.tar", leave_running=True)
    assert podman.exists(name)
    # The source still exists: restoring under its own name is a clear conflict, and the
    # failed attempt leaves the existing container alone.
    with pytest.raises(NameInUseError):
        podman.restore(archive.path)  # type: ignore[arg-type]
    with pytest.raises(NameInUseError):
        podman.restore(archive.path, name=name)  # type: ignore[arg-type]
    assert podman.exists(name)
    with pytest.raises(EngineMismatchError, match="podman"):
        ctrmig.migrator("process").restore(archive.path)  # type: ignore[arg-type]
