"""Checkpoint images, pure logic: names, annotations, and an archive through an OCI layout
and back (no registry, no engine)."""

from __future__ import annotations

import functools
import json
import stat
import tarfile
from pathlib import Path

import pytest

from ctrmig import images
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, atomic_output, crypto, verify
from ctrmig.errors import ArchiveCorruptError, CommandError, OptionError
from ctrmig.host import proc
from ctrmig.images import oci, transport
from ctrmig.migrate import via_ref
from ctrmig.options import CheckpointOptions

PODMAN_CONFIG = {"rootfsImageName": "localhost/app:1", "RawImageName": "localhost/app:1",
                 "rootfsImageID": "aa" * 32, "name": "web"}


@pytest.mark.parametrize(("ref", "registry"), [
    ("127.0.0.1:5000/ckpt/web:1", True), ("registry.example/web", True),
    ("localhost:5000/web:1", True), ("localhost/web:1", False), ("web:1", False),
    ("library/web", False),
])
def test_registry_refs(ref: str, registry: bool) -> None:
    assert transport.is_registry_ref(ref) is registry


def test_base_ref_tags_and_via() -> None:
    assert images.base_ref("127.0.0.1:5000/ckpt/web:v1") == "127.0.0.1:5000/ckpt/web:v1-base"
    assert images.base_ref("127.0.0.1:5000/ckpt/web") == "127.0.0.1:5000/ckpt/web:latest-base"
    assert images.has_tag("h:1/r:t") and not images.has_tag("h:1/r")
    with pytest.raises(OptionError):
        transport.split_tag("h:1/r@sha256:" + "0" * 64)
    for bad in ("docker://h:1/r:t", "", "h:1/r t"):
        with pytest.raises(OptionError, match="not an image name"):
            transport.check_name(bad)
    assert via_ref("127.0.0.1:5000/moves", "web").startswith("127.0.0.1:5000/moves:web-")
    for bad in ("127.0.0.1:5000/moves:tag", "moves"):
        with pytest.raises(OptionError, match="registry repository"):
            via_ref(bad, "web")


def test_annotations_are_podmans_and_crios() -> None:
    facts = oci.Facts(container="web", engine="podman", engine_version="4.3.1",
                      criu_version="4.2.1", runtime="runc", arch="x86_64", kernel="6.18")
    notes = oci.checkpoint_annotations(facts, oci.Base("r:1/w:1-base", "ab" * 32),
                                       "localhost/app:1")
    for prefix in (oci.PODMAN, oci.CRIO):
        assert notes[prefix + "name"] == "web"
        assert notes[prefix + "rootfsImageName"] == "r:1/w:1-base"
        assert notes[prefix + "rootfsImageID"] == "ab" * 32
    assert notes[oci.PODMAN + "criu.version"] == "40201"  # as podman writes it
    assert notes[oci.PODMAN + "host.arch"] == "amd64"
    assert notes[oci.PODMAN + "podman.version"] == "4.3.1"
    assert notes[oci.SOURCE_IMAGE] == "localhost/app:1"
    assert oci.is_checkpoint(notes) and not oci.is_checkpoint({"x": "y"})


def test_podman_config_names_the_pushed_base() -> None:
    out = json.loads(oci.podman_config(json.dumps(PODMAN_CONFIG).encode(),
                                       oci.Base("r:1/w:1-base", "cd" * 32)))
    assert out["rootfsImageName"] == out["RawImageName"] == "r:1/w:1-base"
    assert out["rootfsImageID"] == "cd" * 32 and out["name"] == "web"


def _archive(path: Path) -> Manifest:
    with atomic_output(path) as out:
        w = ArchiveWriter(out, "zstd")
        w.add_bytes("checkpoint/pages-1.img", b"\x01" * 10000)
        w.add_bytes("config.dump", json.dumps(PODMAN_CONFIG).encode())
        w.add_bytes("spec.dump", b'{"ociVersion": "1.0"}')
        w.add_bytes("image/oci-archive.tar", b"base image")
        return w.finish(Manifest(engine="podman", container=ContainerRecord(
            name="web", id="abc", image="localhost/app:1")))


def _layer_members(image: oci.Image) -> dict[str, bytes]:
    with tarfile.open(image.layer) as tar:
        return {m.name: f.read() for m in tar.getmembers()
                if m.isfile() and (f := tar.extractfile(m)) is not None}


def test_archive_through_a_layout_and_back(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    written = _archive(arc)
    base = oci.Base("r:1/ckpt/web:1-base", "cd" * 32)
    layout = tmp_path / "layout"
    notes = oci.checkpoint_annotations(oci.Facts("web", "podman"), base, "localhost/app:1")
    digest = oci.write_layout(arc, layout, notes, arch="x86_64",
                              rewrite={"config.dump": lambda b: oci.podman_config(b, base)})
    image = oci.read_layout(layout)
    assert image.digest == digest and image.container == "web"
    assert image.base == base.name and image.engine == "podman"

    # The layer: podman's layout at its root, podman's config.dump naming the pushed
    # base, ctrmig's original beside it, the manifest last.
    members = _layer_members(image)
    assert json.loads(members["config.dump"])["rootfsImageName"] == base.name
    assert json.loads(members[oci.ORIGINAL_CONFIG]) == PODMAN_CONFIG
    assert members["checkpoint/pages-1.img"] == b"\x01" * 10000
    with tarfile.open(image.layer) as tar:
        assert tar.getnames()[-1] == "manifest.yaml"
    config = json.loads((layout / "blobs/sha256" / json.loads(
        (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_text())
        ["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["architecture"] == "amd64" and config["rootfs"]["diff_ids"]

    # Secrets: every file and directory of the layout is its owner's only.
    for path in [layout, *layout.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))

    # Read back: the archive as written, so its checksums (and a signature) hold.
    back = tmp_path / "back.tar"
    oci.write_archive(image, back)
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    assert verify(back).files == written.files


def _replaced(data: bytes, original: bytes) -> bytes:
    return data


def test_members_rewritten_for_podman_come_back_as_written(tmp_path: Path) -> None:
    """Another engine's checkpoint: config.dump, spec.dump and a CRIU image in podman's
    dialect in the layer, each original kept beside it and put back when ctrmig reads."""
    arc = tmp_path / "a.tar"
    with atomic_output(arc) as out:
        w = ArchiveWriter(out, "none")
        w.add_bytes("checkpoint/files.img", b"runc's files")
        w.add_bytes("checkpoint/pages-1.img", b"\x01" * 5000)
        w.add_bytes("config.dump", b'{"runc": true}')
        w.add_bytes("spec.dump", b'{"ociVersion": "1.0", "root": {"path": "/b/rootfs"}}')
        written = w.finish(Manifest(engine="runc", container=ContainerRecord(name="web")))
    podman = {"config.dump": b'{"name": "web"}', "spec.dump": b'{"root": {"path": ""}}',
              "checkpoint/files.img": b"podman's files"}
    layout = tmp_path / "layout"
    oci.write_layout(arc, layout, oci.checkpoint_annotations(
        oci.Facts("web", "runc"), oci.Base("r:1/w:1-base"), ""),
        rewrite={n: functools.partial(_replaced, d) for n, d in podman.items()})
    image = oci.read_layout(layout)
    members = _layer_members(image)
    for name, data in podman.items():
        assert members[name] == data
        assert members[oci.ORIGINALS + name] != data
    assert members["checkpoint/pages-1.img"] == b"\x01" * 5000
    back = tmp_path / "back.tar"
    oci.write_archive(image, back)
    assert verify(back).files == written.files
    with tarfile.open(back) as tar:
        assert not [n for n in tar.getnames() if n.startswith("ctrmig/")]


def test_read_layout_refuses_what_is_no_checkpoint_image(tmp_path: Path) -> None:
    arc = tmp_path / "a.tar"
    _archive(arc)
    layout = tmp_path / "layout"
    oci.write_layout(arc, layout, {"org.example": "plain image"})
    with pytest.raises(ArchiveCorruptError, match="not a checkpoint image"):
        oci.read_layout(layout)


class _NeverCheckpoints:
    """An engine that must not be asked anything (the refusals come first)."""

    engine = "podman"

    def checkpoint(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the engine was asked to checkpoint")


def test_refused_before_the_engine_is_asked() -> None:
    engine = _NeverCheckpoints()
    with pytest.raises(OptionError, match="encrypted archive cannot be a checkpoint image"):
        images.checkpoint(engine, "web", "r:1/x:1",  # type: ignore[arg-type]
                          CheckpointOptions(encrypt_to=("age1x",)))
    engine.engine = "docker"
    with pytest.raises(OptionError, match="only podman keeps checkpoint images"):
        images.checkpoint(engine, "web", "localhost/x:1")  # type: ignore[arg-type]


def test_a_signed_archive_stays_signed_through_an_image(tmp_path: Path) -> None:
    key = tmp_path / "signer"
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
    trusted = tmp_path / "trusted"
    trusted.write_text(key.with_suffix(".pub").read_text())
    arc = tmp_path / "a.tar"
    with atomic_output(arc) as out:
        w = ArchiveWriter(out, "zstd", sign=crypto.signer(str(key)))
        w.add_bytes("config.dump", json.dumps(PODMAN_CONFIG).encode())
        w.finish(Manifest(engine="podman", container=ContainerRecord(name="web")))
    base = oci.Base("r:1/w:1-base", "cd" * 32)
    oci.write_layout(arc, tmp_path / "layout", oci.checkpoint_annotations(
        oci.Facts("web", "podman"), base, ""),
        rewrite={"config.dump": lambda b: oci.podman_config(b, base)})
    back = tmp_path / "back.tar"
    oci.write_archive(oci.read_layout(tmp_path / "layout"), back)
    assert verify(back, trusted_keys=trusted).container.name == "web"


def test_skopeo_failures_come_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: list[str], **kwargs: object) -> None:
        raise CommandError("push r:1/x:1 failed (exit 1)", argv=argv, returncode=1,
                           stderr='Get "https://r:1/v2/": http: server gave HTTP response '
                                  "to HTTPS client")

    monkeypatch.setattr(proc, "run", refuse)
    with pytest.raises(CommandError) as err:
        transport.copy("oci:/x:checkpoint", "docker://r:1/x:1", what="push r:1/x:1")
    assert err.value.hint is not None and "insecure = true" in err.value.hint
