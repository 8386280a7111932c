"""Checkpoint images as OCI image layouts: written from an archive, read back into one.

The format is podman's (``podman container checkpoint --create-image``, which CRI-O
restores too): one layer whose files are the checkpoint archive's members at its root,
and the ``io.podman.annotations.checkpoint.*`` (and CRI-O's
``io.kubernetes.cri-o.annotations.checkpoint.*``) annotations on the image manifest.

ctrmig's image keeps the archive whole, manifest.yaml (and its signature) included: read
back, it is the archive as written, so checksums and signatures hold. The members podman
reads when it restores the image natively are rewritten where podman needs them
otherwise: config.dump naming the base pushed beside the checkpoint (see
:mod:`ctrmig.images`: podman pulls the base by that name before it restores) and, for
another engine's checkpoint, config.dump, spec.dump and CRIU images in podman's dialect.
Each original rides along under :data:`ORIGINALS` and takes its place again when ctrmig
reads the image.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from ctrmig.archive.layout import CONFIG_DUMP, IMAGE_DIR, MANIFEST_NAME
from ctrmig.archive.reader import decompressed
from ctrmig.archive.streams import ForwardOnly
from ctrmig.errors import ArchiveCorruptError
from ctrmig.host.files import open_private, private_dir, write_private

#: Where ctrmig's image keeps the archive's own copy of each member it rewrote for podman
#: (podman copies only the members it knows and ignores these).
ORIGINALS = "ctrmig/original/"
ORIGINAL_CONFIG = ORIGINALS + CONFIG_DUMP
#: The most a rewritten member (config.dump, spec.dump, a CRIU image) may hold.
MAX_ORIGINAL_BYTES = 64 << 20

#: A member's new content, from its original bytes.
Rewrite = Callable[[bytes], bytes]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
#: The tag of the one image in the layouts ctrmig writes and reads.
LAYOUT_TAG = "checkpoint"

PODMAN = "io.podman.annotations.checkpoint."
CRIO = "io.kubernetes.cri-o.annotations.checkpoint."
#: The keys podman and CRI-O both write (the others are podman's only).
SHARED_KEYS = ("name", "rawImageName", "rootfsImageID", "rootfsImageName")
#: ctrmig's own: the base image's name in the source engine (before it was pushed).
SOURCE_IMAGE = "io.ctrmig.checkpoint.sourceImage"
ENGINE = "io.ctrmig.checkpoint.engine"

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Base:
    """The base image as the checkpoint image names it (pushed beside it, or local)."""

    name: str
    image_id: str = ""  # hex, without "sha256:" (podman's rootfsImageID)


@dataclass(frozen=True)
class Facts:
    """What the annotations say about the container and the host it ran on."""

    container: str
    engine: str
    engine_version: str = ""
    criu_version: str = ""
    runtime: str = ""
    arch: str = ""
    kernel: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def checkpoint_annotations(facts: Facts, base: Base, source_image: str) -> dict[str, str]:
    """podman's and CRI-O's checkpoint annotations, plus ctrmig's own."""
    shared = {"name": facts.container, "rawImageName": base.name,
              "rootfsImageID": base.image_id, "rootfsImageName": base.name}
    out = {PODMAN + k: v for k, v in shared.items()}
    out |= {CRIO + k: v for k, v in shared.items()}
    podman_only = {"criu.version": _criu_number(facts.criu_version),
                   "runtime.name": facts.runtime,
                   "host.arch": _GOARCH.get(facts.arch, facts.arch),
                   "host.kernel": facts.kernel}
    if facts.engine == "podman":
        podman_only["podman.version"] = facts.engine_version
    out |= {PODMAN + k: v for k, v in podman_only.items() if v}
    out |= {SOURCE_IMAGE: source_image, ENGINE: facts.engine, **facts.extra}
    return out


def _criu_number(version: str) -> str:
    """CRIU's version as podman writes it: 4.2.1 -> 40201."""
    parts = [int(p) for p in version.split(".")[:3] if p.isdigit()]
    if not parts:
        return ""
    parts += [0] * (3 - len(parts))
    return str(parts[0] * 10000 + parts[1] * 100 + parts[2])


def is_checkpoint(notes: Mapping[str, str]) -> bool:
    """Whether an image's annotations mark it as a checkpoint (podman's or CRI-O's)."""
    return bool(notes.get(PODMAN + "name") or notes.get(CRIO + "name"))


def podman_config(config_dump: bytes, base: Base) -> bytes:
    """podman's config.dump naming ``base`` as the image it pulls and creates from."""
    config = json.loads(config_dump)
    config["rootfsImageName"] = base.name
    config["RawImageName"] = base.name
    if base.image_id:
        config["rootfsImageID"] = base.image_id
    return json.dumps(config).encode()


# --- writing ---------------------------------------------------------------------------


class _Hashing:
    """A file being written, hashing and counting what goes in."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def write_layout(archive: Path, layout: Path, notes: Mapping[str, str], *,
                 arch: str = "", rewrite: Mapping[str, Rewrite] | None = None,
                 keep_image: bool = True, created: str | None = None) -> str:
    """Write an OCI image layout at ``layout`` (a new private dir) holding ``archive``'s
    members as its one layer, ``notes`` as the manifest's annotations; return the
    manifest's digest.

    ``rewrite`` (member -> function) rewrites members podman reads (each original goes
    under :data:`ORIGINALS`); ``keep_image`` False leaves a carried image (``image/``) out.
    """
    blobs = private_dir(layout / "blobs" / "sha256")
    tmp = layout / "layer.tmp"
    with open_private(tmp) as raw:
        sink = _Hashing(raw)
        _write_layer(archive, sink, rewrite or {}, keep_image)
    layer = _blob(blobs, tmp, sink.sha.hexdigest())
    when = created or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": when, "architecture": _GOARCH.get(arch, arch or "amd64"), "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer]},
        "history": [{"created": when, "created_by": "ctrmig checkpoint --image"}],
    }
    config_digest, config_size = _json_blob(blobs, config)
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer, "size": sink.size}],
        "annotations": dict(notes),
    }
    digest, size = _json_blob(blobs, manifest)
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size,
         "annotations": {REF_NAME: LAYOUT_TAG}}]}
    write_private(layout / "index.json", json.dumps(index))
    write_private(layout / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}))
    return digest


def _write_layer(archive: Path, sink: _Hashing, rewrite: Mapping[str, Rewrite],
                 keep_image: bool) -> None:
    """The layer: the archive's members in their order, uncompressed (a registry push
    compresses it)."""
    with archive.open("rb") as raw, _tar(sink, "w|") as out:
        plain, _ = decompressed(raw)
        with _tar(ForwardOnly(plain), "r|") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if not keep_image and (name == IMAGE_DIR or name.startswith(IMAGE_DIR + "/")):
                    continue
                data = tar.extractfile(info) if info.isfile() else None
                if name in rewrite and data is not None:
                    original = _bounded(data, name)
                    _add_bytes(out, info, name, rewrite[name](original))
                    _add_bytes(out, info, ORIGINALS + name, original)
                    continue
                out.addfile(info, data)


def _bounded(data: IO[bytes], name: str) -> bytes:
    content = data.read(MAX_ORIGINAL_BYTES + 1)
    if len(content) > MAX_ORIGINAL_BYTES:
        raise ArchiveCorruptError(f"{name} is implausibly large for a member podman reads")
    return content


def _tar(fileobj: object, mode: str) -> tarfile.TarFile:
    """A streaming tar (``r|``, ``w|``) over any file-like object."""
    return tarfile.open(fileobj=cast(Any, fileobj), mode=cast(Any, mode),
                        format=tarfile.PAX_FORMAT)


def _add_bytes(out: tarfile.TarFile, like: tarfile.TarInfo, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), like.mode, like.mtime
    out.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.at + size
        chunk = bytes(self.data[self.at:end])
        self.at += len(chunk)
        return chunk


def _blob(blobs: Path, tmp: Path, hexdigest: str) -> str:
    tmp.replace(blobs / hexdigest)
    return f"sha256:{hexdigest}"


def _json_blob(blobs: Path, value: Any) -> tuple[str, int]:
    data = json.dumps(value, sort_keys=True).encode()
    hexdigest = hashlib.sha256(data).hexdigest()
    write_private(blobs / hexdigest, data)
    return f"sha256:{hexdigest}", len(data)


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A checkpoint image in an OCI layout directory."""

    layout: Path
    digest: str
    annotations: dict[str, str]
    layer: Path
    layer_type: str

    @property
    def container(self) -> str:
        return self.annotations.get(PODMAN + "name") or self.annotations.get(CRIO + "name", "")

    @property
    def base(self) -> str:
        return (self.annotations.get(PODMAN + "rootfsImageName")
                or self.annotations.get(CRIO + "rootfsImageName", ""))

    @property
    def engine(self) -> str:
        """The engine that wrote it: ctrmig says so, else podman's or CRI-O's keys."""
        if ENGINE in self.annotations:
            return self.annotations[ENGINE]
        return "podman" if PODMAN + "name" in self.annotations else "cri-o"


def read_layout(layout: Path) -> Image:
    """The checkpoint image of an OCI layout (the one image in it); refuses an image that
    is not one, or that has more than one layer."""
    index = _json(layout / "index.json")
    entries = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    if len(entries) != 1:
        raise ArchiveCorruptError(f"{layout}: expected one image, found {len(entries)}")
    digest = str(entries[0].get("digest", ""))
    manifest = _json(_blob_path(layout, digest))
    notes = {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}
    if not is_checkpoint(notes):
        raise ArchiveCorruptError(
            "this image is not a checkpoint image (no io.podman.annotations.checkpoint.name "
            "or io.kubernetes.cri-o.annotations.checkpoint.name annotation)",
            hint="make one with `ctrmig checkpoint CONTAINER --image REF` or podman's "
                 "`container checkpoint --create-image`")
    layers = [x for x in manifest.get("layers", []) if isinstance(x, dict)]
    if len(layers) != 1:
        raise ArchiveCorruptError(
            f"a checkpoint image has one layer; this one has {len(layers)}")
    return Image(layout, digest, notes, _blob_path(layout, str(layers[0].get("digest"))),
                 str(layers[0].get("mediaType", LAYER_TYPE)))


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ArchiveCorruptError(f"unreadable OCI layout file {path.name}: {e}") from None
    if not isinstance(value, dict):
        raise ArchiveCorruptError(f"OCI layout file {path.name} is not a JSON object")
    return value


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or not all(
            c in "0123456789abcdef" for c in hexdigest):
        raise ArchiveCorruptError(f"unsupported blob digest {digest!r}")
    return layout / "blobs" / "sha256" / hexdigest


def _members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """The layer's members in order, ctrmig's copies of the originals left out."""
    for info in tar:
        name = info.name.removeprefix("./")
        if name in ("ctrmig", ORIGINALS.rstrip("/")) or name.startswith(ORIGINALS):
            continue
        yield info, tar.extractfile(info) if info.isfile() else None


def write_archive(image: Image, out: Path) -> None:
    """The archive the image carries, written to ``out`` (created ``0600``): the layer's
    members in order, each original (:data:`ORIGINALS`) back in place of the member
    rewritten for podman."""
    originals = _originals(image)
    with image.layer.open("rb") as raw, open_private(out) as dest:
        plain = _layer_stream(raw)
        with _tar(ForwardOnly(plain), "r|") as tar, _tar(dest, "w|") as arc:
            for info, data in _members(tar):
                name = info.name.removeprefix("./")
                if name in originals and info.isfile():
                    _add_bytes(arc, info, name, originals[name])
                    continue
                arc.addfile(info, data)


def _originals(image: Image) -> dict[str, bytes]:
    """The originals the image keeps (:data:`ORIGINALS`), by member (one pass over the
    layer: each comes right after its rewritten member, before manifest.yaml, so they are
    needed before)."""
    found: dict[str, bytes] = {}
    with image.layer.open("rb") as raw:
        plain = _layer_stream(raw)
        with _tar(ForwardOnly(plain), "r|") as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if name.startswith(ORIGINALS) and info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:
                        found[name.removeprefix(ORIGINALS)] = _bounded(f, name)
                    if sum(map(len, found.values())) > MAX_ORIGINAL_BYTES:
                        raise ArchiveCorruptError("the image keeps implausibly many originals")
                if name == MANIFEST_NAME:
                    break
    return found


def _layer_stream(raw: BinaryIO) -> BinaryIO:
    """The layer's tar, uncompressed (plain, gzip or zstd: told by its first bytes)."""
    return decompressed(raw)[0]


def remove_layout(layout: Path) -> None:
    shutil.rmtree(layout, ignore_errors=True)
