"""An archive written by one engine restores into another (issue #14): every pair of
podman, docker and runc, with the counter workload going on from where it was frozen."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import proc
from tests.conftest import (
    COUNTER_CMD,
    cleanup_runc_state,
    first_count,
    last_count,
    need,
    podman_read_file,
    resumed_count,
    unique,
    wait_for,
)
from tests.hosts import TwoHosts


class Side:
    """One engine of a pair: its migrator, how to start the counter and read a file."""

    def __init__(self, m: Any, start: Callable[[str, str, list[str], str | None], None],
                 read: Callable[[str, str], str], image: str):
        self.m = m
        self.image = image
        self._start = start
        self.read = read
        self.names: list[str] = []

    def track(self, name: str) -> str:
        self.names.append(name)
        return name

    def counter(self, image: str | None = None, command: list[str] = COUNTER_CMD,
                volume: str | None = None) -> str:
        """A counter from ``image``; with ``volume``, that named volume at /data."""
        name = self.track(unique("ctrmig-x"))
        self._start(name, image or self.image, command, volume)
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
    def start(name: str, image: str, cmd: list[str], volume: str | None) -> None:
        extra: dict[str, Any] = {"volumes": {volume: {"bind": "/data"}}} if volume else {}
        client.containers.run(image, cmd, name=name, detach=True, **extra)

    return Side(m, start, lambda n, p: podman_read_file(client, n, p), image)


def _docker(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> Side:
    sock: Path = request.getfixturevalue("dockerd_socket")
    image: str = request.getfixturevalue("test_image")
    api = docker.APIClient(base_url=f"unix://{sock}", timeout=120)
    stack.callback(api.close)
    m = ctrmig.migrator("docker", base_url=f"unix://{sock}")
    stack.callback(m.close)

    def start(name: str, image: str, cmd: list[str], volume: str | None) -> None:
        config = api.create_host_config(binds=[f"{volume}:/data"] if volume else None)
        api.start(api.create_container(image, cmd, name=name, host_config=config)["Id"])

    def read(name: str, path: str) -> str:
        return bytes(api.exec_start(api.exec_create(name, ["cat", path]))).decode()

    side = Side(m, start, read, image)
    side.api = api  # type: ignore[attr-defined]
    return side


def _runc(request: pytest.FixtureRequest, stack: contextlib.ExitStack) -> Side:
    m: RuncMigrator = request.getfixturevalue("runc_state")  # its teardown checks leaks
    image: str = request.getfixturevalue("test_image")
    def start(name: str, image: str, cmd: list[str], volume: str | None) -> None:
        m.run(image, name=name, command=cmd, volumes=[f"{volume}:/data"] if volume else ())

    return Side(m, start,
                lambda n, p: (m.bundles_dir / n / "rootfs" / p.lstrip("/")).read_text(), image)


SIDES = {"podman": _podman, "docker": _docker, "runc": _runc}
PAIRS = [("podman", "runc"), ("runc", "podman"), ("docker", "runc"), ("runc", "docker"),
         ("podman", "docker"), ("docker", "podman")]


def _pair(source: str, target: str) -> Any:
    return pytest.param(source, target, id=f"{source}-to-{target}",
                        marks=[getattr(pytest.mark, source), getattr(pytest.mark, target)])


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


@pytest.mark.parametrize(("source", "target"), [_pair(s, t) for s, t in PAIRS])
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


@pytest.mark.parametrize(("source", "target"), [_pair("runc", "podman"),
                                                _pair("runc", "docker"),
                                                _pair("docker", "runc")])
def test_the_carried_image_is_loaded_in_the_targets_format(
    source: str, target: str, sides: Callable[[str], Side], tmp_path: Path
) -> None:
    """An image only the source holds travels in its engine's format (runc's oci-archive
    tagged by digest, docker's docker-archive) and the target loads it under its name."""
    src, dst = sides(source), sides(target)
    tag = f"localhost/{unique('ctrmig-cross')}:latest"
    if source == "runc":  # runc reads podman's storage: tagged there, gone once cached
        proc.run(["podman", "tag", src.image, tag], timeout=60)
        untag = ["podman", "untag", tag, tag]  # without a name it would drop every one
    else:
        src.api.tag(src.image, tag)  # type: ignore[attr-defined]
        untag = []
    try:
        name = src.counter(tag)
        if untag:
            proc.run(untag, timeout=60)
        assert dst.m.has_image(tag) is False
        archive = tmp_path / "c.tar"
        src.m.checkpoint(name, archive, compression="none", include_image=True)
        before = last_count(src.m.logs(name))
        src.m.remove(name)
        restored = dst.track(dst.m.restore(archive, name=unique("ctrmig-x")))
        if target == "runc":  # its cache is by digest, the archive's copy named as read
            refs = "".join(p.read_text() for p in dst.m.images.dir.glob("*/source-refs"))
            assert "docker-archive:" in refs, refs
        else:
            assert dst.m.has_image(tag), "the target holds the image under its name"
        assert resumed_count(lambda: dst.m.logs(restored)) > before
    finally:
        for side in (src, dst):
            side.cleanup()
        # Without --force: the tag goes, and the image only when no other name holds it
        # (it may be the shared test image itself).
        proc.run(["podman", "rmi", "-i", tag], timeout=60, check=False)
        for side in (src, dst):
            if hasattr(side, "api"):
                with contextlib.suppress(docker.errors.ImageNotFound):
                    side.api.remove_image(tag)


@pytest.mark.parametrize(("source", "target"), [
    _pair("podman", "runc"), _pair("docker", "podman"), _pair("runc", "docker")])
def test_migrate_between_engines(source: str, target: str, sides: Callable[[str], Side]
                                 ) -> None:
    """`ctrmig migrate --from X --to Y` on one host: preflight, the stream, and the source
    removed; a round of pairs that covers each engine as a source and as a target."""
    src, dst = sides(source), sides(target)
    name = src.counter()
    report = ctrmig.migrate(name, source=src.m, target=dst.m)
    dst.track(report.target_name)
    assert report.source_engine == source and report.target_engine == target
    assert not src.m.exists(name), "the source is removed after a successful migration"
    after = resumed_count(lambda: dst.m.logs(report.target_name), f"the {target} counter")
    assert after > 5, "the count went on from the source's"
    assert dst.read(report.target_name, "/state.txt") == "written-after-start\n"


CTRMIG = str(Path(sys.executable).with_name("ctrmig"))


@pytest.mark.podman
@pytest.mark.runc
def test_podman_migrates_to_runc_over_ssh_with_its_image(
    session_dir: Path, test_image: str, tmp_path: Path
) -> None:
    """podman on host A -> runc+ssh:// on host B, whose image store is empty: the image
    travels in the archive as podman's oci-archive and runc unpacks it from there."""
    for tool in ("runc", "criu", "skopeo", "umoci", "sshd", "ip"):
        need(tool)
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        a, b = hosts.a, hosts.b
        a.start_podman()
        hosts.load_test_image(a, session_dir)
        ssh_options = b.start_sshd(port=2222)
        empty = tmp_path / "empty-store"
        conf = tmp_path / "storage.conf"  # B's skopeo sees no image at all
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{empty}/graph"\n'
                        f'runroot = "{empty}/run"\n')
        dst = RuncMigrator(state_dir=b.root / "runc")
        client = PodmanClient(base_url=f"unix://{a.podman_socket}")
        name = unique()
        try:
            client.containers.run(test_image, COUNTER_CMD, name=name, detach=True,
                                  network_mode="none")
            src = ctrmig.migrator("podman", url=f"unix://{a.podman_socket}")
            wait_for(lambda: last_count(src.logs(name)) >= 5, what="counter on host A")
            env = {"CTRMIG_JOURNAL_DIR": str(tmp_path / "journal"),
                   "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
                   "CTRMIG_REMOTE_COMMAND": f"env CONTAINERS_STORAGE_CONF={conf} "
                                            f"CTRMIG_RUNC_STATE_DIR={dst.state_dir} {CTRMIG}"}
            res = a.run([CTRMIG, "migrate", name, "--from", f"podman+unix://{a.podman_socket}",
                         "--to", f"runc+ssh://root@{b.address}:2222", "--include-image",
                         "--json"], env=env)
            assert res.returncode == 0, res.stderr.decode()
            report = json.loads(res.stdout)
            assert report["target_name"] == name and report["target_engine"] == "runc"
            assert not src.exists(name), "the source is removed"
            wait_for(lambda: last_count(dst.logs(name)) > 5, what="counter on host B")
            assert first_count(dst.logs(name)) > 5, "the count went on, it did not restart"
            assert (dst.bundles_dir / name / "rootfs" / "state.txt").read_text() == \
                "written-after-start\n"
            refs = "".join(p.read_text() for p in dst.images.dir.glob("*/source-refs"))
            assert "oci-archive:" in refs, f"the image came from the archive: {refs!r}"
            src.close()
        finally:
            for c in dst.list():
                dst.remove(c.name)
            client.close()  # type: ignore[no-untyped-call]


VOLUME_CMD = ["/bin/sh", "-c", "echo in-the-volume > /data/f; seq 1 20000 > /data/seq; "
              + COUNTER_CMD[2]]
#: /data/seq as the source wrote it (108 KiB), compared byte for byte on the target.
VOLUME_SEQ = "".join(f"{i}\n" for i in range(1, 20001))


def _remove_volume(side: Side, engine: str, volume: str) -> None:
    if engine == "podman":
        proc.run(["podman", "volume", "rm", "-f", volume], timeout=60, check=False)
    elif engine == "docker":
        side.api.remove_volume(volume)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("source", "target"), [
    _pair("runc", "podman"), _pair("runc", "docker"), _pair("docker", "runc"),
    _pair("podman", "runc"), _pair("podman", "docker"), _pair("docker", "podman")])
def test_a_named_volume_travels_across_engines(source: str, target: str,
                                               sides: Callable[[str], Side],
                                               tmp_path: Path) -> None:
    """A named volume arrives as the target engine's volume, content and all (every
    engine packs it as podman does: volumes/NAME.tar)."""
    src, dst = sides(source), sides(target)
    volume = unique("ctrmig-vol")
    try:
        name = src.counter(command=VOLUME_CMD, volume=volume)
        archive = tmp_path / "c.tar"
        src.m.checkpoint(name, archive, compression="none")
        src.m.remove(name)
        restored = dst.track(dst.m.restore(archive, name=unique("ctrmig-x")))
        assert resumed_count(lambda: dst.m.logs(restored)) > 5
        if target == "runc":
            data = dst.m.volumes.data(volume) / "f"
            assert data.read_text() == "in-the-volume\n"
            assert (data.parent / "seq").read_text() == VOLUME_SEQ
        else:
            assert dst.read(restored, "/data/f") == "in-the-volume\n"
            assert dst.read(restored, "/data/seq") == VOLUME_SEQ
    finally:
        for side, engine in ((src, source), (dst, target)):
            side.cleanup()
            _remove_volume(side, engine, volume)


@pytest.mark.podman
@pytest.mark.runc
def test_podman_imports_a_foreign_archive_through_its_api(
    sides: Callable[[str], Side], podman_socket: Path, tmp_path: Path
) -> None:
    """A podman that is not this host's (reached over ssh or tcp) gets the foreign archive
    as podman's import of a re-packed stream, read from the spooled archive file (zstd),
    and its image converted from the archive's copy."""
    src = sides("runc")
    tag = f"localhost/{unique('ctrmig-cross')}:latest"
    proc.run(["podman", "tag", src.image, tag], timeout=60)
    dst = ctrmig.migrator("podman", url=f"unix://{podman_socket}", direct=False)
    restored = unique("ctrmig-x")
    try:
        name = src.counter(tag)
        proc.run(["podman", "untag", tag, tag], timeout=60)
        archive = tmp_path / "c.tar.zst"
        src.m.checkpoint(name, archive, compression="zstd", include_image=True)
        before = last_count(src.m.logs(name))
        src.m.remove(name)
        assert dst.restore(archive, name=restored) == restored
        assert resumed_count(lambda: dst.logs(restored)) > before
        client = PodmanClient(base_url=f"unix://{podman_socket}")
        assert podman_read_file(client, restored, "/state.txt") == "written-after-start\n"
        client.close()  # type: ignore[no-untyped-call]
    finally:
        with contextlib.suppress(ctrmig.CtrmigError):
            dst.remove(restored)
        dst.close()
        proc.run(["podman", "rmi", "-i", tag], timeout=60, check=False)


@pytest.mark.runc
@pytest.mark.docker
def test_runc_migrates_to_docker_over_ssh_without_the_image(
    session_dir: Path, test_image: str, tmp_path: Path
) -> None:
    """runc on host A -> docker+ssh:// on host B, whose dockerd holds no image: ctrmig on
    B converts runc's oci-archive (tagged by digest) for docker's load."""
    for tool in ("runc", "criu", "skopeo", "umoci", "sshd", "dockerd", "ip"):
        need(tool)
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        a, b = hosts.a, hosts.b
        sock_b = b.start_dockerd()
        ssh_options = b.start_sshd(port=2222)
        src = RuncMigrator(state_dir=a.root / "runc")
        dst = docker.APIClient(base_url=f"unix://{sock_b}", timeout=120)
        name = src.run(test_image, name=unique(), command=COUNTER_CMD)
        try:
            wait_for(lambda: last_count(src.logs(name)) >= 5, what="counter on host A")
            assert not dst.images(), "host B starts without any image"
            env = {"CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
                   "CTRMIG_JOURNAL_DIR": str(tmp_path / "journal"),
                   "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
                   "CTRMIG_REMOTE_COMMAND": f"env DOCKER_HOST=unix://{sock_b} {CTRMIG}"}
            res = a.run([CTRMIG, "migrate", name, "--from", "runc",
                         "--to", f"docker+ssh://root@{b.address}:2222", "--json"], env=env)
            assert res.returncode == 0, res.stderr.decode()
            assert json.loads(res.stdout)["target_engine"] == "docker"
            assert not src.exists(name), "the source is removed"

            def logs() -> str:
                return bytes(dst.logs(name)).decode()

            wait_for(lambda: last_count(logs()) > 5, what="counter on host B")
            assert first_count(logs()) > 5, "the count went on, it did not start again"
            assert [t for i in dst.images() for t in i["RepoTags"] or []] == [test_image]
        finally:
            for c in src.list():
                src.remove(c.name)
            for c in dst.containers(all=True):
                dst.remove_container(c["Id"], force=True)
            dst.close()


@pytest.mark.podman
@pytest.mark.runc
def test_a_failed_restore_across_engines_brings_the_source_back(
    sides: Callable[[str], Side], tmp_path: Path
) -> None:
    """The runc target fails after the source was frozen (its bundle template is broken):
    the podman source resumes from the checkpoint it kept, counting on, and the target
    holds nothing."""
    src = sides("podman")
    template = tmp_path / "broken.json"
    template.write_text("{")
    dst = RuncMigrator(state_dir=tmp_path / "state", workdir=tmp_path, template=template)
    name = src.counter()
    with pytest.raises(ctrmig.CtrmigError, match="template"):
        ctrmig.migrate(name, source=src.m, target=dst)  # type: ignore[arg-type]
    wait_for(lambda: src.m.list() and next(
        c for c in src.m.list() if c.name == name).state == "running", what="source back")
    before = last_count(src.m.logs(name))
    wait_for(lambda: last_count(src.m.logs(name)) > before, what="the source counting on")
    assert dst.list() == [] and not cleanup_runc_state(dst), "the target holds nothing"
