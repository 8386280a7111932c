"""The runc engine against real runc, CRIU, skopeo and umoci."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

import ctrmig
from ctrmig.archive import ArchiveWriter, extracted
from ctrmig.archive.layers import apply_rootfs_diff
from ctrmig.engines.runc import RuncMigrator
from ctrmig.errors import (
    CheckpointError,
    CommandError,
    ContainerNotFoundError,
    ImageNotFoundError,
    NameInUseError,
    OptionError,
    RestoreError,
    UnsafeArchiveError,
)
from ctrmig.host import mounts, proc
from tests.conftest import (
    COUNTER_CMD,
    cleanup_runc_state,
    first_count,
    last_count,
    processes_naming,
    unique,
    wait_for,
)


def _counting(m: RuncMigrator, name: str, above: int = 0) -> int:
    wait_for(lambda: last_count(m.logs(name)) > above + 5, timeout=30,
             what=f"{name} counting past {above + 5}")
    return last_count(m.logs(name))


def _state_file(m: RuncMigrator, name: str) -> str:
    """/state.txt as the container sees it: through runc exec."""
    res = proc.run(m.runc.argv("exec", name, "/bin/cat", "/state.txt"), timeout=60)
    return res.stdout.decode()


def test_checkpoint_remove_restore_continues_with_lazy_pages(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The round trip with its runc details, restored with lazy pages (the plain round
    trip is the contract suite's)."""
    m = runc_state
    name = unique("ctrmig-runc")
    assert m.run(test_image, name=name, command=COUNTER_CMD) == name
    _counting(m, name)
    assert _state_file(m, name) == "written-after-start\n"
    assert [(c.name, c.state) for c in m.list()] == [(name, "running")]

    archive = m.checkpoint(name, tmp_path / "counter.ckpt.tar")
    before = last_count(m.logs(name))
    time.sleep(0.5)
    assert last_count(m.logs(name)) == before, "still counting after checkpoint"
    assert [(c.name, c.state) for c in m.list()] == [(name, "checkpointed")]
    with pytest.raises(CheckpointError, match="checkpointed, not running"):
        m.checkpoint(name, tmp_path / "again.tar")

    manifest = ctrmig.verify(archive.path)  # type: ignore[arg-type]
    assert manifest.engine == "runc"
    assert manifest.container.name == name
    assert manifest.container.image == test_image
    assert manifest.container.image_id.startswith("sha256:")
    for member in ("checkpoint/descriptors.json", "checkpoint/inventory.img", "spec.dump",
                   "config.dump", "rootfs-diff.tar"):
        assert member in manifest.files
    assert manifest.memory_bytes > 0
    with extracted(tmp_path / "counter.ckpt.tar", workdir=tmp_path) as (root, _), \
            tarfile.open(root / "rootfs-diff.tar") as diff:
        assert "state.txt" in diff.getnames()

    m.remove(name)
    assert not m.exists(name)
    assert not (m.bundles_dir / name).exists()
    assert m.list() == []

    started = time.monotonic()
    # the lazy-pages daemon lives in ctrmig.direct.lazy (the direct route shares it)
    with caplog.at_level(logging.DEBUG, logger="ctrmig.direct.lazy"):
        restored = m.restore(archive.path, lazy_pages=True)  # type: ignore[arg-type]
    took = time.monotonic() - started
    # With lazy pages, runc restored without the pages and criu lazy-pages served them.
    assert any("criu lazy-pages" in r.getMessage() for r in caplog.records)
    assert restored == name
    after = _counting(m, restored, above=before)
    log = m.logs(restored)
    assert before < first_count(log) <= before + 3, log[:200]
    assert after > before
    assert _state_file(m, restored) == "written-after-start\n"
    assert [(c.name, c.state) for c in m.list()] == [(name, "running")]
    print(f"lazy pages: checkpoint {archive.size} bytes, restore {took:.2f} s, "
          f"count {before} -> {first_count(log)}")


def test_deleted_files_stay_deleted(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path
) -> None:
    m = runc_state
    cmd = ["/bin/sh", "-c", "rm /etc/group; mkdir -p /data/sub; echo kept > /data/sub/f; "
           "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.1; done"]
    name = m.run(test_image, command=cmd)
    _counting(m, name)
    archive = m.checkpoint(name, tmp_path / "d.tar")
    assert "/etc/group" in archive.manifest.extra["rootfs_deleted_paths"]
    m.remove(name)
    restored = m.restore(archive.path)  # type: ignore[arg-type]
    rootfs = m.bundles_dir / restored / "rootfs"
    assert not (rootfs / "etc/group").exists()
    assert (rootfs / "etc/passwd").exists()
    assert (rootfs / "data/sub/f").read_text() == "kept\n"


def test_image_from_oci_layout_missing_on_restore(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path
) -> None:
    m = runc_state
    layout = tmp_path / "layout"
    proc.run(["skopeo", "copy", "--quiet", f"containers-storage:{test_image}",
              f"oci:{layout}:v1"], timeout=300)
    ref = f"oci:{layout}:v1"
    name = m.run(ref, command=COUNTER_CMD)
    _counting(m, name)
    archive = m.checkpoint(name, tmp_path / "o.tar")
    m.remove(name)
    shutil.rmtree(layout)
    # another host: an empty image cache, and the layout is gone
    other = RuncMigrator(state_dir=tmp_path / "other", workdir=tmp_path)
    try:
        with pytest.raises(ImageNotFoundError) as err:
            other.restore(archive.path)  # type: ignore[arg-type]
        assert ref in str(err.value)
        assert other.list() == []
        assert not any((tmp_path / "other" / "bundles").iterdir())
    finally:
        assert not cleanup_runc_state(other)


def test_errors_user_sees(runc_state: RuncMigrator, test_image: str, tmp_path: Path) -> None:
    m = runc_state
    with pytest.raises(ImageNotFoundError) as err:
        m.run("localhost/ctrmig-no-such-image:latest", command=["/bin/true"])
    assert "localhost/ctrmig-no-such-image:latest" in str(err.value)
    assert err.value.stderr
    assert m.list() == []

    name = m.run(test_image, command=COUNTER_CMD)
    with pytest.raises(NameInUseError) as err2:
        m.run(test_image, name=name, command=COUNTER_CMD)
    assert name in str(err2.value)
    assert [c.name for c in m.list()] == [name]

    with pytest.raises(ContainerNotFoundError):
        m.checkpoint("ctrmig-no-such-container", tmp_path / "x.tar")
    with pytest.raises(OptionError, match="print_stats"):
        m.checkpoint(name, tmp_path / "x.tar", print_stats=True)
    assert not (tmp_path / "x.tar").exists()
    with pytest.raises(ContainerNotFoundError):
        m.logs("ctrmig-no-such-container")


# skopeo 1.18's words for a missing image (1.9 adds ": identifier is not an image").
SKOPEO_1_18 = r"""#!/bin/sh
echo "level=fatal msg=\"Error parsing image name $4: does not resolve to an image ID\"" >&2
exit 1
"""


def test_missing_image_is_decided_by_its_store(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not by skopeo's English: podman's storage says whether the image is there."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "skopeo").write_text(SKOPEO_1_18)
    (shims / "skopeo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    with pytest.raises(ImageNotFoundError) as err:
        runc_state.run("localhost/ctrmig-no-such-image:latest", command=["/bin/true"])
    assert "localhost/ctrmig-no-such-image:latest" in str(err.value)
    assert "does not resolve to an image ID" in (err.value.stderr or "")
    assert err.value.hint
    # The image is there and skopeo still fails: that is no missing image.
    with pytest.raises(CommandError) as err2:
        runc_state.run(test_image, command=["/bin/true"])
    assert not isinstance(err2.value, ImageNotFoundError)
    assert runc_state.list() == []


def test_docker_daemon_images_are_asked_of_the_daemon(
    runc_state: RuncMigrator, dockerd_socket: Path, test_image: str, tmp_path: Path
) -> None:
    """The daemon at docker_url says whether an image is missing, and skopeo reads it."""
    m = RuncMigrator(state_dir=runc_state.state_dir, workdir=tmp_path,
                     docker_url=f"unix://{dockerd_socket}")
    with pytest.raises(ImageNotFoundError) as err:
        m.run("docker-daemon:localhost/ctrmig-no-such-image:latest", command=["/bin/true"])
    assert err.value.stderr
    name = m.run(f"docker-daemon:{test_image}", command=COUNTER_CMD)
    _counting(m, name)
    assert [(c.name, c.image) for c in m.list()] == [(name, f"docker-daemon:{test_image}")]


def test_rootfs_diff_cannot_escape(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (rootfs / "link").symlink_to(outside)
    (outside / "victim").write_text("x")
    for name in ("../evil", "link/evil", "link/.wh.victim", "../.wh.outside"):
        diff = tmp_path / "diff.tar"
        with tarfile.open(diff, "w") as tar:
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
        with pytest.raises(UnsafeArchiveError):
            apply_rootfs_diff(diff, rootfs)
    diff = tmp_path / "diff.tar"
    with tarfile.open(diff, "w") as tar:
        info = tarfile.TarInfo("dev-sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="device"):
        apply_rootfs_diff(diff, rootfs)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert not (tmp_path / "evil").exists()
    assert not (rootfs / "dev-sda").exists()


def test_failed_restore_leaves_nothing(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path
) -> None:
    m = runc_state
    name = m.run(test_image, command=COUNTER_CMD)
    _counting(m, name)
    good = m.checkpoint(name, tmp_path / "good.tar", leave_running=True)
    # A well-formed archive (checksums match) whose CRIU images are broken.
    bad = tmp_path / "bad.tar"
    with extracted(good.path, workdir=tmp_path) as (root, manifest), bad.open("wb") as out:  # type: ignore[arg-type]
        (root / "checkpoint" / "pstree.img").write_bytes(b"\0" * 64)
        writer = ArchiveWriter(out, "none")
        writer.add_tree(root / "checkpoint", "checkpoint")
        for member in ("spec.dump", "config.dump", "rootfs-diff.tar"):
            writer.add_file(member, root / member)
        writer.finish(manifest)
    with pytest.raises(RestoreError) as err:
        m.restore(bad, name="ctrmig-broken")
    assert "ctrmig-broken" in str(err.value)
    assert "pstree.img" in str(err.value)  # CRIU's own words, not just "criu failed"
    assert err.value.stderr and "restore.log" in err.value.stderr
    kept = Path(err.value.hint.rsplit(" ", 1)[-1])  # type: ignore[union-attr]
    assert (kept / "restore.log").is_file()
    assert not m.exists("ctrmig-broken")
    assert not (m.bundles_dir / "ctrmig-broken").exists()
    assert not mounts.mounts_under(m.bundles_dir / "ctrmig-broken")
    assert not processes_naming(str(m.logs_dir / "ctrmig-broken.log"))
    assert [(c.name, c.state) for c in m.list()] == [(name, "running")]


def test_established_tcp_needs_the_option(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path
) -> None:
    """A container CRIU refuses to dump stays running, and the error quotes CRIU.

    On kernels >= 6.16 CRIU 4.1.1 cannot dump any TCP socket (getsockopt SO_PASSCRED is
    refused for AF_INET: checkpoint-restore/criu#2718, fixed after 4.1.1), so there the
    dump fails even with tcp_established; the test says so instead of passing silently.
    """
    m = runc_state
    # Both ends of an idle TCP connection inside the container, then the counter.
    cmd = ["/bin/sh", "-c", "sleep 100000 | nc -l -p 7000 > /dev/null & sleep 0.3; "
           "sleep 100000 | nc 127.0.0.1 7000 > /dev/null & sleep 0.3; "
           "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.1; done"]
    name = m.run(test_image, command=cmd)
    before = _counting(m, name)
    with pytest.raises(CheckpointError) as err:
        m.checkpoint(name, tmp_path / "tcp.tar")
    message = str(err.value)
    assert "tcp-established" in message or "Can't get 1:16 opt" in message, message
    assert "the container is running" in message
    assert not (tmp_path / "tcp.tar").exists()
    before = _counting(m, name, above=before)  # untouched: still counting

    try:
        archive = m.checkpoint(name, tmp_path / "tcp.tar", tcp_established=True)
    except CheckpointError as e:
        if "Can't get 1:16 opt" in str(e):
            assert _counting(m, name, above=before) > before
            pytest.xfail("CRIU 4.1.1 cannot dump TCP sockets on kernel >= 6.16 (criu#2718)")
        raise
    at_dump = last_count(m.logs(name))
    m.remove(name)
    restored = m.restore(archive.path, tcp_established=True)  # type: ignore[arg-type]
    assert _counting(m, restored, above=at_dump) > at_dump
    assert first_count(m.logs(restored)) > before


def test_run_maps_image_config_and_env(runc_state: RuncMigrator, test_image: str) -> None:
    m = runc_state
    name = m.run(test_image, env={"GREETING": "hello from env"},
                 command=["/bin/sh", "-c", 'echo "$GREETING in $(pwd) as $(id -u)"; '
                          "echo $PATH; hostname; exec sleep 100000"])
    wait_for(lambda: len(m.logs(name).splitlines()) >= 3,
             what="the container's greeting")
    lines = m.logs(name).splitlines()
    assert lines[0] == "hello from env in / as 0"
    assert "/bin" in lines[1].split(":")
    assert lines[2] == name  # each container gets its own UTS namespace and hostname
    assert [(c.name, c.image, c.state) for c in m.list()] == [(name, test_image, "running")]


def test_hostile_rootfs_diff_refused(
    runc_state: RuncMigrator, test_image: str, tmp_path: Path
) -> None:
    """An archive whose rootfs-diff.tar reaches outside the rootfs restores nothing."""
    m = runc_state
    name = m.run(test_image, command=COUNTER_CMD)
    _counting(m, name)
    good = m.checkpoint(name, tmp_path / "good.tar", leave_running=True)
    evil = tmp_path / "evil-diff.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../../../../../tmp/ctrmig-escaped")
        data = b"escaped\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    bad = tmp_path / "bad.tar"
    with extracted(good.path, workdir=tmp_path) as (root, manifest), bad.open("wb") as out:  # type: ignore[arg-type]
        writer = ArchiveWriter(out, "none")
        writer.add_tree(root / "checkpoint", "checkpoint")
        for member in ("spec.dump", "config.dump"):
            writer.add_file(member, root / member)
        writer.add_file("rootfs-diff.tar", evil)
        writer.finish(manifest)
    with pytest.raises(UnsafeArchiveError):
        m.restore(bad, name="ctrmig-evil")
    assert not Path("/tmp/ctrmig-escaped").exists()
    assert not m.exists("ctrmig-evil")
    assert not mounts.mounts_under(m.bundles_dir / "ctrmig-evil")
    assert [c.name for c in m.list()] == [name]
