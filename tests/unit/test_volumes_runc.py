"""The runc engine's volume logic without runc: ``-v`` parsing, the records an archive
brings (hostile ones included), the privilege gate's reading of them, safe extraction,
and the restore's reuse/refuse/replace/undo decisions on a real filesystem."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, atomic_output
from ctrmig.archive.layers import apply_rootfs_diff, extract_volume, write_volume
from ctrmig.archive.privileges import PrivilegeRequest, archive_privileges, runc_requests
from ctrmig.engines.runc.volumes import (
    Mount,
    Prepared,
    Volumes,
    from_records,
    parse,
    parse_all,
    same_tree,
    spec_mounts,
)
from ctrmig.errors import OptionError, RestoreError, UnsafeArchiveError, VolumeConflictError


def test_parse_as_podman_and_docker_users_write_it() -> None:
    assert parse("data:/data") == Mount("volume", "/data", name="data")
    assert parse("data:/data:ro") == Mount("volume", "/data", name="data", readonly=True)
    assert parse("/srv//www/:/www:rw") == Mount("bind", "/www", source="/srv/www")
    for bad in ("data", "data:", ":/x", "a:/x:ro:z", "a:/x:z", "a:/x:ro,rw", "a:x",
                "a:/x/../y", "a:/", "../a:/x", ".a:/x", "a b:/x", "/h,o:/x", "a:/x,y"):
        with pytest.raises(OptionError):
            parse(bad)
    with pytest.raises(OptionError, match="two volumes at one destination"):
        parse_all(["a:/x", "/h:/x"])


def test_records_from_an_archive_are_checked() -> None:
    good = [{"kind": "volume", "name": "data", "destination": "/data", "source": "/x/y"},
            {"kind": "bind", "source": "/srv", "destination": "/srv", "readonly": True}]
    assert from_records(good) == [Mount("volume", "/data", name="data"),
                                  Mount("bind", "/srv", source="/srv", readonly=True)]
    assert from_records(None) == []
    for hostile in ("x", [1], [{"kind": "device"}], [{"kind": "volume", "name": "../../etc",
                                                      "destination": "/x"}],
                    [{"kind": "volume", "name": "a", "destination": "../x"}],
                    [{"kind": "bind", "source": "relative", "destination": "/x"}],
                    [{"kind": "volume", "name": "a", "destination": "/x\0"}], good + good):
        with pytest.raises(OptionError):
            from_records(hostile)


def test_spec_mounts_are_private_bind_mounts() -> None:
    assert spec_mounts([{"source": "/s", "destination": "/d", "readonly": True}]) == [
        {"destination": "/d", "type": "bind", "source": "/s",
         "options": ["rbind", "rprivate", "ro"]}]


def test_privileges_a_host_bind_mount_is_a_host_path(tmp_path: Path) -> None:
    config = {"image": "x", "privileged": True, "volumes": [
        {"kind": "volume", "name": "data", "source": "/var/lib/ctrmig/runc/volumes/data/_data",
         "destination": "/data"},
        {"kind": "bind", "source": "/etc", "destination": "/host-etc", "readonly": True},
        {"kind": "weird", "source": "/dev", "destination": "/d"}]}
    expected = [PrivilegeRequest("host path", "/etc at /host-etc"),
                PrivilegeRequest("host path", "/dev at /d")]
    assert runc_requests(config) == expected
    assert runc_requests({"volumes": "nope"}) == runc_requests(None) == []
    with atomic_output(tmp_path / "a.tar") as out:
        w = ArchiveWriter(out, "none")
        w.add_bytes("config.dump", json.dumps(config).encode())
        w.finish(Manifest(engine="runc", container=ContainerRecord(name="c")))
    # Only the volumes count: runc takes no "privileged" from its config.dump.
    assert archive_privileges(tmp_path / "a.tar") == expected


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("hostile", [
    _info("./x", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    _info("./x", type=tarfile.LNKTYPE, linkname="../outside"),
    _info("./dev", type=tarfile.CHRTYPE, devmajor=1, devminor=1),
    _info("../x"),
])
def test_hostile_volume_and_rootfs_members_are_refused(tmp_path: Path,
                                                       hostile: tarfile.TarInfo) -> None:
    (tmp_path / "outside").write_text("host file")
    tar = _tar(tmp_path / "h.tar", (hostile, None if hostile.type != tarfile.REGTYPE else b""))
    def volume(d: Path) -> None:
        extract_volume(tar, d, "volumes/v.tar")

    def rootfs(d: Path) -> None:
        apply_rootfs_diff(tar, d)

    for extract in (volume, rootfs):
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(UnsafeArchiveError):
            extract(dest)
        assert not list(dest.iterdir())
        dest.rmdir()
    assert (tmp_path / "outside").read_text() == "host file"


def test_no_write_through_a_symlink_out(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "s.tar", (_info("./l", type=tarfile.SYMTYPE, linkname=str(tmp_path)),
                                    None), (_info("./l/evil"), b"x"))
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsafeArchiveError):
        extract_volume(tar, tmp_path / "d", "volumes/v.tar")
    assert not (tmp_path / "evil").exists()


def test_volume_round_trip_keeps_modes_owners_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    os.chmod(src / "shared", 0o1777)
    (src / "f").write_bytes(os.urandom(5000))
    os.chown(src / "f", 1234, 5678)
    (src / "l").symlink_to("/etc/passwd")  # resolved inside the container: fine
    os.link(src / "f", src / "hard")
    assert write_volume(src, tmp_path / "v.tar") == 5000  # a hard link counts once
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_volume(tmp_path / "v.tar", dest, "volumes/v.tar")
    assert same_tree(src, dest)
    assert (dest / "shared").stat().st_mode & 0o7777 == 0o1777
    assert ((dest / "f").stat().st_uid, (dest / "f").stat().st_gid) == (1234, 5678)
    (dest / "f").write_bytes(b"other")
    assert not same_tree(src, dest)


def _archive_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """An extracted archive carrying volume ``data``."""
    content = tmp_path / "content"
    content.mkdir()
    for name, data in files.items():
        (content / name).write_bytes(data)
    (tmp_path / "archive" / "volumes").mkdir(parents=True)
    write_volume(content, tmp_path / "archive" / "volumes" / "data.tar")
    return tmp_path / "archive"


def test_restore_creates_reuses_refuses_replaces_and_undoes(tmp_path: Path) -> None:
    archive = _archive_dir(tmp_path, {"f": b"archive's"})
    vols = Volumes(tmp_path / "volumes")
    mounts = [Mount("volume", "/data", name="data"), Mount("volume", "/e", name="empty")]

    def restore(replace: bool = False, users: list[str] | None = None) -> Prepared:
        return vols.restore(mounts, archive, lambda n: n == "data", replace=replace,
                            users=lambda n: users or [])

    done = restore()
    assert vols.data("data").joinpath("f").read_bytes() == b"archive's"
    assert list(vols.data("empty").iterdir()) == []
    done.rollback()
    assert not vols.exists("data") and not vols.exists("empty")
    restore().commit()
    restore().commit()  # the same content: reused

    vols.data("data").joinpath("f").write_bytes(b"changed")
    with pytest.raises(VolumeConflictError, match="data exist here with other content"):
        restore()
    with pytest.raises(RestoreError, match=r"in use: data \(used by web\)"):
        restore(replace=True, users=["web"])
    done = restore(replace=True)
    assert vols.data("data").joinpath("f").read_bytes() == b"archive's"
    done.rollback()
    assert vols.data("data").joinpath("f").read_bytes() == b"changed"
    restore(replace=True).commit()
    assert vols.data("data").joinpath("f").read_bytes() == b"archive's"
    assert sorted(p.name for p in vols.root.iterdir()) == ["data", "empty"]  # no leftovers
