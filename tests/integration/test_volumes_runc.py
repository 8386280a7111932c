"""Volumes and bind mounts of runc containers on the real stack (#17), and podman's volume
layout, which runc archives share.

Every test checks the volumes' bytes: what the container wrote, what the test seeded, and
the counter log the container appends to its volume (consecutive numbers prove the memory
image and the volume content were captured at the same moment).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from podman import PodmanClient

import ctrmig
from ctrmig import cli
from ctrmig.archive import extracted
from ctrmig.engines.runc import RuncMigrator
from ctrmig.errors import (
    CheckpointError,
    OptionError,
    PrivilegeError,
    RestoreError,
    VolumeConflictError,
)
from ctrmig.host import proc
from tests.conftest import (
    cleanup_runc_state,
    last_count,
    need,
    podman_read_file,
    unique,
    wait_for,
)
from tests.hosts import TwoHosts

CTRMIG = str(Path(sys.executable).with_name("ctrmig"))

# Copies the bind-mounted blob into the volume, then counts, in memory and in the volume.
VOLUME_CMD = [
    "/bin/sh", "-c",
    "trap 'exit 0' TERM; cp /hb/blob /data/copy 2>/dev/null; i=0; "
    "while true; do i=$((i+1)); echo count=$i; echo $i >> /data/log; sleep 0.1; done",
]


@pytest.fixture
def other_host(tmp_path: Path) -> Iterator[RuncMigrator]:
    """A second runc state dir: another host as far as volumes and bundles go."""
    m = RuncMigrator(state_dir=tmp_path / "other-state", workdir=tmp_path)
    yield m
    assert not cleanup_runc_state(m)


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory to bind-mount, holding 200 KiB of random bytes."""
    d = tmp_path / "host-data"
    d.mkdir()
    (d / "blob").write_bytes(os.urandom(200 << 10))
    return d


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every symlink's target below ``root``, by relative path."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                found[rel] = f"-> {os.readlink(p)}"
            elif p.is_file():
                found[rel] = p.read_bytes()
            else:
                found[rel] = "dir"
    return found


def counted(log: bytes) -> list[int]:
    return [int(line) for line in log.split()]


def consecutive(numbers: list[int]) -> bool:
    return bool(numbers) and numbers == list(range(1, len(numbers) + 1))


def counting(m: RuncMigrator, name: str, above: int = 0) -> int:
    wait_for(lambda: last_count(m.logs(name)) > above + 5, timeout=30, what=f"{name} counting")
    return last_count(m.logs(name))


def test_named_volume_travels_and_bind_mount_is_required(
    runc_state: RuncMigrator, other_host: RuncMigrator, test_image: str, host_dir: Path,
    tmp_path: Path,
) -> None:
    m = runc_state
    name = m.run(test_image, command=VOLUME_CMD,
                 volumes=["data:/data", f"{host_dir}:/hb:ro"])
    data = m.volumes.data("data")
    assert oct(data.parent.stat().st_mode & 0o777) == "0o700"
    (data / "sub").mkdir()
    seed = os.urandom(70_001)
    (data / "sub" / "seed.bin").write_bytes(seed)
    (data / "sub" / "link").symlink_to("seed.bin")
    counting(m, name)
    assert (data / "copy").read_bytes() == (host_dir / "blob").read_bytes()

    archive = m.checkpoint(name, tmp_path / "v.tar")
    at_checkpoint = tree(data)  # the container is stopped: nothing writes any more
    assert consecutive(counted(data.joinpath("log").read_bytes()))
    files = archive.manifest.files
    assert "volumes/data.tar" in files
    assert [f for f in files if f.startswith("volumes/")] == ["volumes/data.tar"]
    blob_size = (host_dir / "blob").stat().st_size
    assert archive.manifest.extra["volumes"] == [
        {"name": "data", "destination": "/data", "kind": "volume", "source": str(data),
         "bytes": sum(len(v) for v in at_checkpoint.values() if isinstance(v, bytes)),
         "carried": True, "readonly": False},
        {"name": None, "destination": "/hb", "kind": "bind", "source": str(host_dir),
         "bytes": None, "carried": False, "readonly": True},
    ]
    # The bind mount's content is not carried (only the container's copy, in its volume).
    assert {f for f in files if not f.startswith("checkpoint/")} == {
        "config.dump", "spec.dump", "rootfs-diff.tar", "stats-dump", "volumes/data.tar"}
    assert files["volumes/data.tar"].size < blob_size + len(seed) + 20_000
    with extracted(tmp_path / "v.tar", workdir=tmp_path) as (root, _), \
            tarfile.open(root / "volumes" / "data.tar") as inner:
        names = inner.getnames()
    assert names[0] == "." and "./sub/seed.bin" in names and "./copy" in names

    res = CliRunner().invoke(cli.cli, ["inspect", str(archive.path)])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "data (named, /data, " in flat and " inside)" in flat
    assert f"{host_dir} (bind, /hb, content not inside)" in flat
    assert f"host path {host_dir} at /hb" in flat  # what restore refuses unflagged

    # On another host: a host bind mount is a host mount request...
    target = other_host
    with pytest.raises(PrivilegeError, match=f"host path {host_dir} at /hb"):
        target.restore(archive.path)  # type: ignore[arg-type]
    # ... and its source must be there: refused, naming it, before anything is made.
    moved = host_dir.rename(tmp_path / "elsewhere")
    with pytest.raises(RestoreError, match=f"missing on this host: {host_dir} \\(for /hb\\)"):
        target.restore(archive.path, allow_privileged=True)  # type: ignore[arg-type]
    assert target.list() == [] and not target.volumes.exists("data")
    assert not list(target.volumes.root.iterdir())
    moved.rename(host_dir)

    restored = target.restore(archive.path, allow_privileged=True)  # type: ignore[arg-type]
    assert restored == name
    before = counted(at_checkpoint["log"])  # type: ignore[arg-type]
    counting(target, name, above=before[-1])
    arrived = tree(target.volumes.data("data"))
    log = counted(arrived.pop("log"))  # type: ignore[arg-type]
    assert arrived == {k: v for k, v in at_checkpoint.items() if k != "log"}  # byte for byte
    assert log[:len(before)] == before and consecutive(log)  # went on from where it stopped


def test_restore_reuses_same_content_and_refuses_other_content(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path,
) -> None:
    m = runc_state
    name = m.run(test_image, command=VOLUME_CMD, volumes=["data:/data"])
    counting(m, name)
    archive = m.checkpoint(name, tmp_path / "v.tar").path
    data = m.volumes.data("data")
    at_checkpoint = tree(data)
    m.remove(name)
    assert tree(data) == at_checkpoint  # a named volume outlives its container

    # The volume holds what the archive carries: it is simply used again.
    m.restore(archive)  # type: ignore[arg-type]
    stopped = counted(at_checkpoint["log"])[-1]  # type: ignore[arg-type]
    counting(m, name, above=stopped)
    m.remove(name)
    assert consecutive(counted(data.joinpath("log").read_bytes()))

    # Now it holds other content: refused, named, and nothing started or changed.
    changed = tree(data)
    with pytest.raises(VolumeConflictError, match=re.escape("volume(s) data exist here with "
                                                          "other content")) as caught:
        m.restore(archive)  # type: ignore[arg-type]
    assert "--replace-volumes" in str(caught.value.hint)
    assert m.list() == [] and tree(data) == changed
    # Told to leave volume content alone, the restore uses the volume as it is.
    m.restore(archive, ignore_volumes=True)  # type: ignore[arg-type]
    counting(m, name, above=stopped)
    m.remove(name)
    assert data.joinpath("log").read_bytes().startswith(changed["log"])  # type: ignore[arg-type]

    # Replaced, it holds the archive's content again: had the later numbers stayed, the
    # restored counter would write them a second time.
    m.restore(archive, replace_volumes=True)  # type: ignore[arg-type]
    counting(m, name, above=stopped)
    assert consecutive(counted(data.joinpath("log").read_bytes()))
    assert not [p for p in m.volumes.root.iterdir() if p.name.startswith(".")]


def test_shared_volume_is_refused_unless_ignored(
    runc_state: RuncMigrator, other_host: RuncMigrator, test_image: str, tmp_path: Path,
) -> None:
    m = runc_state
    cmd = ["/bin/sh", "-c", "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); "
           "echo count=$i; echo $i > /s/$HOSTNAME; sleep 0.1; done"]
    a = m.run(test_image, name=unique("a"), command=cmd, volumes=["shared:/s"])
    b = m.run(test_image, name=unique("b"), command=cmd, volumes=["shared:/s"])
    counting(m, a)
    counting(m, b)
    with pytest.raises(CheckpointError, match=f"shared .also mounted by {b}.") as caught:
        m.checkpoint(a, tmp_path / "a.tar")
    assert "--ignore-volumes" in str(caught.value.hint)
    assert {c.name: c.state for c in m.list()} == {a: "running", b: "running"}

    archive = m.checkpoint(a, tmp_path / "a.tar", ignore_volumes=True)
    assert not [f for f in archive.manifest.files if f.startswith("volumes/")]
    assert archive.manifest.extra["volumes"] == [
        {"name": "shared", "destination": "/s", "kind": "volume",
         "source": str(m.volumes.data("shared")), "bytes": None, "carried": False,
         "readonly": False}]
    # Without the content, another host gets an empty volume (no privileges asked).
    restored = other_host.restore(archive.path)  # type: ignore[arg-type]
    counting(other_host, restored, above=last_count(m.logs(a)))
    assert [p.name for p in other_host.volumes.data("shared").iterdir()] == [a]


def test_left_running_volume_matches_the_memory_image(
    runc_state: RuncMigrator, other_host: RuncMigrator, test_image: str, tmp_path: Path,
) -> None:
    """Left running, the container is paused until its volume is packed: the volume the
    archive carries ends where the dumped counter stood, so the restored copy goes on
    without a gap or a number written twice."""
    m = runc_state
    fast = [VOLUME_CMD[0], VOLUME_CMD[1], VOLUME_CMD[2].replace("sleep 0.1", "sleep 0.002")]
    name = m.run(test_image, command=fast, volumes=["data:/data"])
    counting(m, name)
    archive = m.checkpoint(name, tmp_path / "v.tar", leave_running=True)
    assert m.list()[0].state == "running"
    counting(m, name, above=last_count(m.logs(name)))  # the original goes on

    restored = other_host.restore(archive.path)  # type: ignore[arg-type]
    counting(other_host, restored)
    log = counted(other_host.volumes.data("data").joinpath("log").read_bytes())
    assert consecutive(log), log


@pytest.fixture
def two_hosts(session_dir: Path) -> Iterator[TwoHosts]:
    need("ip")
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        yield hosts


def test_migrate_over_ssh_carries_the_volume_and_needs_the_bind_source(
    two_hosts: TwoHosts, test_image: str, host_dir: Path, tmp_path: Path,
) -> None:
    """ctrmig on host B restores the volume's bytes; where B lacks the bind mount's
    source (hidden by a tmpfs in its private mount namespace) the migration is refused,
    naming the path, and the source runs on."""
    for tool in ("runc", "criu", "skopeo", "umoci", "sshd", "unshare"):
        need(tool)
    a, b = two_hosts.a, two_hosts.b
    ssh_options = b.start_sshd(port=2222)
    src = RuncMigrator(state_dir=a.root / "runc")
    dst = RuncMigrator(state_dir=b.root / "runc")
    name = src.run(test_image, name=unique(), command=VOLUME_CMD,
                   volumes=["data:/data", f"{host_dir}:/hb:ro"])
    remote = f"env CTRMIG_RUNC_STATE_DIR={dst.state_dir} {CTRMIG}"
    env = {"CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
           "CTRMIG_JOURNAL_DIR": str(tmp_path / "journal"),
           "CTRMIG_SSH_OPTIONS": " ".join(ssh_options)}
    migrate = [CTRMIG, "migrate", name, "--from", "runc", "--to",
               f"runc+ssh://root@{b.address}:2222", "--allow-privileged", "--json"]
    try:
        counting(src, name)
        hidden = (f"unshare -m sh -c 'mount -t tmpfs none {host_dir.parent} && "
                  f"exec \"$@\"' sh {remote}")
        res = a.run(migrate, env=env | {"CTRMIG_REMOTE_COMMAND": hidden})
        assert res.returncode == 1
        # Refused by the preflight on B, before anything was frozen, naming the path.
        err = res.stderr.decode()
        assert "before anything was frozen" in err and f"{host_dir} (at /hb)" in err, err
        assert dst.list() == [] and not dst.volumes.exists("data")
        assert [(c.name, c.state) for c in src.list()] == [(name, "running")]
        counting(src, name, above=last_count(src.logs(name)))  # resumed

        res = a.run(migrate, env=env | {"CTRMIG_REMOTE_COMMAND": remote})
        assert res.returncode == 0, res.stderr.decode()
        assert json.loads(res.stdout)["target_name"] == name
        left = tree(src.volumes.data("data"))  # the volume stays on A, as it was
        counting(dst, name, above=counted(left["log"])[-1])  # type: ignore[arg-type]
        arrived = tree(dst.volumes.data("data"))
        assert {k: v for k, v in arrived.items() if k != "log"} == \
            {k: v for k, v in left.items() if k != "log"}
        log = counted(arrived["log"])  # type: ignore[arg-type]
        assert log[:len(counted(left["log"]))] == counted(left["log"])  # type: ignore[arg-type]
        assert consecutive(log)
    finally:
        for m in (src, dst):
            for c in m.list():
                m.remove(c.name)


def test_cli_run_with_volumes(runc_state: RuncMigrator, test_image: str, host_dir: Path
                              ) -> None:
    env = {"CTRMIG_RUNC_STATE_DIR": str(runc_state.state_dir), "CTRMIG_ENGINE": ""}
    runner = CliRunner()
    name = unique("cli-vol")
    res = runner.invoke(cli.cli, ["run", "-n", name, "-v", "data:/data", "-v",
                                  f"{host_dir}:/hb:ro", test_image, *VOLUME_CMD], env=env)
    assert res.exit_code == 0, res.output
    assert f"started runc container {name}" in res.output
    m = runc_state
    counting(m, name)
    assert m.volumes.data("data").joinpath("copy").read_bytes() == \
        host_dir.joinpath("blob").read_bytes()
    done = proc.run(m.runc.argv("exec", name, "/bin/sh", "-c", "echo x > /hb/new"),
                    timeout=60, check=False)
    assert done.returncode != 0 and not (host_dir / "new").exists()  # mounted read-only
    res = runner.invoke(cli.cli, ["run", "-v", "/no/such/dir:/x", test_image], env=env)
    assert res.exit_code == 1
    assert "bind mount source(s) missing on this host: /no/such/dir (for /x)" in res.output
    res = runner.invoke(cli.cli, ["run", "-v", "data", test_image], env=env)
    assert res.exit_code == 1 and "SOURCE:DESTINATION" in res.output
    assert [c.name for c in m.list()] == [name]


def test_run_refuses_bad_volume_specs(runc_state: RuncMigrator, test_image: str) -> None:
    for spec, text in (("data:relative", "plain absolute path"), ("../x:/x", "volume name"),
                       ("a:/x:rw,ro", "options"), ("a:/x:z", "options")):
        with pytest.raises(OptionError, match=text):
            runc_state.run(test_image, volumes=[spec])
    with pytest.raises(OptionError, match="two volumes at one destination"):
        runc_state.run(test_image, volumes=["a:/x", "b:/x"])
    assert runc_state.list() == [] and not list(runc_state.volumes.root.iterdir())


def test_podman_volume_layout_is_the_one_runc_writes(
    podman_socket: Path, test_image: str, tmp_path: Path,
) -> None:
    """podman, unchanged: its archive carries the named volume as volumes/NAME.tar with
    ./ entries (what runc archives hold), and the restored container sees its bytes."""
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    vol, name = unique("ctrmig-vol"), unique("ctrmig-podvol")
    payload = os.urandom(30_000).hex()
    try:
        client.volumes.create(vol)
        client.containers.run(
            test_image, ["/bin/sh", "-c", f"trap 'exit 0' TERM; echo {payload} > /v/p; "
                         "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.1; done"],
            name=name, detach=True, volumes={vol: {"bind": "/v", "mode": "rw"}})
        m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
        wait_for(lambda: last_count(m.logs(name)) > 3, what="podman counting")
        archive = m.checkpoint(name, tmp_path / "p.tar")
        assert f"volumes/{vol}.tar" in archive.manifest.files
        with extracted(tmp_path / "p.tar", workdir=tmp_path) as (root, _), \
                tarfile.open(root / "volumes" / f"{vol}.tar") as inner:
            assert inner.getnames()[0] == "." and "./p" in inner.getnames()
            member = inner.extractfile("./p")
            assert member is not None and member.read() == f"{payload}\n".encode()
        m.remove(name)
        # podman itself refuses a volume that exists (whatever its content): ctrmig says
        # so first, naming it, and podman is not asked (no container is made).
        with pytest.raises(VolumeConflictError, match=f"volume.s. {vol} exist") as refused:
            m.restore(tmp_path / "p.tar")
        assert f"podman volume rm {vol}" in str(refused.value.hint)
        assert not m.exists(name)
        # --ignore-volumes: the container gets the volume as it is here.
        client.containers.run(test_image, ["/bin/sh", "-c", "echo kept > /v/p"],
                              volumes={vol: {"bind": "/v", "mode": "rw"}}, remove=True)
        kept = m.restore(tmp_path / "p.tar", name=f"{name}-kept", ignore_volumes=True)
        assert podman_read_file(client, kept, "/v/p") == "kept\n"
        m.remove(kept)
        client.volumes.remove(vol)  # gone: podman recreates it from the archive
        restored = m.restore(tmp_path / "p.tar")
        assert podman_read_file(client, restored, "/v/p") == f"{payload}\n"
        m.close()
    finally:
        for c in client.containers.list(all=True):
            if c.name == name:
                c.remove(force=True)
        if client.volumes.exists(vol):
            client.volumes.remove(vol, force=True)
        client.close()  # type: ignore[no-untyped-call]
