"""Host-to-host migration across two network namespaces joined by a veth pair."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from podman import PodmanClient

from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import images
from tests.conftest import (
    COUNTER_CMD,
    first_count,
    last_count,
    need,
    podman_read_file,
    unique,
    wait_for,
)
from tests.hosts import TwoHosts

MIGRATE_SCRIPT = """
import json, sys, ctrmig
src = ctrmig.migrator(sys.argv[1], url=sys.argv[2])
dst = ctrmig.migrator(sys.argv[1], url=sys.argv[3])
report = ctrmig.migrate(sys.argv[4], source=src, target=dst, insecure=True,
                        checkpoint_options={"include_image": True})
print(json.dumps({"name": report.target_name, "downtime": report.downtime_s,
                  "bytes": report.bytes_moved, "kept": report.source_kept}))
"""


@pytest.fixture
def two_hosts(session_dir: Path) -> Iterator[TwoHosts]:
    need("ip")
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        yield hosts


def _logs(client: PodmanClient, name: str) -> str:
    return b"".join(client.containers.get(name).logs()).decode()


@pytest.mark.podman
def test_podman_migrates_to_a_host_without_the_image(
    two_hosts: TwoHosts, session_dir: Path
) -> None:
    a, b = two_hosts.a, two_hosts.b
    a.start_podman()
    b.start_podman(tcp_port=8781)
    two_hosts.load_test_image(a, session_dir)
    assert "ctrmig-busybox" not in b.podman_cli("images", "--format", "{{.Repository}}")

    name = unique()
    src = PodmanClient(base_url=f"unix://{a.podman_socket}")
    dst = PodmanClient(base_url=f"unix://{b.podman_socket}")
    # Containers left by a failure are removed by the hosts' teardown (Host.stop).
    src.containers.run(images.TEST_IMAGE, COUNTER_CMD, name=name, detach=True,
                       network_mode="none")
    wait_for(lambda: last_count(_logs(src, name)) >= 5, what="counter on host A")

    # Driven from host A: A's engine over its socket, B's over B's veth address.
    res = a.run([sys.executable, "-c", MIGRATE_SCRIPT, "podman", f"unix://{a.podman_socket}",
                 b.podman_tcp, name])
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["name"] == name and report["bytes"] > 0 and not report["kept"]

    assert name not in [c.name for c in src.containers.list(all=True)], "source removed"
    assert dst.containers.get(name).status == "running"
    wait_for(lambda: last_count(_logs(dst, name)) > 5, what="counter on host B")
    # The restored log holds the pre-checkpoint output too: the count goes on without a
    # restart from 1.
    counts = [int(c) for c in _logs(dst, name).split("count=")[1:] if c.strip()]
    assert counts == list(range(first_count(_logs(dst, name)), counts[-1] + 1))
    assert podman_read_file(dst, name, "/state.txt").strip() == "written-after-start"
    assert "ctrmig-busybox" in b.podman_cli("images", "--format", "{{.Repository}}")
    dst.containers.get(name).remove(force=True)
    src.close()
    dst.close()


CTRMIG = str(Path(sys.executable).with_name("ctrmig"))


@pytest.mark.runc
def test_runc_migrates_over_ssh_to_a_host_without_the_image(
    two_hosts: TwoHosts, test_image: str, tmp_path: Path
) -> None:
    """runc has no API: ctrmig on host B restores from the archive streamed over ssh."""
    for tool in ("runc", "criu", "skopeo", "umoci", "sshd"):
        need(tool)
    a, b = two_hosts.a, two_hosts.b
    ssh_options = b.start_sshd(port=2222)
    src = RuncMigrator(state_dir=a.root / "runc")
    dst = RuncMigrator(state_dir=b.root / "runc")
    name = src.run(test_image, name=unique(), command=COUNTER_CMD)
    try:
        wait_for(lambda: last_count(src.logs(name)) >= 5, what="counter on host A")
        env = {
            "CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
            "CTRMIG_JOURNAL_DIR": str(tmp_path / "journal"),
            "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
            "CTRMIG_REMOTE_COMMAND": f"env CTRMIG_RUNC_STATE_DIR={dst.state_dir} {CTRMIG}",
        }
        # Restore options cross ssh as flags of the remote `ctrmig restore`, made from the
        # same option table (before it, a flag that command lacked killed the remote side).
        res = a.run([CTRMIG, "migrate", name, "--from", "runc",
                     "--to", f"runc+ssh://root@{b.address}:2222", "--json",
                     "--file-locks", "--tcp-established"], env=env)
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["compression"] == "zstd"  # chosen for the ssh link
        assert report["target_name"] == name and report["bytes_moved"] > 0

        assert not src.exists(name), "the source is removed after a successful migration"
        assert dst.exists(name)
        wait_for(lambda: last_count(dst.logs(name)) > 5, what="counter on host B")
        log = dst.logs(name)
        assert "count=1\n" not in log.split(f"count={first_count(log)}\n", 1)[1], \
            "the count went on, it did not start again"
        rootfs = dst.bundles_dir / name / "rootfs"
        assert (rootfs / "state.txt").read_text() == "written-after-start\n"
        assert list((tmp_path / "journal").glob("*.json")) == [], "journal removed"
    finally:
        for m in (src, dst):
            for c in m.list():
                m.remove(c.name)


@pytest.mark.docker
def test_docker_migrates_over_ssh_to_a_host_without_the_image(
    two_hosts: TwoHosts, test_image: str, session_dir: Path, tmp_path: Path
) -> None:
    """docker's restore writes into the target's data root: ctrmig on host B does it."""
    for tool in ("dockerd", "sshd"):
        need(tool)
    a, b = two_hosts.a, two_hosts.b
    sock_a, sock_b = a.start_dockerd(), b.start_dockerd()
    ssh_options = b.start_sshd(port=2222)
    src = docker.DockerClient(base_url=f"unix://{sock_a}", timeout=300)
    dst = docker.DockerClient(base_url=f"unix://{sock_b}", timeout=300)
    try:
        archive = images.podman_save(test_image, tmp_path / "image.tar")
        with archive.open("rb") as f:
            src.images.load(f)
        assert not dst.images.list(), "host B starts without any image"
        name = unique()
        src.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
        logs_a = lambda: src.containers.get(name).logs().decode()  # noqa: E731
        wait_for(lambda: last_count(logs_a()) >= 5, what="counter on host A")
        res = two_hosts.migrate_docker(name, sock_a, sock_b, ssh_options, tmp_path / "journal")
        assert res.returncode == 0, res.stderr.decode()
        report = json.loads(res.stdout)
        assert report["target_name"] == name and report["bytes_moved"] > 0

        assert name not in [c.name for c in src.containers.list(all=True)], "source removed"
        restored = dst.containers.get(name)
        assert restored.status == "running"
        logs_b = lambda: dst.containers.get(name).logs().decode()  # noqa: E731
        wait_for(lambda: last_count(logs_b()) > 5, what="counter on host B")
        assert first_count(logs_b()) > 1, "the count went on, it did not start again"
        code, out = restored.exec_run(["cat", "/state.txt"])
        assert code == 0 and out.strip() == b"written-after-start"
        assert dst.images.list(), "the image came along in the archive"
    finally:
        for client in (src, dst):
            for c in client.containers.list(all=True):
                c.remove(force=True)
            client.close()
