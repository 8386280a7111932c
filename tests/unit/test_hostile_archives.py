"""Every archive of the hostile corpus (tests/data/hostile) is refused with its own error,
by verify(), extract(), extracted() and BaseMigrator.restore alike (before any engine
hook), and nothing is written outside the extraction directory, which extracted()
removes. Cases of stage "restore" (a hostile CRIU core image in a well-formed tar) pass
the reader and are refused by restore, still before any engine hook."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ctrmig import errors
from ctrmig.archive import Limits, extract, extracted, verify
from tests.support import override_settings
from tests.unit.test_privileges import ExtractingFake, FileFake

DATA = Path(__file__).resolve().parents[1] / "data"
CORPUS = DATA / "hostile"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
READ_STAGE = sorted(n for n, c in EXPECTED.items() if c.get("stage", "read") == "read")
RESTORE_STAGE = sorted(n for n, c in EXPECTED.items() if c.get("stage") == "restore")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_hostile", DATA / "make_hostile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_hostile", module)
    spec.loader.exec_module(module)
    return module


make_hostile = _generator()
SENTINEL = Path(make_hostile.SENTINEL)
bombs = functools.cache(make_hostile.bombs)


@dataclasses.dataclass
class Sandbox:
    """A tmp tree: the archive, a work dir for extracted(), a dest for extract(), a cwd."""

    root: Path
    archive: Path
    work: Path
    dest: Path

    def assert_nothing_escaped(self) -> None:
        assert not SENTINEL.exists(), f"{SENTINEL} was created"
        assert sorted(p.name for p in self.root.iterdir()) == ["archive", "cwd", "dest", "work"]
        assert list((self.root / "cwd").iterdir()) == []
        assert list(self.work.iterdir()) == [], "extracted() left its temp dir behind"
        for path in self.dest.rglob("*"):  # extract() may leave partial files, only below dest
            assert not path.is_symlink()
            assert path.is_file() or path.is_dir()


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    assert not SENTINEL.exists(), f"remove {SENTINEL} left by an earlier run"
    for name in ("work", "dest", "cwd"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield Sandbox(tmp_path, tmp_path / "archive", tmp_path / "work", tmp_path / "dest")
    shutil.rmtree(SENTINEL, ignore_errors=True)


def _refused(box: Sandbox, error: type[errors.ArchiveError], limits: Limits) -> None:
    """verify, extract and extracted all raise exactly ``error``; nothing escapes."""
    with pytest.raises(errors.CtrmigError) as caught:
        verify(box.archive, limits=limits)
    assert type(caught.value) is error, caught.value
    with pytest.raises(errors.CtrmigError) as caught:
        extract(box.archive, box.dest, limits=limits)
    assert type(caught.value) is error, caught.value
    with pytest.raises(errors.CtrmigError) as caught, \
            extracted(box.archive, workdir=box.work, limits=limits):
        pytest.fail("extracted() yielded a hostile archive")
    assert type(caught.value) is error, caught.value
    with box.archive.open("rb") as stream, pytest.raises(errors.CtrmigError) as caught:
        verify(stream, limits=limits)  # a stream reads the same as a path
    assert type(caught.value) is error, caught.value
    box.assert_nothing_escaped()


@pytest.mark.parametrize("name", READ_STAGE)
def test_hostile_archive_refused(name: str, sandbox: Sandbox) -> None:
    case = EXPECTED[name]
    shutil.copyfile(CORPUS / name, sandbox.archive)
    error = getattr(errors, case["error"])
    _refused(sandbox, error, dataclasses.replace(Limits(), **case["limits"]))


@pytest.mark.parametrize("name", ["bomb.tar.gz", "bomb.tar.zst"])
def test_decompression_bomb_refused(name: str, sandbox: Sandbox) -> None:
    data, limits = bombs()[name]
    assert len(data) < make_hostile.BOMB_EXPANDED / 100  # it really is a bomb
    sandbox.archive.write_bytes(data)
    _refused(sandbox, errors.UnsafeArchiveError, dataclasses.replace(Limits(), **limits))
    with pytest.raises(errors.UnsafeArchiveError, match="decompression bomb"):
        verify(sandbox.archive, limits=dataclasses.replace(Limits(), **limits))


def test_bomb_guard_spares_small_zero_heavy_archives(tmp_path: Path) -> None:
    """The same archive is a valid one under the default limits: real checkpoints of
    zeroed memory compress this well too, so the guard only starts past 8 GiB."""
    data, _ = bombs()["bomb.tar.zst"]
    arc = tmp_path / "zeros.tar.zst"
    arc.write_bytes(data)
    assert verify(arc).total_bytes == make_hostile.BOMB_EXPANDED
    assert Limits().ratio_after_bytes >= 4 << 30


def test_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    expected = make_hostile.generate(tmp_path)
    assert expected == EXPECTED
    committed = sorted(p.name for p in CORPUS.iterdir())
    assert committed == sorted([*expected, "expected.json"])
    for name in expected:
        assert (tmp_path / name).read_bytes() == (CORPUS / name).read_bytes(), name
    assert sum(p.stat().st_size for p in CORPUS.iterdir()) < 1 << 20


def test_corpus_covers_every_archive_error() -> None:
    kinds = {case["error"] for case in EXPECTED.values()}
    assert kinds == {"UnsafeArchiveError", "ChecksumError", "ManifestError",
                     "ArchiveCorruptError", "PrivilegeError", "CriuImageError"}


@pytest.mark.parametrize("name", RESTORE_STAGE)
def test_restore_stage_cases_pass_the_reader(name: str, sandbox: Sandbox) -> None:
    """Nothing wrong with the tar: only what the CRIU images hold gives them away."""
    shutil.copyfile(CORPUS / name, sandbox.archive)
    assert verify(sandbox.archive).engine == "podman"
    with extracted(sandbox.archive, workdir=sandbox.work) as (root, _):
        assert (root / "checkpoint" / "core-1.img").is_file()
    sandbox.assert_nothing_escaped()


@pytest.mark.parametrize("cls", [ExtractingFake, FileFake])
def test_core_image_with_sys_admin_is_refused_with_the_hint(
    cls: type[ExtractingFake | FileFake], sandbox: Sandbox,
) -> None:
    shutil.copyfile(CORPUS / "core_sys_admin.tar", sandbox.archive)
    fake = cls()
    fake.workdir = sandbox.work
    with pytest.raises(errors.PrivilegeError) as caught:
        fake.restore(sandbox.archive)
    assert "task 1 holds CAP_SYS_ADMIN in its CRIU image" in str(caught.value)
    assert caught.value.hint and "--allow-privileged" in caught.value.hint
    assert fake.calls == []
    assert fake.restore(sandbox.archive, allow_privileged=True) == "restored"
    assert fake.calls == ["restore"]
    sandbox.assert_nothing_escaped()


@pytest.mark.parametrize("name", sorted(n for n, c in EXPECTED.items() if not c["limits"]))
@pytest.mark.parametrize("needs_extracted", [True, False])
def test_restore_refuses_before_any_engine_call(
    name: str, needs_extracted: bool, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BaseMigrator.restore reads the archive first: the engine hooks are never reached."""
    override_settings(monkeypatch, lock_dir=sandbox.root / "cwd" / "locks")
    shutil.copyfile(CORPUS / name, sandbox.archive)
    fake = ExtractingFake() if needs_extracted else FileFake()
    fake.workdir = sandbox.work
    with pytest.raises(errors.CtrmigError) as caught:
        fake.restore(sandbox.archive)
    assert type(caught.value) is getattr(errors, EXPECTED[name]["error"]), caught.value
    assert fake.calls == []
    shutil.rmtree(sandbox.root / "cwd" / "locks", ignore_errors=True)
    sandbox.assert_nothing_escaped()


# --- volume members (volumes/NAME.tar): extracted into a docker volume's directory --------


def _volume_tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644,
           **attrs: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


HOSTILE_VOLUME_MEMBERS: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {
    "dotdot": [(_entry("./../escaped"), b"x")],
    "absolute": [(_entry("/tmp/ctrmig-hostile-sentinel"), b"x")],
    "through_symlink": [(_entry("./out", tarfile.SYMTYPE, "/tmp"), b""),
                        (_entry("./out/ctrmig-hostile-sentinel"), b"x")],
    "through_relative_symlink": [(_entry("./up", tarfile.SYMTYPE, ".."), b""),
                                 (_entry("./up/escaped"), b"x")],
    "hardlink_outside": [(_entry("./passwd", tarfile.LNKTYPE, "/etc/passwd"), b"")],
    "hardlink_dotdot": [(_entry("./l", tarfile.LNKTYPE, "../../etc/passwd"), b"")],
    "char_device": [(_entry("./null", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")],
    "block_device": [(_entry("./sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b"")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_VOLUME_MEMBERS))
def test_hostile_volume_member_is_refused(case: str, sandbox: Sandbox) -> None:
    from ctrmig.engines.docker import volumes

    member = _volume_tar(sandbox.archive, *HOSTILE_VOLUME_MEMBERS[case])
    volume = sandbox.dest / "vol"
    volume.mkdir()
    with pytest.raises(errors.UnsafeArchiveError) as caught:
        volumes.extract(member, volume, "vol")
    assert "volumes/vol.tar" in str(caught.value)
    assert not (sandbox.dest / "escaped").exists() and not (sandbox.root / "escaped").exists()
    assert not [p for p in volume.rglob("*") if p.is_file() and not p.is_symlink()]
    shutil.rmtree(sandbox.dest / "vol")
    sandbox.assert_nothing_escaped()


def test_volume_member_setuid_is_dropped_and_owners_kept(sandbox: Sandbox) -> None:
    from ctrmig.engines.docker import volumes

    member = _volume_tar(
        sandbox.archive, (_entry(".", tarfile.DIRTYPE, mode=0o1777), b""),
        (_entry("./suid", mode=0o4755, uid=1234, gid=4321), b"#!/bin/sh\n"),
        (_entry("./same", tarfile.LNKTYPE, "./suid", mode=0o4755, uid=1234, gid=4321), b""),
        (_entry("./abs", tarfile.SYMTYPE, "/etc/passwd"), b""))
    volume = sandbox.dest / "vol"
    volume.mkdir()
    volumes.extract(member, volume, "vol")
    st = (volume / "suid").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 1234, 4321)
    assert (volume / "same").stat().st_ino == st.st_ino
    assert os.readlink(volume / "abs") == "/etc/passwd"  # kept, never followed here
    assert volume.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("entry", [
    {"name": "../x", "destination": "/data"},
    {"name": "a/b", "destination": "/data"},
    {"name": "", "destination": "/data"},
    {"name": "ok", "destination": "relative"},
    {"name": "ok", "destination": "/data", "member": "checkpoint/core-1.img", "carried": True},
    {"name": "ok", "destination": "/data", "member": "volumes/other.tar", "carried": True},
    {"name": "ok", "destination": "/data", "member": "volumes/ok.tar", "carried": True},  # no file
    {"name": "ok", "destination": "/data", "member": "volumes/ok.tar"},  # not carried?
    {"name": "ok", "destination": "/data", "kind": "bind"},
    "not a mapping",
])
def test_hostile_volume_records_are_refused(entry: object) -> None:
    from ctrmig.archive import ContainerRecord, Manifest
    from ctrmig.engines.docker import volumes

    manifest = Manifest(engine="docker", container=ContainerRecord(name="c", id="i"),
                        extra={"volumes": [entry]})
    with pytest.raises(errors.ArchiveError):
        volumes.recorded(manifest)


@pytest.mark.parametrize("case", sorted(c for c in HOSTILE_VOLUME_MEMBERS if "symlink" not in c))
def test_hostile_volume_member_is_vetted_before_dockerd_extracts_it(
    case: str, sandbox: Sandbox
) -> None:
    """A volume dockerd fills (PUT /archive, chrooted) is vetted first; paths through a
    symlink are left to dockerd's chroot, everything else is refused here."""
    from ctrmig.engines.docker import volumes

    member = _volume_tar(sandbox.archive, *HOSTILE_VOLUME_MEMBERS[case])
    with pytest.raises(errors.UnsafeArchiveError):
        volumes.vet(member, "vol")
    _volume_tar(sandbox.archive, (_entry("./suid", mode=0o4755), b"x"))
    with pytest.raises(errors.UnsafeArchiveError, match="setuid"):
        volumes.vet(member, "vol")
    sandbox.assert_nothing_escaped()
