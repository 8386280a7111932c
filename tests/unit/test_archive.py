"""Pure-logic tests of the archive format: round trip, compression, and refusals."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ctrmig.archive import (
    ArchiveWriter,
    ContainerRecord,
    Manifest,
    atomic_output,
    extract,
    extracted,
    read_manifest,
    verify,
)
from ctrmig.errors import (
    ArchiveCorruptError,
    ArchiveError,
    ChecksumError,
    ManifestError,
    UnsafeArchiveError,
)


def _manifest() -> Manifest:
    return Manifest(engine="podman", container=ContainerRecord(name="web", id="abc"))


def write_archive(path: Path, compression: str = "none") -> Manifest:
    with atomic_output(path) as out:
        w = ArchiveWriter(out, compression)  # type: ignore[arg-type]
        w.add_bytes("checkpoint/pages-1.img", b"\x01" * 10000)
        w.add_bytes("checkpoint/inventory.img", b"inv")
        w.add_bytes("spec.dump", b'{"ociVersion": "1.0"}')
        return w.finish(_manifest())


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip(tmp_path: Path, compression: str) -> None:
    arc = tmp_path / "a.tar"
    written = write_archive(arc, compression)
    assert set(written.files) == {"checkpoint/pages-1.img", "checkpoint/inventory.img", "spec.dump"}
    assert read_manifest(arc).files == written.files
    assert verify(arc).memory_bytes == 10000
    dest = tmp_path / "x"
    dest.mkdir()
    m = extract(arc, dest)
    assert (dest / "checkpoint/pages-1.img").read_bytes() == b"\x01" * 10000
    assert m.container.name == "web"


def test_atomic_output_removes_partial_on_error(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    with pytest.raises(RuntimeError), atomic_output(arc) as out:
        out.write(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_tampered_byte_is_refused(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    write_archive(arc)
    data = bytearray(arc.read_bytes())
    at = data.index(b"\x01" * 100)
    data[at] = 0x02
    arc.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"pages-1\.img"):
        verify(arc)


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar.zst"
    write_archive(arc, "zstd")
    arc.write_bytes(arc.read_bytes()[:-200])
    with pytest.raises((ArchiveCorruptError, ManifestError)):
        verify(arc)


def test_not_a_tar(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    arc.write_bytes(b"hello, this is not a tar archive" * 40)
    with pytest.raises((ArchiveCorruptError, ManifestError)):
        verify(arc)


def _raw_tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"") -> None:
    with tarfile.open(path, "w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize(
    "info",
    [
        tarfile.TarInfo("/etc/passwd"),
        tarfile.TarInfo("../escape"),
        tarfile.TarInfo("checkpoint/../../escape"),
    ],
)
def test_escaping_names_refused(tmp_path: Path, info: tarfile.TarInfo) -> None:
    arc = tmp_path / "bad.tar"
    _raw_tar(arc, [info])
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError):
        extract(arc, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_links_and_devices_refused(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("checkpoint/x")
    info.type, info.linkname = kind, "/etc/shadow"
    arc = tmp_path / "bad.tar"
    _raw_tar(arc, [info])
    with pytest.raises(UnsafeArchiveError), extracted(arc, workdir=tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar"]  # temp dir removed


def test_duplicate_member_refused(tmp_path: Path) -> None:
    arc = tmp_path / "bad.tar"
    _raw_tar(arc, [tarfile.TarInfo("a"), tarfile.TarInfo("a")])
    with pytest.raises(UnsafeArchiveError, match="twice"):
        verify(arc)


def test_member_not_in_manifest_refused(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    m = _manifest()
    with tarfile.open(arc, "w") as tar:
        extra = tarfile.TarInfo("extra.bin")
        extra.size = 3
        tar.addfile(extra, io.BytesIO(b"abc"))
        text = m.to_yaml().encode()
        info = tarfile.TarInfo("manifest.yaml")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    with pytest.raises(UnsafeArchiveError, match="does not list"):
        verify(arc)


@pytest.mark.parametrize(
    "text",
    [b"!!python/object:os.system {}", b"[1, 2", b"format: other\n", b"- a list\n",
     b"format: ctrmig-checkpoint\nformat_version: 99\n"],
)
def test_bad_manifest_refused(text: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_yaml(text)


def test_manifest_yaml_round_trip() -> None:
    m = _manifest()
    m.options = {"leave_running": True}
    again = Manifest.from_yaml(m.to_yaml())
    assert again.container == m.container
    assert again.options == {"leave_running": True}


def test_too_little_disk_space_is_said_plainly(tmp_path: Path) -> None:
    import shutil

    from ctrmig.archive import Limits
    from ctrmig.errors import ArchiveError

    arc = tmp_path / "a.tar"
    write_archive(arc)
    dest = tmp_path / "x"
    dest.mkdir()
    everything_but_nothing = Limits(min_free_bytes=shutil.disk_usage(dest).free + (1 << 30))
    with pytest.raises(ArchiveError, match="not enough free space"):
        extract(arc, dest, limits=everything_but_nothing)


def test_read_manifest_of_a_compressed_archive_does_not_hash(tmp_path: Path) -> None:
    """``ctrmig restore`` without --engine reads the manifest first: for a compressed
    archive that walks the headers only; verify() still catches what is wrong."""
    import zstandard

    plain = (Path(__file__).parents[1] / "data" / "hostile" / "checksum_mismatch.tar")
    packed = tmp_path / "a.tar.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    assert read_manifest(packed).engine
    with pytest.raises(ChecksumError):
        verify(packed)


def _engine_tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """An engine's own export: (name, data) files, (name, None) directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_copy_tar_repacks_an_engine_export(tmp_path: Path) -> None:
    """podman's export re-packed: directories, odd sizes, a long (pax) name, empty files."""
    long_name = "checkpoint/" + "x" * 150 + ".img"
    members: list[tuple[str, bytes | None]] = [
        ("checkpoint", None), ("checkpoint/pages-1.img", bytes(range(256)) * 4099),
        (long_name, b"long"), ("empty", b""), ("spec.dump", b'{"ociVersion": "1.0"}')]
    arc = tmp_path / "a.tar"
    with atomic_output(arc) as out:
        w = ArchiveWriter(out, "zstd")
        w.copy_tar(io.BytesIO(_engine_tar(members)))
        w.finish(_manifest())
    verify(arc)
    with extracted(arc) as (root, _):
        for name, data in members:
            if data is not None:
                assert (root / name).read_bytes() == data


@pytest.mark.parametrize("cut", [700, 5000, 600000])
def test_copy_tar_refuses_a_cut_off_export(cut: int) -> None:
    data = _engine_tar([("checkpoint/pages-1.img", b"\x07" * 1_000_000)])[:cut]
    with pytest.raises(ArchiveError, match=r"cut off|expected"):
        ArchiveWriter(io.BytesIO(), "none").copy_tar(io.BytesIO(data))


def test_copy_tar_refuses_links() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("checkpoint/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(info)
    with pytest.raises(ArchiveError, match="not a plain file"):
        ArchiveWriter(io.BytesIO(), "none").copy_tar(io.BytesIO(buf.getvalue()))


def test_pieces_announce_the_last_one_before_handing_it_out() -> None:
    """The upload's point of no return: the hook runs once, before the last piece."""
    from ctrmig.archive.streams import CHUNK, pieces

    seen: list[str] = []
    for piece in pieces(io.BytesIO(b"x" * (2 * CHUNK + 5)), lambda: seen.append("last")):
        seen.append(str(len(piece)))
    assert seen == [str(CHUNK), str(CHUNK), "last", "5"]
    assert list(pieces(io.BytesIO(b""), lambda: seen.append("never"))) == []
    assert "never" not in seen


def test_the_piece_after_the_point_of_no_return_is_small() -> None:
    """A socket whose peer reads nothing still takes the last piece whole."""
    from ctrmig.archive.streams import CHUNK, LAST_PIECE, pieces

    seen: list[str] = []
    for piece in pieces(io.BytesIO(b"x" * (2 * CHUNK)), lambda: seen.append("last")):
        seen.append(str(len(piece)))
    assert seen == [str(CHUNK), str(CHUNK - LAST_PIECE), "last", str(LAST_PIECE)]
