"""docker volumes in the archive: packing, the content digest and mounted() (pure logic;
the real round trips are in tests/integration/test_volumes_docker.py)."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from ctrmig.archive.privileges import PrivilegeRequest, volume_requests
from ctrmig.engines.docker import volumes
from ctrmig.errors import CheckpointError


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "blob").write_bytes(bytes(range(256)) * 512)
    (root / "v").write_text("hello\n")
    os.chmod(root / "v", 0o640)
    os.chown(root / "v", 1234, 4321)
    os.link(root / "v", root / "sub" / "same")
    (root / "link").symlink_to("v")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))  # left out: a socket means nothing copied
    return root


def test_pack_extract_and_digest_agree(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    out = tmp_path / "v.tar"
    with out.open("wb") as f:
        size, entries, digest = volumes.pack_dir(src, f, "v")
    # root, sub, blob, v, same (a hard link: its bytes once), link, fifo
    assert size == 256 * 512 + 6 and entries == 7
    assert volumes.digest_dir(src, "v") == digest
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == "." and "./sub/blob" in names and "./sock" not in names

    dest = tmp_path / "dest"
    dest.mkdir()
    volumes.extract(out, dest, "v")
    assert volumes.digest_dir(dest, "v") == digest
    assert (dest / "sub" / "blob").read_bytes() == (src / "sub" / "blob").read_bytes()
    assert (dest / "v").stat().st_uid == 1234 and os.readlink(dest / "link") == "v"
    (dest / "v").write_text("other\n")
    assert volumes.digest_dir(dest, "v") != digest, "other data, other digest"


def test_archive_api_tar_gives_the_same_digest(tmp_path: Path) -> None:
    """GET /archive names members after the mount point ("data/..."): re-rooted at "./"."""
    src = _tree(tmp_path / "data")
    (src / "sock").unlink()
    api_tar = io.BytesIO()
    with tarfile.open(fileobj=api_tar, mode="w") as tar:
        tar.add(src, arcname="data")
    api_tar.seek(0)
    out = io.BytesIO()
    with tarfile.open(fileobj=api_tar, mode="r|") as stream:
        _, _, digest = volumes.pack_tar(stream, out, "data")
    assert digest == volumes.digest_dir(src, "data")
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        assert tar.getnames()[:2] == [".", "./fifo"]


def test_a_device_node_in_a_volume_is_refused_at_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))
    with pytest.raises(CheckpointError, match="device node"):
        volumes.pack_dir(root, io.BytesIO(), "vol")


def test_mounted_tells_named_from_anonymous() -> None:
    data = {
        "HostConfig": {"Binds": ["data:/data:rw", "/srv:/srv"],
                       "Mounts": [{"Type": "volume", "Source": "other", "Target": "/o"}]},
        "Mounts": [
            {"Type": "volume", "Name": "data", "Destination": "/data", "RW": True},
            {"Type": "volume", "Name": "other", "Destination": "/o", "RW": False},
            {"Type": "volume", "Name": "f" * 64, "Destination": "/anon", "RW": True},
            {"Type": "bind", "Source": "/srv", "Destination": "/srv"},
        ],
    }
    got = [(v.name, v.destination, v.anonymous, v.rw) for v in volumes.mounted(data)]
    assert got == [("data", "/data", False, True), ("other", "/o", False, False),
                   ("f" * 64, "/anon", True, True)]


def test_volume_records_round_trip() -> None:
    v = volumes.Volume(name="data", destination="/data", member="volumes/data.tar", size=3,
                       entries=2, digest="sha256:ab", options={"type": "tmpfs"})
    assert volumes.Volume.from_dict(v.to_dict()) == v
    plain = volumes.Volume(name="x", destination="/x")
    anonymous = volumes.Volume(name="y", destination="/y", anonymous=True, driver="plugin")
    assert volume_requests([v.to_dict(), plain.to_dict(), anonymous.to_dict()]) == [
        PrivilegeRequest("volume", "data (local driver, options type)")]
