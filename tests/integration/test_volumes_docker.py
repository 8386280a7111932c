"""docker volumes travel with the container (#17), on the real stack.

Every volume's content is written by the test (bytes of every value, an owner, a mode, a
symlink) and read back from the restored container byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner
from podman import PodmanClient

import ctrmig
from ctrmig import cli
from ctrmig.archive import verify
from ctrmig.engines.docker import DockerMigrator, volumes
from ctrmig.errors import CheckpointError, PrivilegeError, VolumeConflictError
from ctrmig.host import images
from tests.conftest import COUNTER_CMD, last_count, need, resumed_count, unique, wait_for
from tests.hosts import TwoHosts

IMAGE = "localhost/ctrmig-busybox:latest"
BLOB = bytes(range(256)) * 1024 + b"end"  # 256 KiB and a tail: every byte value


def _content(tag: str) -> bytes:
    """A tar of a volume's content: a blob, a file owned 1234:4321 mode 0640, a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in (("blob", BLOB + tag.encode(), 0o644),
                                 ("sub/owned", f"{tag}\n".encode(), 0o640)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 1234, 4321
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "blob"
        tar.addfile(link)
    return buf.getvalue()


class Volumes:
    """The migrator, a docker-py client, and the containers and volumes the test made."""

    def __init__(self, url: str):
        self.url = url
        self.m = DockerMigrator(url)
        self.api = docker.APIClient(base_url=url, timeout=120)
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self) -> str:
        name = unique("ctrmig-vol")
        self.api.create_volume(name)
        self.volumes.append(name)
        return name

    def counter(self, binds: list[str], anonymous: tuple[str, ...] = ()) -> str:
        """The counter workload with the volumes ``binds`` (and anonymous ones)."""
        name = unique("ctrmig-dkv")
        self.names.append(name)
        c = self.api.create_container(
            IMAGE, COUNTER_CMD, name=name, volumes=[b.split(":")[1] for b in binds] +
            list(anonymous), host_config=self.api.create_host_config(binds=binds))
        self.api.start(c["Id"])
        wait_for(lambda: last_count(self.m.logs(name)) >= 5, what=f"{name} counting")
        return name

    def write(self, container: str, path: str, tag: str) -> None:
        assert self.api.put_archive(container, path, _content(tag))

    def read(self, container: str, path: str) -> dict[str, tuple[int, int, int, bytes]]:
        stream, _ = self.api.get_archive(container, path)
        return entries(b"".join(stream))

    def anonymous_at(self, container: str, dest: str) -> str:
        mounts = self.api.inspect_container(container)["Mounts"]
        return next(str(m["Name"]) for m in mounts if m["Destination"] == dest)

    def volume_names(self) -> set[str]:
        return {v["Name"] for v in self.api.volumes().get("Volumes") or []}

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_container(name, force=True, v=True)
        for name in self.volumes:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_volume(name, force=True)
        self.m.close()
        self.api.close()


def entries(archive: bytes) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry of a GET /archive tar, below its top: (mode, uid, gid, data or link)."""
    got = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            data = f.read() if f else m.linkname.encode()
            got[m.name.split("/", 1)[1] if "/" in m.name else "."] = (
                m.mode & 0o7777, m.uid, m.gid, data)
    return got


def expected(tag: str) -> dict[str, tuple[int, int, int, bytes]]:
    return {"blob": (0o644, 1234, 4321, BLOB + tag.encode()),
            "sub/owned": (0o640, 1234, 4321, f"{tag}\n".encode()),
            "link": (0o777, 0, 0, b"blob")}


def assert_holds(v: Volumes, container: str, path: str, tag: str) -> None:
    got = v.read(container, path)
    want = expected(tag)
    assert {k: got.get(k) for k in want} == want


@pytest.fixture
def vols(dockerd_socket: Path) -> Iterator[Volumes]:
    v = Volumes(f"unix://{dockerd_socket}")
    yield v
    v.cleanup()


def test_round_trip_with_a_named_and_an_anonymous_volume(vols: Volumes, tmp_path: Path) -> None:
    data = vols.volume()
    name = vols.counter([f"{data}:/data"], anonymous=("/anon",))
    vols.write(name, "/data", "named")
    vols.write(name, "/anon", "anon")
    anon = vols.anonymous_at(name, "/anon")
    archive = tmp_path / "c.tar"
    vols.m.checkpoint(name, archive)
    before = last_count(vols.m.logs(name))

    manifest = verify(archive)
    assert {f"volumes/{data}.tar", f"volumes/{anon}.tar"} <= set(manifest.files)
    recorded = {v["name"]: v for v in manifest.extra["volumes"]}
    assert recorded[data]["anonymous"] is False and recorded[anon]["anonymous"] is True
    assert recorded[data]["bytes"] == len(BLOB) + len("named") + len("named\n")
    shown = json.loads(CliRunner().invoke(cli.cli, ["inspect", str(archive), "--json"]).output)
    assert {(v["name"], v["kind"], v["destination"], v["content"]) for v in shown["volumes"]} \
        == {(data, "named", "/data", True), (anon, "anonymous", "/anon", True)}

    # Gone, the container and both volumes: the archive alone brings them back.
    vols.api.remove_container(name, force=True, v=True)
    vols.api.remove_volume(data)
    assert {data, anon}.isdisjoint(vols.volume_names())
    assert vols.m.restore(archive) == name
    assert vols.api.inspect_container(name)["State"]["Running"]
    assert resumed_count(lambda: vols.m.logs(name)) > before > 0, "memory state went on"
    assert_holds(vols, name, "/data", "named")
    assert_holds(vols, name, "/anon", "anon")
    assert data in vols.volume_names(), "the named volume was recreated by name"

    # Checkpointed again, container removed but the volume kept as it was: restored onto it.
    vols.m.checkpoint(name, tmp_path / "again.tar")
    vols.api.remove_container(name, force=True, v=True)
    assert vols.m.restore(tmp_path / "again.tar") == name
    assert_holds(vols, name, "/data", "named")


def test_a_volume_with_other_content_is_refused_then_replaced(
    vols: Volumes, tmp_path: Path
) -> None:
    data = vols.volume()
    name = vols.counter([f"{data}:/data"])
    vols.write(name, "/data", "first")
    archive = tmp_path / "c.tar"
    vols.m.checkpoint(name, archive)
    vols.api.remove_container(name, force=True, v=True)
    # Another container changes the volume while the archive waits.
    other = vols.counter([f"{data}:/data"])
    vols.write(other, "/data", "second")
    with pytest.raises(VolumeConflictError, match=data) as caught:
        vols.m.restore(archive, name=unique("ctrmig-dkv"))
    assert caught.value.hint and "--replace-volumes" in caught.value.hint
    with pytest.raises(VolumeConflictError, match="in use by running"):
        vols.m.restore(archive, name=unique("ctrmig-dkv"), replace_volumes=True)
    assert_holds(vols, other, "/data", "second")  # untouched
    vols.api.remove_container(other, force=True)

    restored = vols.m.restore(archive, replace_volumes=True)
    assert_holds(vols, restored, "/data", "first")


def test_a_volume_shared_with_another_running_container_is_refused(
    vols: Volumes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = vols.volume()
    name = vols.counter([f"{data}:/data"])
    other = vols.counter([f"{data}:/data"])
    vols.write(name, "/data", "shared")
    with pytest.raises(CheckpointError, match=f"{data} \\(with {other}\\)") as caught:
        vols.m.checkpoint(name, tmp_path / "c.tar")
    assert caught.value.hint and "--ignore-volumes" in caught.value.hint
    assert vols.api.inspect_container(name)["State"]["Running"], "left running, untouched"
    assert not (tmp_path / "c.tar").exists()

    # Asked to leave volumes out, it checkpoints; the manifest says the content is not in.
    archive = tmp_path / "ignored.tar"
    vols.m.checkpoint(name, archive, ignore_volumes=True)
    manifest = verify(archive)
    assert [(v["member"], v["carried"]) for v in manifest.extra["volumes"]] == [(None, False)]
    assert not [f for f in manifest.files if f.startswith("volumes/")]
    vols.api.remove_container(name, force=True)
    caplog.set_level(logging.WARNING, logger="ctrmig.engines.docker")
    restored = vols.m.restore(archive)
    vols.names.append(restored)
    assert any("no content of volume" in r.getMessage() for r in caplog.records)
    assert_holds(vols, restored, "/data", "shared")  # the volume as it is here


def test_leave_running_pauses_while_the_volumes_are_read(vols: Volumes, tmp_path: Path) -> None:
    data = vols.volume()
    name = vols.counter([f"{data}:/data"])
    vols.write(name, "/data", "live")
    archive = tmp_path / "c.tar"
    vols.m.checkpoint(name, archive, leave_running=True)
    state = vols.api.inspect_container(name)["State"]
    assert state["Running"] and not state["Paused"]
    copy = vols.m.restore(archive, name=unique("ctrmig-dkv"))
    vols.names.append(copy)
    assert_holds(vols, copy, "/data", "live")  # the same volume, same content: kept


def test_volumes_read_through_the_archive_api(
    vols: Volumes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume whose directory is not on this host comes through GET /archive (of the
    paused container): the same member content and digest as read from its directory;
    and goes into the new container through PUT /archive."""
    data = vols.volume()
    name = vols.counter([f"{data}:/data"], anonymous=("/anon",))
    vols.write(name, "/data", "api")
    vols.write(name, "/anon", "api-anon")
    local = vols.m.checkpoint(name, tmp_path / "local.tar", leave_running=True).manifest
    monkeypatch.setattr(volumes, "local_dir", lambda info: None)
    archive = tmp_path / "api.tar"
    remote = vols.m.checkpoint(name, archive, leave_running=True).manifest
    assert sorted((v["name"], v["digest"], v["bytes"]) for v in remote.extra["volumes"]) == \
        sorted((v["name"], v["digest"], v["bytes"]) for v in local.extra["volumes"])
    assert not vols.api.inspect_container(name)["State"]["Paused"]
    vols.api.remove_container(name, force=True, v=True)
    vols.api.remove_volume(data)
    assert vols.m.restore(archive) == name  # filled through PUT /archive
    assert_holds(vols, name, "/data", "api")
    assert_holds(vols, name, "/anon", "api-anon")


def test_a_volume_with_driver_options_needs_allow_privileged(
    vols: Volumes, tmp_path: Path
) -> None:
    """A local volume with o=bind (here of a private directory) is a host path in disguise:
    restore refuses to recreate it without --allow-privileged. dockerd mounts such a
    volume only while it is in use, so its content goes out and in through dockerd."""
    device = tmp_path / "device"
    device.mkdir()
    data = unique("ctrmig-vol")
    vols.api.create_volume(data, "local", {"type": "none", "o": "bind",
                                           "device": str(device)})
    vols.volumes.append(data)
    name = vols.counter([f"{data}:/data"])
    vols.write(name, "/data", "bound")
    archive = tmp_path / "c.tar"
    vols.m.checkpoint(name, archive)  # stopped: dockerd has unmounted the volume
    recorded = verify(archive).extra["volumes"][0]
    assert recorded["carried"] and recorded["options"]["o"] == "bind"
    vols.api.remove_container(name, force=True, v=True)
    vols.api.remove_volume(data)
    for child in device.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    shown = json.loads(CliRunner().invoke(cli.cli, ["inspect", str(archive), "--json"]).output)
    assert {"kind": "volume", "detail": f"{data} (local driver, options device,o,type)"} \
        in shown["privileges"]
    with pytest.raises(PrivilegeError, match=f"volume {data}"):
        vols.m.restore(archive)
    assert data not in vols.volume_names() and not vols.api.containers(all=True,
                                                                     filters={"name": name})
    assert vols.m.restore(archive, allow_privileged=True) == name
    assert_holds(vols, name, "/data", "bound")
    assert (device / "blob").read_bytes() == BLOB + b"bound", "in the bound directory"


# --- docker -> docker over two hosts -------------------------------------------------------

@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("keep_source", [False, True])
def test_migrate_takes_the_volume_to_the_other_host(
    session_dir: Path, test_image: str, tmp_path: Path, keep_source: bool
) -> None:
    for tool in ("dockerd", "sshd", "ip"):
        need(tool)
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        a, b = hosts.a, hosts.b
        sock_a, sock_b = a.start_dockerd(), b.start_dockerd()
        ssh_options = b.start_sshd(port=2222)
        src, dst = Volumes(f"unix://{sock_a}"), Volumes(f"unix://{sock_b}")
        try:
            archive = images.podman_save(test_image, tmp_path / "image.tar")
            with archive.open("rb") as f:
                src.api.load_image(f)
            data = src.volume()
            name = src.counter([f"{data}:/data"], anonymous=("/anon",))
            src.write(name, "/data", "moved")
            src.write(name, "/anon", "moved-anon")
            res = hosts.migrate_docker(name, sock_a, sock_b, ssh_options, tmp_path / "journal",
                                       *(["--keep-source"] if keep_source else []))
            assert res.returncode == 0, res.stderr.decode()
            assert json.loads(res.stdout)["target_name"] == name

            dst.names.append(name)
            dst.volumes.append(data)
            assert dst.api.inspect_container(name)["State"]["Running"]
            assert_holds(dst, name, "/data", "moved")
            assert_holds(dst, name, "/anon", "moved-anon")
            assert data in dst.volume_names()
            if keep_source:  # kept stopped, with its volumes as they were
                assert src.api.inspect_container(name)["State"]["Status"] == "exited"
                assert_holds(src, name, "/data", "moved")
            else:  # nothing left on the source: neither the container nor its volumes
                assert not src.api.containers(all=True)
                assert src.volume_names() == set(), "the source's volumes went with it"
        finally:
            src.cleanup()
            dst.cleanup()


# --- podman: unchanged, and the same layout ------------------------------------------------


def test_podman_archives_carry_volumes_in_the_same_layout(
    podman_socket: Path, test_image: str, tmp_path: Path
) -> None:
    """podman exports volumes/NAME.tar itself; ctrmig's podman path keeps and restores it,
    and inspect lists it like a docker archive's."""
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
    data, name = unique("ctrmig-vol"), unique("ctrmig-pdv")
    client.volumes.create(data)
    try:
        client.containers.run(test_image, COUNTER_CMD, name=name, detach=True,
                              volumes={data: {"bind": "/data", "mode": "rw"}})
        wait_for(lambda: last_count(m.logs(name)) >= 5, what=f"{name} counting")
        assert client.containers.get(name).put_archive("/data", _content("podman"))
        before = _podman_entries(client, name, "/data")  # podman's cp chowns to root
        assert before["blob"][3] == BLOB + b"podman"
        archive = tmp_path / "p.tar"
        m.checkpoint(name, archive)
        assert f"volumes/{data}.tar" in verify(archive).files
        shown = json.loads(CliRunner().invoke(cli.cli, ["inspect", str(archive), "--json"]).output)
        assert [(v["name"], v["content"]) for v in shown["volumes"]] == [(data, True)]

        client.containers.get(name).remove(force=True)
        client.volumes.get(data).remove(force=True)
        assert m.restore(archive) == name
        assert _podman_entries(client, name, "/data") == before
    finally:
        with contextlib.suppress(Exception):
            client.containers.get(name).remove(force=True)
        with contextlib.suppress(Exception):
            client.volumes.get(data).remove(force=True)
        m.close()
        client.close()  # type: ignore[no-untyped-call]


def _podman_entries(client: PodmanClient, name: str, path: str) -> dict[str, tuple[
        int, int, int, bytes]]:
    stream, _ = client.containers.get(name).get_archive(path)
    return entries(b"".join(stream))
