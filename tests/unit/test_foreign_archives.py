"""Archives ctrmig did not write (archive/foreign.py): which layout an archive is, the
manifest made for it, and the reader's defences and the privilege gate applied to them
unchanged. Real CRIU images and podman configs come from tests/data; the end-to-end
cases with real engines are in tests/integration/test_foreign_archives.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

import ctrmig
from ctrmig.archive import extract, extracted, foreign, verify
from ctrmig.archive.manifest import FileEntry
from ctrmig.errors import (
    ArchiveCorruptError,
    ArchiveError,
    EngineMismatchError,
    ManifestError,
    PrivilegeError,
    RestoreError,
    SignatureError,
    UnsafeArchiveError,
)
from tests.support import override_settings
from tests.unit.test_privileges import ExtractingFake, FileFake

DATA = Path(__file__).resolve().parents[1] / "data"
CORE = (DATA / "criu" / "core-root.img").read_bytes()
INVENTORY = b"\x19\x43\x56\x54\x01\x02\x03\x04inventory"
PAGES = bytes(range(256)) * 16
SENTINEL = Path("/tmp/ctrmig-foreign-sentinel")


def podman_files(kind: str = "default") -> dict[str, bytes]:
    """A podman export's members (real podman config.dump and spec.dump)."""
    return {
        "checkpoint/inventory.img": INVENTORY, "checkpoint/pages-1.img": PAGES,
        "config.dump": (DATA / "specs" / f"podman-{kind}.config.json").read_bytes(),
        "spec.dump": (DATA / "specs" / f"podman-{kind}.spec.json").read_bytes(),
        "stats-dump": b"\x00" * 48,
    }


def crio_files() -> dict[str, bytes]:
    """A CRI-O checkpoint's members: checkpointctl's ContainerConfig, kubelet annotations."""
    files = podman_files()
    spec = json.loads(files["spec.dump"])
    spec["annotations"] = {"io.kubernetes.container.name": "counter",
                           "io.kubernetes.pod.name": "counters",
                           "io.kubernetes.pod.namespace": "default",
                           "io.kubernetes.cri-o.ImageName": "quay.io/x/counter:1"}
    files["spec.dump"] = json.dumps(spec).encode()
    files["config.dump"] = json.dumps({
        "id": json.loads(files["config.dump"])["id"], "name": "k8s_counter_counters_default_uid_0",
        "rootfsImage": "quay.io/x/counter:1", "rootfsImageRef": "b" * 64,
        "rootfsImageName": "quay.io/x/counter:1", "runtime": "runc",
        "createdTime": "2026-12-01T10:00:00Z", "checkpointedTime": "2026-12-01T11:00:00Z",
        "restoredTime": "0001-01-01T00:00:00Z", "restored": False}).encode()
    files["bind.mounts"] = b"[]"
    return files


def tar_of(files: dict[str, bytes], extra: Sequence[tarfile.TarInfo] = (),
           compression: str = "none") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in extra:
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@pytest.fixture
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Locks and temp files of restores below ``tmp_path``."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    override_settings(monkeypatch, lock_dir=tmp_path / "locks")
    return tmp_path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- layouts and their manifests --------------------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_a_podman_export_gets_a_manifest_made_of_its_contents(
    tmp_path: Path, compression: str,
) -> None:
    files = podman_files()
    arc = write(tmp_path / "p.tar", tar_of(files, compression=compression))
    manifest = verify(arc)
    config = json.loads(files["config.dump"])
    assert manifest.engine == "podman"
    assert manifest.container.name == config["name"]
    assert manifest.container.image == config["RawImageName"]
    assert manifest.files == {n: FileEntry(len(d), hashlib.sha256(d).hexdigest())
                              for n, d in files.items()}
    facts = foreign.facts(manifest)
    assert facts is not None and facts["layout"] == foreign.PODMAN_EXPORT
    assert foreign.NO_CHECKSUMS in foreign.note(manifest)
    assert manifest.source_host == manifest.kernel == ""  # not this host's: unknown
    assert ctrmig.inspect(arc) == manifest  # read_manifest too (no manifest to seek)


def test_a_crio_checkpoint_names_its_kubelet_container_and_image(tmp_path: Path) -> None:
    manifest = verify(write(tmp_path / "c.tar", tar_of(crio_files())))
    assert manifest.engine == "cri-o"
    assert manifest.container.name == "counter"
    assert manifest.container.image == "quay.io/x/counter:1"
    assert manifest.container.image_id == "b" * 64
    facts = foreign.facts(manifest)
    assert facts is not None and facts["kubernetes"]["pod"] == "counters"
    assert facts["kubernetes"]["cri_o_name"] == "k8s_counter_counters_default_uid_0"
    assert foreign.restore_engine(manifest) == "podman"
    assert foreign.native(manifest, "podman") and not foreign.native(manifest, "docker")


def test_ctrmigs_own_archives_are_not_foreign(tmp_path: Path) -> None:
    from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, atomic_output

    with atomic_output(tmp_path / "own.tar") as out:
        w = ArchiveWriter(out)
        w.add_bytes("spec.dump", b"{}")
        w.finish(Manifest(engine="podman", container=ContainerRecord(name="c")))
    manifest = verify(tmp_path / "own.tar")
    assert foreign.facts(manifest) is None and foreign.note(manifest) == ""
    foreign.check_restorable(manifest, "runc", None)


@pytest.mark.parametrize(("files", "message"), [
    ({"spec.dump": b"{}"}, "no checkpoint/inventory.img"),
    ({"pod.dump": b"{}", "pod.options": b"{}"}, "a pod checkpoint"),
    ({**podman_files(), "ctrmig/runtime-spec.json": b"{}"}, "cut short"),
    ({k: v for k, v in podman_files().items() if k != "spec.dump"}, "no spec.dump"),
    ({**podman_files(), "config.dump": b'{"Id": "x", "HostConfig": {}}'},
     "neither podman's nor CRI-O's"),
    ({**podman_files(), "config.dump": b"not json"}, "not valid JSON"),
    ({**podman_files(), "spec.dump": b'{"ociVersion": "1"}'}, "not an OCI runtime spec"),
])
def test_other_layouts_are_refused_saying_what_was_expected(
    tmp_path: Path, files: dict[str, bytes], message: str,
) -> None:
    arc = write(tmp_path / "x.tar", tar_of(files))
    with pytest.raises(ManifestError, match=message):
        verify(arc)
    with pytest.raises(ManifestError, match=message):
        ctrmig.inspect(arc)


def test_not_a_tar_names_the_layouts_ctrmig_reads(tmp_path: Path) -> None:
    with pytest.raises(ArchiveCorruptError) as refused:
        verify(write(tmp_path / "x.json", b'{"hello": 1}' * 100))
    assert "CRI-O" in (refused.value.hint or "") and "docker" in (refused.value.hint or "")


def test_a_foreign_archive_has_no_signature_to_trust(tmp_path: Path) -> None:
    keys = write(tmp_path / "trusted", b"")
    with pytest.raises(SignatureError, match=foreign.NO_CHECKSUMS):
        verify(write(tmp_path / "p.tar", tar_of(podman_files())), trusted_keys=keys)


# --- docker checkpoint directories --------------------------------------------------------------

def docker_dir(root: Path) -> Path:
    root.mkdir()
    for name, data in podman_files().items():
        if name.startswith("checkpoint/"):
            (root / name.removeprefix("checkpoint/")).write_bytes(data)
    return root


def test_a_docker_checkpoint_directory_reads_as_checkpoint_images(tmp_path: Path) -> None:
    directory = docker_dir(tmp_path / "cp1")
    manifest = verify(directory)
    assert manifest.engine == "docker"
    assert sorted(manifest.files) == ["checkpoint/inventory.img", "checkpoint/pages-1.img"]
    assert manifest.memory_bytes == len(PAGES)
    with extracted(directory, workdir=tmp_path) as (root, again):
        assert (root / "checkpoint" / "pages-1.img").read_bytes() == PAGES
        assert again.files == manifest.files
    for engine, name in (("podman", "c"), ("docker", None), ("runc", "c")):
        with pytest.raises(ArchiveError, match="only CRIU's images") as refused:
            foreign.check_restorable(manifest, engine, name)
        assert "--engine docker --name CONTAINER" in (refused.value.hint or "")
    foreign.check_restorable(manifest, "docker", "c")  # into that existing container


def test_an_extracted_ctrmig_archive_directory_verifies(tmp_path: Path) -> None:
    from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, atomic_output

    with atomic_output(tmp_path / "own.tar") as out:
        w = ArchiveWriter(out)
        w.add_bytes("a.txt", b"a")  # sorts before manifest.yaml, which must still be last
        w.add_bytes("z.txt", b"z")
        w.finish(Manifest(engine="runc", container=ContainerRecord(name="c")))
    with tarfile.open(tmp_path / "own.tar") as tar:  # ours: trusted
        tar.extractall(tmp_path / "tree", filter="data")
    assert (tmp_path / "tree" / "manifest.yaml").is_file()
    assert foreign.facts(verify(tmp_path / "tree")) is None


@pytest.mark.parametrize(("engine", "name"), [("podman", "new"), ("docker", None)])
def test_restore_refuses_a_docker_directory_before_the_engine(
    private: Path, engine: str, name: str | None,
) -> None:
    """Only into docker, and only into a named container: before any engine hook."""
    tmp_path = private
    m = ExtractingFake()
    m.engine = engine  # type: ignore[misc]
    with pytest.raises(ArchiveError, match="only CRIU's images"):
        m.restore(docker_dir(tmp_path / "cp1"), name=name)
    assert m.calls == []


def test_an_engine_that_cannot_take_a_crio_checkpoint_names_podman(private: Path) -> None:
    """The hint names the engine that restores it natively (no engine is called cri-o)."""
    m = ExtractingFake()
    m.engine = "process"  # type: ignore[misc]
    with pytest.raises(EngineMismatchError) as refused:
        m.restore(write(private / "c.tar", tar_of(crio_files())), name="new")
    assert refused.value.hint == "restore it with --engine podman"
    assert m.calls == []


# --- hostile foreign archives: the same defences ------------------------------------------------

def _assert_refused(arc: Path, error: type[Exception], match: str, work: Path) -> None:
    assert not SENTINEL.exists()
    dest = work / "dest"
    dest.mkdir()
    with pytest.raises(error, match=match):
        verify(arc)
    with pytest.raises(error, match=match):
        extract(arc, dest)
    with pytest.raises(error, match=match), extracted(arc, workdir=work):
        pytest.fail("extracted() yielded a hostile archive")
    with pytest.raises(error, match=match):
        ctrmig.inspect(arc)
    assert not SENTINEL.exists(), "a member escaped"
    for path in dest.rglob("*"):
        assert not path.is_symlink()


@pytest.mark.parametrize(("kind", "match"), [
    ("dotdot", "escapes with '..'"), ("symlink", "symlink"), ("hardlink", "hard link"),
    ("device", "device node"), ("absolute", "absolute path"),
])
def test_a_hostile_foreign_archive_is_refused(private: Path, kind: str, match: str) -> None:
    tmp_path = private
    evil = tarfile.TarInfo({"dotdot": "checkpoint/../../../tmp/ctrmig-foreign-sentinel",
                            "absolute": str(SENTINEL)}.get(kind, "checkpoint/pages-2.img"))
    if kind == "symlink":
        evil.type, evil.linkname = tarfile.SYMTYPE, str(SENTINEL)
    elif kind == "hardlink":
        evil.type, evil.linkname = tarfile.LNKTYPE, "/etc/shadow"
    elif kind == "device":
        evil.type, evil.devmajor, evil.devminor = tarfile.CHRTYPE, 1, 3
    arc = write(tmp_path / "evil.tar", tar_of(podman_files(), [evil]))
    _assert_refused(arc, UnsafeArchiveError, match, tmp_path)
    for engine in (ExtractingFake(), FileFake()):  # restore: refused before any engine hook
        with pytest.raises(UnsafeArchiveError, match=match):
            engine.restore(arc, name="evil")
        assert engine.calls == []
    assert not SENTINEL.exists()


def test_a_foreign_archive_within_the_limits_only(tmp_path: Path) -> None:
    from ctrmig.archive import Limits

    arc = write(tmp_path / "p.tar", tar_of(podman_files()))
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        verify(arc, limits=Limits(max_members=3))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "symlinked_dir", "device"])
def test_a_hostile_docker_directory_is_refused(tmp_path: Path, kind: str) -> None:
    directory = docker_dir(tmp_path / "cp1")
    SENTINEL.mkdir()  # a target that exists: following the link would read or write there
    try:
        if kind == "symlink":
            os.symlink(SENTINEL, directory / "pages-2.img")
        elif kind == "fifo":
            os.mkfifo(directory / "pages-2.img")  # read, it would block forever
        elif kind == "device":  # /dev/null's numbers (we run as root)
            os.mknod(directory / "pages-2.img", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        else:
            os.symlink(SENTINEL, directory / "sub")
        match = {"fifo": "fifo", "device": "device node"}.get(kind, "symlink")
        work = tmp_path / "work"
        work.mkdir()
        with pytest.raises(UnsafeArchiveError, match=match):
            verify(directory)
        with pytest.raises(UnsafeArchiveError, match=match), extracted(directory, workdir=work):
            pytest.fail("extracted() yielded a hostile directory")
        assert list(SENTINEL.iterdir()) == []
        assert list(work.iterdir()) == []
    finally:
        os.rmdir(SENTINEL)


@pytest.mark.parametrize("engine", [ExtractingFake, FileFake])
def test_the_privilege_gate_judges_a_foreign_archive(
    private: Path, engine: type[ExtractingFake],
) -> None:
    tmp_path = private
    arc = write(tmp_path / "priv.tar.zst", tar_of(podman_files("privileged"), compression="zstd"))
    m = engine()
    with pytest.raises(PrivilegeError, match="SYS_ADMIN"):
        m.restore(arc, name="new")
    assert m.calls == []
    assert m.restore(arc, name="new", allow_privileged=True) == "restored"
    assert engine().restore(write(tmp_path / "d.tar", tar_of(podman_files())),
                            name="d") == "restored"
    # What CRIU will really restore is judged too: a core image holding every capability.
    root = write(tmp_path / "core.tar", tar_of({**podman_files(), "checkpoint/core-1.img": CORE}))
    with pytest.raises(PrivilegeError, match="in its CRIU image"):
        engine().restore(root, name="core")


def test_a_crio_checkpoint_restores_through_a_podman_engine(
    private: Path,
) -> None:
    assert ExtractingFake().restore(write(private / "c.tar", tar_of(crio_files())),
                                    name="c") == "restored"


# --- CRI-O's config.dump in podman's dialect ------------------------------------------------------

def test_podman_config_of_a_crio_checkpoint() -> None:
    files = crio_files()
    crio, spec = json.loads(files["config.dump"]), json.loads(files["spec.dump"])
    config = foreign.podman_config(crio, spec)
    # podman 4.3 refuses one without the other ("both RootfsImageName and RootfsImageID").
    assert (config["rootfsImageName"], config["rootfsImageID"]) == (
        "quay.io/x/counter:1", "b" * 64)
    assert config["command"] == spec["process"]["args"]
    assert config["createNetNS"] is True and config["runtime"] == "runc"


def test_podman_spec_leaves_the_pods_namespaces_behind() -> None:
    spec = json.loads(crio_files()["spec.dump"])
    spec["linux"]["namespaces"] = [{"type": "ipc", "path": "/var/run/ipcns/x"},
                                   {"type": "uts", "path": "/var/run/utsns/x"},
                                   {"type": "network", "path": "/var/run/netns/x"},
                                   {"type": "mount"}, {"type": "pid"}]
    got = foreign.podman_spec(spec)
    assert got["linux"]["namespaces"] == [{"type": t} for t in
                                          ("ipc", "uts", "network", "mount", "pid")]
    assert spec["linux"]["namespaces"][0]["path"] == "/var/run/ipcns/x"  # a copy changed
    spec["linux"]["namespaces"][4]["path"] = "/proc/1/ns/pid"
    with pytest.raises(RestoreError, match="PID namespace"):
        foreign.podman_spec(spec)


def test_podman_import_file_rewrites_only_config_and_spec(tmp_path: Path) -> None:
    files = crio_files()
    arc = write(tmp_path / "c.tar", tar_of(files))
    manifest = verify(arc)
    with foreign.podman_import_file(arc, manifest, tmp_path) as copy:
        assert copy != arc
        with tarfile.open(copy) as tar:
            got: dict[str, Any] = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                                   for m in tar.getmembers()}
    assert json.loads(got.pop("config.dump"))["rootfsImageID"] == "b" * 64
    spec = json.loads(got.pop("spec.dump"))
    assert spec == foreign.podman_spec(json.loads(files["spec.dump"]))
    assert not [ns for ns in spec["linux"]["namespaces"] if "path" in ns]
    assert got == {n: d for n, d in files.items() if n not in ("config.dump", "spec.dump")}
    assert not copy.exists()
    podman = verify(write(tmp_path / "p.tar", tar_of(podman_files())))
    with foreign.podman_import_file(tmp_path / "p.tar", podman, tmp_path) as same:
        assert same == tmp_path / "p.tar"
