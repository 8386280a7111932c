"""Checkpoints ctrmig did not write: recognised by their contents, given a manifest.

Three layouts are known, all holding CRIU's images under ``checkpoint/``:

* podman's own ``podman container checkpoint --export`` archive (none, gzip or zstd):
  ctrmig's layout without manifest.yaml; config.dump is libpod's ContainerConfig.
* CRI-O's (and so the kubelet's checkpoint API's) archive: the same layout, but
  config.dump is checkpointctl's reduced ContainerConfig (id, name, rootfsImage*,
  runtime, checkpointedTime, restored) and spec.dump carries the io.kubernetes.*
  annotations.
* a docker checkpoint directory (``docker checkpoint create --checkpoint-dir DIR C
  NAME`` writes ``DIR/NAME``): CRIU's images alone, read as if below ``checkpoint/``.

The archive is read by :mod:`.reader` exactly like ctrmig's own (every defence applies);
when it ends without manifest.yaml the reader asks :func:`synthesize` for one, built from
what it read: the sha256 of each member is ctrmig's own, computed while reading, since
the writer recorded none. Such a manifest says so (``extra["foreign"]``), and everything
that shows a manifest repeats it (:func:`note`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

from ctrmig.archive.jsondoc import as_dict as _dict
from ctrmig.archive.jsondoc import json_object
from ctrmig.archive.layout import (
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SPEC_DUMP,
    checkpoint_member,
)
from ctrmig.archive.manifest import ContainerRecord, FileEntry, Manifest
from ctrmig.archive.streams import CHUNK
from ctrmig.errors import ArchiveCorruptError, ArchiveError, ManifestError, RestoreError

#: Members the reader keeps (when small) for :func:`synthesize`.
KEPT = (CONFIG_DUMP, SPEC_DUMP)
#: The key in ``Manifest.extra`` of a synthesized manifest.
EXTRA_KEY = "foreign"
#: What every output says of a synthesized manifest.
NO_CHECKSUMS = "no checksums from the writer"
INVENTORY = checkpoint_member("inventory.img")

PODMAN_EXPORT, CRIO, DOCKER_DIR = "podman-export", "cri-o", "docker-checkpoint-dir"
#: layout -> (the writer, as a manifest's engine; what it is, for people).
LAYOUTS = {
    PODMAN_EXPORT: ("podman", "podman's own checkpoint export (podman container checkpoint "
                              "--export)"),
    CRIO: ("cri-o", "a CRI-O / kubelet checkpoint archive"),
    DOCKER_DIR: ("docker", "a docker checkpoint directory (CRIU images only)"),
}
EXPECTED = ("expected ctrmig's archive (manifest.yaml last), podman's or CRI-O's checkpoint "
            "archive (checkpoint/inventory.img, config.dump, spec.dump), or a docker "
            "checkpoint directory (inventory.img and CRIU's other images)")
# libpod's ContainerConfig has these; checkpointctl's reduced copy (CRI-O's) has not.
_PODMAN_KEYS = ("spec", "lockID", "CreateCommand", "rootfsImageID", "RawImageName")
_CRIO_KEYS = ("checkpointedTime", "rootfsImageRef", "rootfsImage", "restored")
_K8S_CONTAINER = "io.kubernetes.container.name"
_K8S_POD = "io.kubernetes.pod.name"
_K8S_NAMESPACE = "io.kubernetes.pod.namespace"
_CRIO_IMAGE = "io.kubernetes.cri-o.ImageName"


# --- recognising a layout, and its manifest -------------------------------------------------

def synthesize(files: Mapping[str, FileEntry], kept: Mapping[str, bytes]) -> Manifest:
    """The manifest of an archive that has none: ``files`` every member read (sizes and
    sha256 computed while reading), ``kept`` the contents of the :data:`KEPT` members.
    Raise ManifestError, saying what was expected, for any other layout."""
    layout = detect(files, kept)
    writer, what = LAYOUTS[layout]
    config, spec = _json(kept, CONFIG_DUMP), _json(kept, SPEC_DUMP)
    process = _dict(spec.get("process"))
    annotations = {str(k): str(v) for k, v in _dict(spec.get("annotations")).items()}
    command = [str(a) for a in process.get("args") or [] if isinstance(a, (str, int))]
    facts: dict[str, Any] = {"layout": layout, "writer": writer, "description": what,
                             "checksums": f"{NO_CHECKSUMS}: sha256 computed by ctrmig while "
                                          "reading"}
    if layout == PODMAN_EXPORT:
        record = ContainerRecord(
            name=_s(config, "name"), id=_s(config, "id"),
            image=_s(config, "rootfsImageName") or _s(config, "RawImageName"),
            image_id=_s(config, "rootfsImageID"),
            command=[str(c) for c in config.get("command") or []] or command)
        created = ""
    elif layout == CRIO:
        record = ContainerRecord(
            # The kubelet's name for it ("counter"), not CRI-O's k8s_counter_pod_ns_uid_0.
            name=annotations.get(_K8S_CONTAINER) or _s(config, "name"), id=_s(config, "id"),
            image=_s(config, "rootfsImageName") or _s(config, "rootfsImage")
            or annotations.get(_CRIO_IMAGE, ""),
            image_id=_s(config, "rootfsImageRef"), command=command)
        facts["kubernetes"] = {"pod": annotations.get(_K8S_POD, ""),
                               "namespace": annotations.get(_K8S_NAMESPACE, ""),
                               "container": annotations.get(_K8S_CONTAINER, ""),
                               "cri_o_name": _s(config, "name"),
                               "runtime": _s(config, "runtime")}
        created = _s(config, "checkpointedTime")
    else:
        record = ContainerRecord(name="")
        created = ""
    return Manifest(engine=writer, container=record, kernel="", arch="", source_host="",
                    created=created, extra={EXTRA_KEY: facts}, files=dict(files))


def detect(files: Mapping[str, FileEntry], kept: Mapping[str, bytes]) -> str:
    """Which foreign layout ``files`` are (see :func:`synthesize`), or ManifestError."""
    pods = [n for n in ("pod.dump", "checkpointed.pods") if n in files]
    if pods:  # checkpointctl's pod and kubelet-metadata layouts
        raise ManifestError(f"a pod checkpoint ({pods[0]}): several containers in one archive",
                            hint="ctrmig restores one container's checkpoint archive at a time "
                                 "(what the kubelet's checkpoint API writes)")
    if INVENTORY not in files:
        raise ManifestError("archive has no manifest.yaml and no checkpoint/inventory.img: "
                            "not a checkpoint ctrmig knows", hint=EXPECTED)
    if any(name.startswith("ctrmig/") for name in files):
        raise ManifestError("archive has ctrmig's own members but no manifest.yaml: a ctrmig "
                            "archive cut short?", hint="checkpoint again, or copy it again")
    if all(name.startswith(f"{CHECKPOINT_DIR}/") for name in files):
        return DOCKER_DIR
    for name in KEPT:
        if name not in files:
            raise ManifestError(f"archive has CRIU images but no {name}: not a checkpoint "
                                "ctrmig knows", hint=EXPECTED)
        if name not in kept:
            raise ManifestError(f"{name} is implausibly large ({files[name].size} bytes)")
    config, spec = _json(kept, CONFIG_DUMP), _json(kept, SPEC_DUMP)
    if not isinstance(spec.get("process"), dict):
        raise ManifestError(f"{SPEC_DUMP} is not an OCI runtime spec", hint=EXPECTED)
    if any(key in config for key in _PODMAN_KEYS):
        return PODMAN_EXPORT
    annotations = _dict(spec.get("annotations"))
    if any(key in config for key in _CRIO_KEYS) or _K8S_CONTAINER in annotations:
        return CRIO
    raise ManifestError(f"{CONFIG_DUMP} is neither podman's nor CRI-O's (keys: "
                        f"{sorted(config)[:8]})", hint=EXPECTED)


def facts(manifest: Manifest) -> dict[str, Any] | None:
    """What a synthesized manifest says of its archive (None: ctrmig wrote it)."""
    found = manifest.extra.get(EXTRA_KEY)
    return found if isinstance(found, dict) and found.get("layout") in LAYOUTS else None


def note(manifest: Manifest) -> str:
    """"no checksums from the writer (...)" for a foreign archive, "" for ctrmig's."""
    found = facts(manifest)
    if found is None:
        return ""
    return (f"{NO_CHECKSUMS}: {LAYOUTS[found['layout']][1]}, not ctrmig's; ctrmig computed "
            "every sha256 while reading it")


# --- restoring one ----------------------------------------------------------------------------

def restore_engine(manifest: Manifest) -> str:
    """The engine that restores this archive when none is named: its writer's, but
    podman's for CRI-O's (same layout; no CRI-O engine here)."""
    return "podman" if _is_crio(manifest) else manifest.engine


def native(manifest: Manifest, engine: str) -> bool:
    """Whether ``engine`` restores this archive as its own (no cross-engine translation)."""
    return manifest.engine == engine or (engine == "podman" and restore_engine(manifest) == engine)


def images_only(manifest: Manifest) -> bool:
    """Whether this is a docker checkpoint directory's: CRIU's images and nothing else."""
    found = facts(manifest)
    return found is not None and found["layout"] == DOCKER_DIR


def check_restorable(manifest: Manifest, engine: str, name: str | None) -> None:
    """Refuse, before any engine call, what cannot be restored as asked. A docker
    checkpoint directory holds CRIU's images only (no config, image or rootfs changes to
    create a container from): docker restores it into an existing stopped container."""
    if images_only(manifest) and (engine != "docker" or not name):
        raise ArchiveError(
            "a docker checkpoint directory holds only CRIU's images: no container config, "
            "image or rootfs changes to create a container from",
            hint="restore it into the stopped docker container it came from (or one created "
                 "with the same image and command): --engine docker --name CONTAINER")


def images_only_tree(root: Path) -> bool:
    """Whether the extracted archive ``root`` holds CRIU's images alone (a docker
    checkpoint directory's): :func:`images_only` for an engine that sees only ``root``."""
    return [p.name for p in root.iterdir()] == [CHECKPOINT_DIR]


def podman_config(crio: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """podman's (libpod's) config.dump for a CRI-O checkpoint: what podman 4.3's import
    needs to create the container (seen to restore with just these). The pod's network
    namespace stays behind: podman makes the container a new one (bridge), as for its own."""
    process = _dict(spec.get("process"))
    return {
        "id": _s(crio, "id"), "name": _s(crio, "name"),
        "rootfsImageName": _s(crio, "rootfsImageName") or _s(crio, "rootfsImage"),
        "rootfsImageID": _s(crio, "rootfsImageRef"),
        "runtime": "runc",  # crun here cannot restore (host-facts), whatever CRI-O used
        "command": [str(a) for a in process.get("args") or []],
        "createdTime": _s(crio, "createdTime") or "0001-01-01T00:00:00Z",
        "createNetNS": True, "networkMode": "bridge",
        "newNetworks": {"podman": {"interface_name": "eth0"}},
        "stopSignal": 15, "stopTimeout": 10, "logDriver": "k8s-file",
    }


def podman_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """spec.dump of a CRI-O checkpoint for podman: without the paths of the pod's
    namespaces (its pause container's, pinned by CRI-O on the source host). runc dumped
    the IPC and UTS namespaces with the container, so they come back new; with the paths
    left in, runc's restore fails (seen: "criu failed: type RESTORE errno 56"). A PID
    namespace shared with the pod was dumped as external: refused."""
    out: dict[str, Any] = json.loads(json.dumps(spec))  # a deep copy
    for ns in _dict(out.get("linux")).get("namespaces") or []:
        if not isinstance(ns, dict) or "path" not in ns:
            continue
        if ns.get("type") == "pid":
            raise RestoreError(
                "the CRI-O container shared its pod's PID namespace (shareProcessNamespace): "
                "it cannot be restored outside that pod",
                hint="checkpoint a container of a pod that does not share its PID namespace")
        del ns["path"]
    return out


def podman_members(kept: Mapping[str, bytes]) -> dict[str, bytes]:
    """config.dump and spec.dump of a CRI-O checkpoint (``kept``: their contents) as
    podman's import takes them."""
    try:
        crio, spec = _json(kept, CONFIG_DUMP), _json(kept, SPEC_DUMP)
    except ManifestError as e:
        raise RestoreError(f"cannot translate the CRI-O checkpoint: {e.message}") from None
    return {CONFIG_DUMP: json.dumps(podman_config(crio, spec)).encode(),
            SPEC_DUMP: json.dumps(podman_spec(spec)).encode()}


@contextlib.contextmanager
def podman_import_file(source: Path, manifest: Manifest,
                       workdir: Path | None = None) -> Iterator[Path]:
    """The verified archive file ``source`` as podman's import takes it: itself, or for a
    CRI-O checkpoint a private copy (removed on exit) with :func:`podman_members`."""
    if not _is_crio(manifest):
        yield source
        return
    # Imported here: the reader and the spool import this module.
    from ctrmig.archive.reader import decompressed
    from ctrmig.archive.sources import plaintext
    from ctrmig.archive.spool import read_members

    members = podman_members(read_members(source, manifest, KEPT))  # checked again
    fd, name = tempfile.mkstemp(prefix="ctrmig-podman-", suffix=".tar", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as out, plaintext(source) as raw, \
                tarfile.open(fileobj=decompressed(raw)[0], mode="r|") as src, \
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as dst:
            for info in src:
                data = members.get(info.name.removeprefix("./"))
                if data is not None:
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
                else:
                    dst.addfile(info, src.extractfile(info) if info.isfile() else None)
        yield Path(name)
    finally:
        os.unlink(name)


def podman_dialect(root: Path, manifest: Manifest) -> None:
    """Rewrite a CRI-O checkpoint extracted at ``root`` (verified) for podman's import
    (:func:`podman_members`). Nothing for other archives."""
    if not _is_crio(manifest):
        return
    try:
        kept = {name: (root / name).read_bytes() for name in KEPT}
    except OSError as e:
        raise RestoreError(f"cannot read the CRI-O checkpoint: {e}") from None
    for name, data in podman_members(kept).items():
        tmp = root / f"{name}.podman"
        tmp.write_bytes(data)
        tmp.replace(root / name)


# --- a directory, read as an archive -----------------------------------------------------------

def tree_stream(path: Path) -> BinaryIO:
    """The directory ``path`` as an uncompressed tar stream, made while it is read, for
    the reader to judge like any archive: symlinks, devices and fifos become members of
    their own type (which the reader refuses), nothing is followed. A docker checkpoint
    directory (inventory.img at its top) is read as if below ``checkpoint/``."""
    prefix = f"{CHECKPOINT_DIR}/" if (path / "inventory.img").is_file() else ""
    return cast(BinaryIO, io.BufferedReader(_TreeReader(_tar_pieces(path, prefix)), CHUNK))


class _TreeReader(io.RawIOBase):
    def __init__(self, pieces: Iterator[bytes]):
        self.pieces, self.buffer = pieces, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self.buffer:
            piece = next(self.pieces, None)
            if piece is None:
                return 0
            self.buffer = piece
        n = min(len(buf), len(self.buffer))
        buf[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def _tar_pieces(root: Path, prefix: str) -> Iterator[bytes]:
    last = [root / n for n in (MANIFEST_NAME, SIGNATURE_NAME) if os.path.lexists(root / n)]
    for path in [*(p for p in _walk(root) if p not in last), *last]:
        name = prefix + path.relative_to(root).as_posix()
        st = os.lstat(path)
        info = tarfile.TarInfo(name)
        info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            yield from _file_pieces(path, info)
            continue
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    yield bytes(2 * tarfile.BLOCKSIZE)


def _walk(root: Path) -> Iterator[Path]:
    """Every entry below ``root``, sorted, directories before their contents, no link
    followed."""
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            yield Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path))


def _file_pieces(path: Path, info: tarfile.TarInfo) -> Iterator[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # swapped since it was listed
            raise ArchiveCorruptError(f"{path} changed while it was read")
        info.size = st.st_size
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        left = st.st_size
        while left:
            data = f.read(min(CHUNK, left))
            if not data:
                raise ArchiveCorruptError(f"{path} shrank while it was read")
            left -= len(data)
            yield data
    if st.st_size % tarfile.BLOCKSIZE:
        yield bytes(tarfile.BLOCKSIZE - st.st_size % tarfile.BLOCKSIZE)


# --- small helpers -----------------------------------------------------------------------------

def _is_crio(manifest: Manifest) -> bool:
    found = facts(manifest)
    return found is not None and found["layout"] == CRIO


def _json(kept: Mapping[str, bytes], name: str) -> dict[str, Any]:
    return json_object(name, kept[name], ManifestError) if name in kept else {}


def _s(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return str(value) if isinstance(value, (str, int, float)) else ""
