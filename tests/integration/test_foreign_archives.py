"""Checkpoints ctrmig did not write, made by real engines: podman's own --export (none,
gzip, zstd), a CRI-O/kubelet archive built from a real podman export (no CRI-O runs here:
its CRIU images are real, its config.dump and annotations CRI-O's), a docker checkpoint
directory. inspect, verify and restore take them, and say the writer gave no checksums."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner
from podman import PodmanClient

import ctrmig
from ctrmig.archive import foreign
from ctrmig.cli import cli
from ctrmig.engines.runc import RuncMigrator
from ctrmig.errors import (
    ContainerNotFoundError,
    PrivilegeError,
    UnsafeArchiveError,
    UntranslatableError,
)
from tests.conftest import (
    COUNTER_CMD,
    last_count,
    podman_read_file,
    resumed_count,
    unique,
    wait_for,
)
from tests.integration.test_cross_engine import Side, sides  # noqa: F401  (sides: a fixture)


@pytest.fixture
def podman(podman_socket: Path) -> Iterator[ctrmig.Migrator]:
    m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
    yield m
    m.close()


@pytest.fixture
def podman_client(podman_socket: Path) -> Iterator[PodmanClient]:
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    yield client
    client.close()  # type: ignore[no-untyped-call]


def podman_export(name: str, dest: Path, compress: str) -> Path:
    """podman's own ``container checkpoint --export`` of ``name`` (it stops)."""
    subprocess.run(["podman", "container", "checkpoint", "--export", str(dest),
                    "--compress", compress, name], check=True, capture_output=True, timeout=300)
    return dest


def assert_resumed(m: ctrmig.Migrator, source: str | int, new: str) -> None:
    """The restored counter went on from where the source (or the count given) stopped,
    never from 1 again: its memory came back."""
    stopped_at = source if isinstance(source, int) else last_count(m.logs(source))
    assert stopped_at >= 5
    wait_for(lambda: last_count(m.logs(new)) > stopped_at + 3, what=f"{new} counting on")
    counts = [int(c) for c in re.findall(r"count=(\d+)", m.logs(new))]
    # podman carries the old log (ctr.log) along; whatever the log starts with, the
    # counts run on without a restart.
    assert counts == list(range(counts[0], counts[-1] + 1)), counts[:40]
    assert stopped_at + 1 in counts


def cli_json(*argv: str) -> dict[str, object]:
    result = CliRunner().invoke(cli, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_podmans_own_export_is_inspected_verified_and_restored(
    compress: str, podman: ctrmig.Migrator, podman_counter: Callable[[], str],
    podman_client: PodmanClient, podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    name = podman_counter()
    archive = podman_export(name, tmp_path / f"{compress}.tar", compress)

    manifest = ctrmig.inspect(archive)
    assert manifest.engine == "podman"
    assert (manifest.container.name, manifest.container.image) == (name, test_image)
    assert manifest.container.command == COUNTER_CMD
    assert foreign.facts(manifest) is not None
    assert foreign.NO_CHECKSUMS in foreign.note(manifest)
    assert ctrmig.verify(archive).files == manifest.files
    assert manifest.memory_bytes > 0 and "rootfs-diff.tar" in manifest.files

    data = cli_json("inspect", str(archive))
    assert data["checksums"] == "ok" and data["checksums_from_writer"] is False
    assert foreign.NO_CHECKSUMS in str(data["foreign"])
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 0 and foreign.NO_CHECKSUMS in result.output, result.output

    new = unique()
    if compress == "zstd":  # the CLI, engine taken from the archive
        result = CliRunner().invoke(cli, ["restore", str(archive), "--name", new,
                                          "--url", f"unix://{podman_socket}"])
        assert result.exit_code == 0, result.output
        assert foreign.NO_CHECKSUMS in result.output
    elif compress == "gzip":  # podman's own import (the route to a podman elsewhere)
        with ctrmig.migrator("podman", url=f"unix://{podman_socket}", direct=False) as m:
            assert m.restore(archive, name=new) == new
    else:
        assert podman.restore(archive, name=new) == new
    try:
        assert_resumed(podman, name, new)
        assert podman_read_file(podman_client, new, "/state.txt") == "written-after-start\n"
    finally:
        podman.remove(new)


def test_hostile_and_privileged_podman_exports_are_refused_before_podman(
    podman: ctrmig.Migrator, podman_counter: Callable[[], str], podman_client: PodmanClient,
    test_image: str, tmp_path: Path,
) -> None:
    name = podman_counter()
    export = podman_export(name, tmp_path / "p.tar", "none")
    # The real export plus one member escaping by a symlink: no manifest to blame.
    with tarfile.open(export) as src, tarfile.open(tmp_path / "evil.tar", "w") as dst:
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info) if info.isfile() else None)
        link = tarfile.TarInfo("checkpoint/pages-9.img")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        dst.addfile(link)
    new = unique()
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        podman.restore(tmp_path / "evil.tar", name=new)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "evil.tar")])
    assert result.exit_code == 1 and "symlink" in result.output, result.output
    assert not podman.exists(new)

    # A container with more than default capabilities: podman's own export is judged
    # like ctrmig's (spec.dump and the CRIU images' credentials).
    priv = unique()
    podman_client.containers.run(test_image, COUNTER_CMD, name=priv, detach=True,
                                 cap_add=["SYS_ADMIN"])
    try:
        wait_for(lambda: last_count(podman.logs(priv)) >= 5, what=f"{priv} counting")
        archive = podman_export(priv, tmp_path / "priv.tar.zst", "zstd")
    finally:
        podman.remove(priv)
    with pytest.raises(PrivilegeError, match="SYS_ADMIN"):
        podman.restore(archive, name=new)
    assert not podman.exists(new)


# --- CRI-O ---------------------------------------------------------------------------------

def crio_archive(podman_export_tar: Path, dest: Path, *, pod: str = "counters",
                 container: str = "counter", mounts: tuple[dict[str, object], ...] = ()
                 ) -> Path:
    """A CRI-O/kubelet checkpoint archive (the layout of cri-o's internal/lib/checkpoint.go,
    read by checkpointctl) made of a real podman export: its CRIU images, spec.dump and
    rootfs diff (plus ``mounts`` in its spec); config.dump in CRI-O's form (checkpointctl's
    ContainerConfig), the
    io.kubernetes annotations CRI-O sets, the container log under CRI-O's name, no
    podman-only members; uncompressed, from "./" as CRI-O writes it."""
    with tarfile.open(podman_export_tar) as src:
        members = {m.name: (m, src.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                   for m in src.getmembers()}
    podman_config = json.loads(members["config.dump"][1] or b"")
    spec = json.loads(members["spec.dump"][1] or b"")
    full = f"k8s_{container}_{pod}_default_0c1d2e3f-aaaa-bbbb-cccc-0123456789ab_0"
    spec["annotations"] = {
        **spec.get("annotations", {}),
        "io.kubernetes.container.name": container, "io.kubernetes.pod.name": pod,
        "io.kubernetes.pod.namespace": "default", "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.cri-o.Name": full, "io.kubernetes.cri-o.ImageName":
        podman_config["rootfsImageName"], "io.kubernetes.cri-o.LogPath":
        f"/var/log/pods/default_{pod}/{container}/0.log",
        "io.kubernetes.cri-o.SandboxID": "f" * 64, "io.container.manager": "cri-o",
    }
    spec["mounts"] += mounts
    # CRI-O's containers join their pod's namespaces (pinned by CRI-O) by path.
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] in ("ipc", "uts", "network"):
            ns["path"] = f"/var/run/{ns['type'].replace('network', 'net')}ns/{'e' * 8}-pod"
    crio_config = {
        "id": podman_config["id"], "name": full,
        "rootfsImage": podman_config["rootfsImageName"],
        "rootfsImageRef": podman_config["rootfsImageID"],
        "rootfsImageName": podman_config["rootfsImageName"], "runtime": "runc",
        "createdTime": podman_config["createdTime"], "checkpointedTime": "2026-12-01T12:00:00Z",
        "restoredTime": "0001-01-01T00:00:00Z", "restored": False,
    }
    podman_only = ("network.status", "devshm-checkpoint.tar", "artifacts", "ctr.log")
    out: list[tuple[str, bytes | None]] = [(".", None)]
    for name, (_info, data) in members.items():
        if name.split("/")[0] in podman_only:
            continue
        if name == "config.dump":
            data = json.dumps(crio_config, indent=2).encode()
        elif name == "spec.dump":
            data = json.dumps(spec, indent=2).encode()
        out.append((name, data))
    out.append(("io.kubernetes.cri-o.LogPath", members["ctr.log"][1]))
    out.append(("dump.log", b"(00.000000) Dumping finished successfully\n"))
    with tarfile.open(dest, "w") as tar:
        for name, data in out:
            info = tarfile.TarInfo(name if name == "." else f"./{name}")
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
    return dest


def test_a_crio_checkpoint_is_shown_and_restored_into_podman(
    podman: ctrmig.Migrator, podman_counter: Callable[[], str], podman_client: PodmanClient,
    podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    name = podman_counter()
    archive = crio_archive(podman_export(name, tmp_path / "p.tar", "none"),
                           tmp_path / "checkpoint-counters_default-counter.tar")

    manifest = ctrmig.inspect(archive)
    # What the cross-engine translation needs: the writer, the container's name, its image.
    assert manifest.engine == "cri-o"
    assert (manifest.container.name, manifest.container.image) == ("counter", test_image)
    assert manifest.container.command == COUNTER_CMD
    facts = foreign.facts(manifest)
    assert facts is not None and facts["kubernetes"]["pod"] == "counters"
    assert ctrmig.verify(archive).files == manifest.files
    data = cli_json("inspect", str(archive))
    assert data["engine"] == "cri-o" and data["checksums_from_writer"] is False

    new = unique()  # no --engine: a CRI-O checkpoint goes to podman
    result = CliRunner().invoke(cli, ["restore", str(archive), "--name", new, "--json",
                                      "--url", f"unix://{podman_socket}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["engine"] == "podman"
    try:
        assert_resumed(podman, name, new)
        assert podman_read_file(podman_client, new, "/state.txt") == "written-after-start\n"
    finally:
        podman.remove(new)

    # podman's own import (the route to a podman elsewhere) takes CRI-O's archive too,
    # config.dump rewritten on the way.
    via_import = ctrmig.migrator("podman", url=f"unix://{podman_socket}", direct=False)
    again = unique()
    try:
        assert via_import.restore(archive, name=again) == again
        assert_resumed(podman, name, again)
    finally:
        podman.remove(again)
        via_import.close()


# --- docker ----------------------------------------------------------------------------------

def docker_checkpoint_dir(client: docker.DockerClient, cid: str, parent: Path) -> Path:
    """``docker checkpoint create --checkpoint-dir PARENT CID cp1`` (the container stops),
    through the Engine API; returns PARENT/cp1."""
    resp = client.api.post(client.api._url("/containers/{0}/checkpoints", cid),
                           data=json.dumps({"CheckpointID": "cp1", "Exit": True,
                                            "CheckpointDir": str(parent)}),
                           headers={"Content-Type": "application/json"})
    assert resp.status_code == 201, resp.text
    assert (parent / "cp1" / "inventory.img").is_file()
    return parent / "cp1"


def test_a_docker_checkpoint_directory_is_shown_verified_and_restored_into_a_container(
    dockerd_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    client = docker.DockerClient(base_url=f"unix://{dockerd_socket}", timeout=300)
    m = ctrmig.migrator("docker", base_url=f"unix://{dockerd_socket}")
    name, other = unique(), unique()
    try:
        ctr = client.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
        wait_for(lambda: last_count(m.logs(name)) >= 5, what="docker counter")
        directory = docker_checkpoint_dir(client, ctr.id, tmp_path / "cps")

        manifest = ctrmig.inspect(directory)
        assert manifest.engine == "docker" and manifest.memory_bytes > 0
        assert all(f.startswith("checkpoint/") for f in manifest.files)
        assert ctrmig.verify(directory).files == manifest.files
        data = cli_json("inspect", str(directory))
        assert data["checksums_from_writer"] is False and data["pids"]
        result = CliRunner().invoke(cli, ["verify", str(directory)])
        assert result.exit_code == 0 and foreign.NO_CHECKSUMS in result.output, result.output

        # Nothing to create a container from: refused without a container to start.
        result = CliRunner().invoke(cli, ["restore", str(directory),
                                          "--url", f"unix://{dockerd_socket}"])
        assert result.exit_code == 1 and "--name CONTAINER" in result.output, result.output
        with pytest.raises(ContainerNotFoundError, match="no docker container"):
            m.restore(directory, name=unique())

        stopped_at = last_count(m.logs(name))
        # Into a container created with the same image and command.
        client.containers.create(test_image, COUNTER_CMD, name=other)
        assert m.restore(directory, name=other) == other
        assert_resumed(m, stopped_at, other)
        # Into the stopped container it came from, through the CLI; the directory is
        # read (verified into a private copy), never moved.
        result = CliRunner().invoke(cli, ["restore", str(directory), "--name", name,
                                          "--url", f"unix://{dockerd_socket}"])
        assert result.exit_code == 0, result.output
        assert "no checksums from the writer" in result.output
        assert_resumed(m, stopped_at, name)
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            f.removeprefix("checkpoint/") for f in manifest.files)
    finally:
        for c in (name, other):
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(c).remove(force=True)
        m.close()
        client.close()


# --- into the other engines ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["podman-export", "cri-o"])
@pytest.mark.parametrize("target", [pytest.param("runc", marks=pytest.mark.runc),
                                    pytest.param("docker", marks=pytest.mark.docker)])
def test_podman_export_and_crio_archive_restore_into_another_engine(
    layout: str, target: str, podman: ctrmig.Migrator, podman_counter: Callable[[], str],
    request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    """podman's own export, and the CRI-O archive made of one, restore into runc and
    docker by the cross-engine translation (from spec.dump and the synthesized manifest)."""
    name = podman_counter()
    if layout == "cri-o":
        archive = crio_archive(podman_export(name, tmp_path / "p.tar", "none"),
                               tmp_path / "checkpoint-counters_default-counter.tar")
    else:
        archive = podman_export(name, tmp_path / "p.tar.zst", "zstd")
    stopped_at = last_count(podman.logs(name))
    side: Callable[[str], Side] = request.getfixturevalue("sides")
    dst = side(target)
    new = dst.track(dst.m.restore(archive, name=unique()))
    after = resumed_count(lambda: dst.m.logs(new), f"the {target} counter")
    assert stopped_at < after <= stopped_at + 5, (stopped_at, after)
    wait_for(lambda: last_count(dst.m.logs(new)) > after, what="counting on")
    assert dst.read(new, "/state.txt") == "written-after-start\n"  # the rootfs diff


@pytest.mark.runc
def test_a_crio_container_with_kubelet_mounts_is_refused_before_runc(
    podman_counter: Callable[[], str], runc_state: RuncMigrator, tmp_path: Path,
) -> None:
    token: dict[str, object] = {
        "destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
        "source": "/var/lib/kubelet/pods/0c1d/volumes/kubernetes.io~projected/kube-api",
        "options": ["rbind", "ro"]}
    archive = crio_archive(podman_export(podman_counter(), tmp_path / "p.tar", "none"),
                           tmp_path / "crio.tar", mounts=(token,))
    with pytest.raises(UntranslatableError, match=re.escape(
            "mounts only its kubelet provides: /var/run/secrets/kubernetes.io/serviceaccount")
    ) as refused:
        runc_state.restore(archive, name=unique(), allow_privileged=True)
    assert refused.value.hint is not None and "CRI-O" in refused.value.hint
    assert runc_state.list() == [] and runc_state.runc.containers() == []
