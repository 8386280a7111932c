"""Checkpoint images on the real stack: a real registry (Debian's docker-registry), real
podman, the counter workload resuming where it stopped.

The self-containment test restores into a second podman storage of its own, empty: no
checkpoint image, no base image; podman has to pull both from the registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ctrmig
from ctrmig import cli, images
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import mounts, proc, services
from ctrmig.images import oci, transport
from tests.conftest import (
    COUNTER_CMD,
    cleanup_runc_state,
    first_count,
    last_count,
    unique,
    wait_for,
)
from tests.hosts import TwoHosts
from tests.integration.test_docker import Docker
from tests.registry import Registry
from tests.registry import start as start_registry

Podman = Callable[..., subprocess.CompletedProcess[bytes]]


def ctrmig_cli(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(cli.cli, list(args), env=env)


@pytest.fixture
def podman_env(podman_socket: Path, registry: Registry) -> dict[str, str]:
    """The CLI's environment: our podman service, the registry's registries.conf."""
    return {"CTRMIG_PODMAN_URL": f"unix://{podman_socket}", "CTRMIG_ENGINE": "",
            "DOCKER_HOST": "unix:///nonexistent/docker.sock", **registry.env}


@pytest.fixture
def empty_podman(tmp_path: Path) -> Iterator[Podman]:
    """The podman CLI on a storage of its own, empty (no image at all); removed after."""
    root = tmp_path / "storage"
    runroot = Path("/run/ctrmig-img") / uuid.uuid4().hex[:8]  # podman: <= 50 characters
    flags = services.podman_root_args(root, runroot)

    def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return proc.run(["podman", *flags, *args], timeout=300, check=check)

    yield podman
    podman("rm", "--all", "--force", "--time", "0", check=False)
    podman("rmi", "--all", "--force", check=False)
    for path in (root, runroot):
        mounts.unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # another test's may still be there
        runroot.parent.rmdir()


@pytest.fixture
def local_images() -> Iterator[list[str]]:
    """Images a test makes in the machine's podman storage, removed after."""
    made: list[str] = []
    yield made
    for ref in made:
        proc.run(["podman", "rmi", "--force", ref], timeout=120, check=False)


def podman_logs(podman: Podman, name: str) -> str:
    res = podman("logs", name)
    return (res.stdout + res.stderr).decode(errors="replace")


def assert_resumed(logs: Callable[[], str], stopped_at: int) -> None:
    """The restored counter goes on from ``stopped_at`` (its memory came along): its log
    (podman carries the old one along) continues with ``stopped_at + 1``."""
    assert stopped_at >= 5
    wait_for(lambda: last_count(logs()) > stopped_at + 3, what="the restored counter")
    after = logs().split(f"count={stopped_at}\n", 1)[-1]
    assert first_count(after) == stopped_at + 1, after[:200]


def test_podman_restores_ctrmig_image_on_empty_storage_where_its_own_fails(
        podman_counter: Callable[[], str], podman_env: dict[str, str], registry: Registry,
        empty_podman: Podman, local_images: list[str]) -> None:
    name = podman_counter()
    ref = registry.ref(f"ckpt/{name}", "v1")
    res = ctrmig_cli("checkpoint", name, "--image", ref, env=podman_env)
    assert res.exit_code == 0, res.output
    assert f"-> image {ref} (base {registry.ref(f'ckpt/{name}', 'v1-base')})" in res.output
    m = ctrmig.migrator("podman", url=podman_env["CTRMIG_PODMAN_URL"])
    try:
        stopped_at = last_count(m.logs(name))
    finally:
        m.close()

    # A storage with neither image: podman pulls the checkpoint image, and its restore
    # pulls the base the image names (config.dump's rootfsImageName), then restores.
    assert empty_podman("images", "-q").stdout.strip() == b""
    empty_podman("pull", "-q", ref)
    empty_podman("container", "restore", ref)
    assert_resumed(lambda: podman_logs(empty_podman, name), stopped_at)
    inspect = json.loads(empty_podman("image", "inspect", ref).stdout)[0]
    notes = inspect["Annotations"]
    assert notes["io.podman.annotations.checkpoint.name"] == name
    assert notes["io.kubernetes.cri-o.annotations.checkpoint.name"] == name
    assert notes["io.podman.annotations.checkpoint.rootfsImageName"] == \
        registry.ref(f"ckpt/{name}", "v1-base")

    # podman's own checkpoint image of the same kind of container fails right there: it
    # names the base by its local name, which no registry serves.
    own = podman_counter()
    own_ref = f"localhost/ctrmig-own-{own}:1"
    local_images.append(own_ref)
    proc.run(["podman", "container", "checkpoint", "--create-image", own_ref, own],
             timeout=300)
    pushed = registry.ref(f"own/{own}", "1")
    proc.run(["podman", "push", "-q", own_ref, pushed], timeout=300)
    empty_podman("pull", "-q", pushed)
    failed = empty_podman("container", "restore", pushed, check=False)
    assert failed.returncode != 0
    assert b"ctrmig-busybox" in failed.stderr, failed.stderr


def podman_restores_natively(empty_podman: Podman, ref: str, name: str, stopped_at: int
                             ) -> None:
    """``podman pull`` + ``podman container restore`` of ``ref`` on a storage holding no
    image: the counter ``name`` goes on from ``stopped_at`` (the log podman keeps starts
    with the restore: the source engine's log stayed there), its rootfs diff came along."""
    assert empty_podman("images", "-q").stdout.strip() == b""
    empty_podman("pull", "-q", ref)
    empty_podman("container", "restore", ref)
    info = json.loads(empty_podman("container", "inspect", name).stdout)[0]
    assert info["ImageName"] == images.base_ref(ref)  # pulled by the name config.dump gives
    wait_for(lambda: last_count(podman_logs(empty_podman, name)) > stopped_at + 3,
             what="the counter restored by podman")
    assert stopped_at < first_count(podman_logs(empty_podman, name)) <= stopped_at + 3
    copied = empty_podman("cp", f"{name}:/state.txt", "-").stdout
    with tarfile.open(fileobj=io.BytesIO(copied)) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None and member.read() == b"written-after-start\n"


def test_podman_restores_ctrmig_image_of_a_runc_container_on_empty_storage(
        runc_state: RuncMigrator, test_image: str, registry: Registry,
        empty_podman: Podman, tmp_path: Path) -> None:
    """The image's layer holds config.dump, spec.dump and the CRIU images podman reads in
    podman's dialect (as a cross-engine restore into podman makes them); ctrmig reads the
    runc archive back whole."""
    m = runc_state
    name = m.run(test_image, name=unique("ctrmig-img"), command=COUNTER_CMD)
    wait_for(lambda: last_count(m.logs(name)) >= 5, what=f"{name} counting")
    ref = registry.ref(f"runc/{name}", "v1")
    images.checkpoint(m, name, ref)
    stopped_at = last_count(m.logs(name))
    m.remove(name)
    podman_restores_natively(empty_podman, ref, name, stopped_at)
    # Again under a new name (podman then makes a new ID instead of the image's).
    empty_podman("container", "restore", "--name", f"{name}-2", ref)
    wait_for(lambda: last_count(podman_logs(empty_podman, f"{name}-2")) > stopped_at + 3,
             what="the second counter restored by podman")
    assert stopped_at < first_count(podman_logs(empty_podman, f"{name}-2")) <= stopped_at + 3
    ids = {json.loads(empty_podman("container", "inspect", n).stdout)[0]["Id"]
           for n in (name, f"{name}-2")}
    assert len(ids) == 2
    transport.copy(f"docker://{ref}", f"oci:{tmp_path / 'layout'}:x", what="pull")
    with tarfile.open(oci.read_layout(tmp_path / "layout").layer) as tar:
        kept = sorted(n for n in tar.getnames() if n.startswith(oci.ORIGINALS))
    # runc's root directory mode is not podman's: files.img without it, as for import.
    assert {oci.ORIGINALS + n for n in ("config.dump", "spec.dump", "checkpoint/files.img")
            } <= set(kept), kept
    with images.pulled(ref) as (image, path):
        assert image.engine == "runc"
        manifest = ctrmig.verify(path)  # the runc archive as written, checksums and all
        assert manifest.engine == "runc" and manifest.container.name == name


def test_podman_restores_ctrmig_image_of_a_docker_container_on_empty_storage(
        dockerd_socket: Path, registry: Registry, empty_podman: Podman) -> None:
    dk = Docker(dockerd_socket, "localhost/ctrmig-busybox:latest")
    try:
        name = dk.counter()
        ref = registry.ref(f"docker/{name}", "v1")
        images.checkpoint(dk.m, name, ref)
        stopped_at = last_count(dk.m.logs(name))
        podman_restores_natively(empty_podman, ref, name, stopped_at)
    finally:
        dk.cleanup()


def test_ctrmig_restore_and_inspect_image_registry_and_local(
        podman_counter: Callable[[], str], podman_env: dict[str, str], registry: Registry,
        local_images: list[str]) -> None:
    name = podman_counter()
    ref = registry.ref(f"ckpt/{name}", "v1")
    res = ctrmig_cli("checkpoint", name, "--image", ref, env=podman_env)
    assert res.exit_code == 0, res.output

    res = ctrmig_cli("inspect", "--image", ref, "--json", env=podman_env)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["engine"] == "podman" and data["container"]["name"] == name
    assert data["checksums"] == "ok"  # the archive comes back whole, manifest and all
    assert data["checkpoint image"].startswith(f"{ref} (sha256:")
    assert data["base image"] == registry.ref(f"ckpt/{name}", "v1-base")

    m = ctrmig.migrator("podman", url=podman_env["CTRMIG_PODMAN_URL"])
    try:
        stopped_at = last_count(m.logs(name))
        second = f"{name}-2"
        res = ctrmig_cli("restore", "--image", ref, "--name", second, env=podman_env)
        assert res.exit_code == 0, res.output
        assert f"restored podman container {second}" in res.output
        assert_resumed(lambda: m.logs(second), stopped_at)

        # Into podman's own store (no registry in the name), and back.
        local = f"localhost/ctrmig-ckpt-{name}:1"
        local_images.append(local)
        res = ctrmig_cli("checkpoint", second, "--image", local, env=podman_env)
        assert res.exit_code == 0, res.output
        assert m.has_image(local)
        stopped_again = last_count(m.logs(second))
        third = f"{name}-3"
        res = ctrmig_cli("restore", "--image", local, "--name", third, env=podman_env)
        assert res.exit_code == 0, res.output
        assert_resumed(lambda: m.logs(third), stopped_again)
    finally:
        m.close()


def test_ctrmig_restores_podmans_own_image(
        podman_counter: Callable[[], str], podman_env: dict[str, str],
        local_images: list[str]) -> None:
    name = podman_counter()
    own_ref = f"localhost/ctrmig-own-{name}:1"
    local_images.append(own_ref)
    proc.run(["podman", "container", "checkpoint", "--create-image", own_ref, name],
             timeout=300)
    new = f"{name}-r"
    res = ctrmig_cli("restore", "--image", own_ref, "--name", new, env=podman_env)
    assert res.exit_code == 0, res.output
    m = ctrmig.migrator("podman", url=podman_env["CTRMIG_PODMAN_URL"])
    try:
        assert_resumed(lambda: m.logs(new), last_count(m.logs(name)))
    finally:
        m.close()


def test_migrate_via_registry(podman_counter: Callable[[], str],
                              podman_env: dict[str, str], registry: Registry,
                              tmp_path: Path) -> None:
    name = podman_counter()
    sock = podman_env["CTRMIG_PODMAN_URL"]
    new = f"{name}-moved"
    res = ctrmig_cli("migrate", name, "--from", f"podman+{sock}", "--to", f"podman+{sock}",
                     "--name", new, "--via", registry.ref("moves").rsplit(":", 1)[0],
                     "--json", env={**podman_env, "CTRMIG_JOURNAL_DIR": str(tmp_path)})
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["route"] == "registry" and report["target_name"] == new
    m = ctrmig.migrator("podman", url=sock)
    try:
        assert not m.exists(name)  # moved: the source is gone
        wait_for(lambda: last_count(m.logs(new)) > 8, what="the moved counter")
        logs = m.logs(new)
        counts = [int(x) for x in logs.split("count=")[1:] if x.strip().isdigit()]
        assert counts == list(range(1, len(counts) + 1)), "the count restarted or jumped"
    finally:
        m.close()
    assert not list(tmp_path.glob("*.json"))  # no journal left
    # The registry allows deletes here: the checkpoint's memory left it with the move.
    tags = proc.output(["skopeo", "--registries-conf", str(registry.conf), "list-tags",
                        f"docker://{registry.address}/moves"], timeout=60)
    assert not [t for t in json.loads(tags)["Tags"] if t.startswith(f"{name}-")
                and not t.endswith("-base")], tags


def test_migrate_via_unreachable_registry_leaves_the_source_running_once(
        podman_counter: Callable[[], str], podman_env: dict[str, str],
        tmp_path: Path) -> None:
    name = podman_counter()
    sock = podman_env["CTRMIG_PODMAN_URL"]
    with contextlib.closing(__import__("socket").socket()) as s:  # a port nothing serves
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**podman_env, "CTRMIG_JOURNAL_DIR": str(tmp_path),
           "CONTAINERS_REGISTRIES_CONF": str(tmp_path / "registries.conf")}
    (tmp_path / "registries.conf").write_text(
        f'[[registry]]\nlocation = "{dead}"\ninsecure = true\n')
    new = f"{name}-moved"
    res = ctrmig_cli("migrate", name, "--from", f"podman+{sock}", "--to", f"podman+{sock}",
                     "--name", new, "--via", f"{dead}/moves", env=env)
    assert res.exit_code == 1, res.output
    assert "hint: nothing listens at that registry address" in res.output, res.output
    m = ctrmig.migrator("podman", url=sock)
    try:
        states = {c.name: c.state.lower() for c in m.list() if c.name in (name, new)}
        assert states == {name: "running"}, states  # the source, once; no target
        stopped_at = last_count(m.logs(name))
        wait_for(lambda: last_count(m.logs(name)) > stopped_at + 3, what="the source")
    finally:
        m.close()
    assert not list(tmp_path.glob("*.json"))


def test_checkpoint_image_refusals(podman_counter: Callable[[], str],
                                   podman_env: dict[str, str], tmp_path: Path) -> None:
    """Refused before the container is touched: an encrypted archive as an image, and
    --via naming a tag instead of a repository."""
    name = podman_counter()
    key = tmp_path / "id"
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
    res = ctrmig_cli("checkpoint", name, "--image", "127.0.0.1:1/x:1", "--encrypt-to",
                     str(key.with_suffix(".pub")), env=podman_env)
    assert res.exit_code == 1 and "encrypted archive cannot be a checkpoint image" in \
        res.output, res.output
    sock = podman_env["CTRMIG_PODMAN_URL"]
    res = ctrmig_cli("migrate", name, "--from", f"podman+{sock}", "--to", f"podman+{sock}",
                     "--name", unique(), "--via", "127.0.0.1:1/x:tag",
                     env={**podman_env, "CTRMIG_JOURNAL_DIR": str(tmp_path)})
    assert res.exit_code == 1 and "name a registry repository" in res.output, res.output
    m = ctrmig.migrator("podman", url=sock)
    try:
        assert {c.name: c.state.lower() for c in m.list() if c.name == name} == \
            {name: "running"}
    finally:
        m.close()


def test_runc_container_through_a_registry_into_an_empty_runc(
        runc_state: RuncMigrator, test_image: str, registry: Registry,
        tmp_path: Path) -> None:
    """ctrmig's image of a runc container: the archive inside carries the base (ctrmig's
    --include-image), so a runc with an empty image cache restores it from the registry
    alone."""
    m = runc_state
    name = m.run(test_image, name=unique("ctrmig-img"), command=COUNTER_CMD)
    wait_for(lambda: last_count(m.logs(name)) >= 5, what=f"{name} counting")
    ref = registry.ref(f"runc/{name}", "v1")
    archive, pushed = images.checkpoint(m, name, ref)
    assert pushed.base == registry.ref(f"runc/{name}", "v1-base")
    assert archive.manifest.extra.get("image_archive")  # the base travels inside too
    before = last_count(m.logs(name))
    m.remove(name)
    other = RuncMigrator(state_dir=tmp_path / "other", workdir=tmp_path)
    try:
        with images.pulled(ref) as (image, path):
            assert image.engine == "runc" and image.container == name
            assert other.restore(path) == name
        wait_for(lambda: last_count(other.logs(name)) > before + 3, what="restored counter")
        assert before < first_count(other.logs(name)) <= before + 3
    finally:
        assert not cleanup_runc_state(other)


SSH_PORT = 2293
CTRMIG = str(Path(sys.executable).with_name("ctrmig"))


def test_migrate_via_registry_to_another_host_that_pulls_itself(
        test_image: str, tmp_path: Path) -> None:
    """runc on host A -> runc+ssh:// on host B, through a registry on A's address: A's
    ctrmig pushes, B's ctrmig pulls and restores (the archive never crosses the ssh link);
    B starts with an empty runc image cache."""
    with TwoHosts(tmp_path / "h") as hosts:
        a, b = hosts.a, hosts.b
        ssh_options = b.start_sshd(port=SSH_PORT)
        reg, svc = start_registry(tmp_path / "reg", address=a.address, netns=a.netns)
        src = RuncMigrator(state_dir=a.root / "runc")
        dst = RuncMigrator(state_dir=b.root / "runc")
        try:
            name = src.run(test_image, name=unique("ctrmig-via"), command=COUNTER_CMD)
            wait_for(lambda: last_count(src.logs(name)) >= 5, what=f"{name} counting")
            remote = (f"env CTRMIG_RUNC_STATE_DIR={dst.state_dir} "
                      f"CONTAINERS_REGISTRIES_CONF={reg.conf} {CTRMIG}")
            env = {"CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
                   "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
                   "CTRMIG_REMOTE_COMMAND": remote, "CONTAINERS_REGISTRIES_CONF": str(reg.conf),
                   "CTRMIG_JOURNAL_DIR": str(tmp_path / "journal")}
            res = a.run([CTRMIG, "migrate", name, "--from", "runc", "--to",
                         f"runc+ssh://root@{b.address}:{SSH_PORT}", "--via",
                         f"{reg.address}/moves", "--keep-source", "--json"], env=env)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout.decode().strip().splitlines()[-1])
            assert report["route"] == "registry" and report["bytes_moved"] == 0
            # Kept (stopped) for its log: where it stopped, the target goes on.
            assert [(c.name, c.state) for c in src.list()] == [(name, "checkpointed")]
            stopped_at = last_count(src.logs(name))
            wait_for(lambda: last_count(dst.logs(name)) > stopped_at + 3,
                     what="the moved counter")
            assert stopped_at < first_count(dst.logs(name)) <= stopped_at + 3
            assert not list((tmp_path / "journal").glob("*.json"))
        finally:
            assert not cleanup_runc_state(src)
            assert not cleanup_runc_state(dst)
            svc.stop()


def test_migrate_via_registry_into_an_empty_podman(
        podman_counter: Callable[[], str], podman_env: dict[str, str], registry: Registry,
        tmp_path: Path) -> None:
    """podman -> another podman whose storage holds no image at all: the image ctrmig
    pulls from the registry carries the base, loaded there before the restore."""
    name = podman_counter()
    sock = podman_env["CTRMIG_PODMAN_URL"]
    with TwoHosts(tmp_path / "h") as hosts:
        b = hosts.b
        b.start_podman()
        assert b.podman_cli("images", "-q").strip() == ""
        res = ctrmig_cli("migrate", name, "--from", f"podman+{sock}", "--to",
                         f"podman+unix://{b.podman_socket}", "--via",
                         f"{registry.address}/moves", "--keep-source", "--json",
                         env={**podman_env, "CTRMIG_JOURNAL_DIR": str(tmp_path / "j")})
        assert res.exit_code == 0, res.output
        src = ctrmig.migrator("podman", url=sock)
        dst = ctrmig.migrator("podman", url=f"unix://{b.podman_socket}")
        try:
            stopped_at = last_count(src.logs(name))
            assert_resumed(lambda: dst.logs(name), stopped_at)
            assert dst.has_image("localhost/ctrmig-busybox:latest")
        finally:
            src.close()
            dst.close()


def test_docker_container_through_a_registry(dockerd_socket: Path, registry: Registry,
                                              tmp_path: Path) -> None:
    dk = Docker(dockerd_socket, "localhost/ctrmig-busybox:latest")
    try:
        name = dk.counter()
        ref = registry.ref(f"docker/{name}", "v1")
        _, pushed = images.checkpoint(dk.m, name, ref)
        assert pushed.base == registry.ref(f"docker/{name}", "v1-base")
        before = last_count(dk.m.logs(name))
        new = dk.track(f"{name}-2")
        with images.pulled(ref) as (image, path):
            assert image.engine == "docker"
            assert dk.m.restore(path, name=new) == new
        dk.assert_continues(new, before)
    finally:
        dk.cleanup()


def test_migrate_via_target_fails_after_the_push(
        podman_counter: Callable[[], str], podman_env: dict[str, str], registry: Registry,
        tmp_path: Path) -> None:
    """The target's name is taken after ctrmig checked it was free: the pushed image's
    restore is refused, the source runs again (exactly once), the image leaves the
    registry, no journal stays."""
    name = podman_counter()
    sock = podman_env["CTRMIG_PODMAN_URL"]
    new = f"{name}-moved"
    journal = tmp_path / "journal"
    env = {**os.environ, **podman_env, "CTRMIG_JOURNAL_DIR": str(journal)}
    child = subprocess.Popen(
        [CTRMIG, "migrate", name, "--from", f"podman+{sock}", "--to", f"podman+{sock}",
         "--name", new, "--via", f"{registry.address}/moves"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The journal is written right after the target's name was found free.
        wait_for(lambda: child.poll() is not None or list(journal.glob("*.json")),
                 timeout=120, what="the migration journal")
        child.send_signal(signal.SIGSTOP)
        try:
            proc.run(["podman", "create", "--name", new, "localhost/ctrmig-busybox:latest",
                      "sleep", "100000"], timeout=120)
        finally:
            child.send_signal(signal.SIGCONT)
        _, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = err.decode(errors="replace")
    assert child.returncode == 1, text
    assert "already" in text and new in text, text
    m = ctrmig.migrator("podman", url=sock)
    try:
        states = {c.name: c.state.lower() for c in m.list() if c.name in (name, new)}
        assert states == {name: "running", new: "created"}, states
        stopped_at = last_count(m.logs(name))
        wait_for(lambda: last_count(m.logs(name)) > stopped_at + 3, what="the source")
        m.remove(new)
    finally:
        m.close()
    assert not list(journal.glob("*.json"))
    tags = json.loads(proc.output(["skopeo", "--registries-conf", str(registry.conf),
                                   "list-tags", f"docker://{registry.address}/moves"],
                                  timeout=60))["Tags"] or []
    assert not [t for t in tags if t.startswith(f"{name}-") and not t.endswith("-base")]
