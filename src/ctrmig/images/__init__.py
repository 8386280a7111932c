"""Checkpoint images: a checkpoint archive as an OCI image, in a registry or an engine's
image store, in the format podman and CRI-O restore from (see :mod:`.oci`).

Self-contained: pushed to a registry, the base image goes beside the checkpoint (same
repository, tag ``TAG-base``) and the image names it (podman's ``rootfsImageName``
annotation and config.dump), so ``podman pull REF && podman container restore REF``
works on a host that has neither image: podman pulls the base by that name first. That
holds for a runc or docker container's checkpoint too: the members podman reads are
written in podman's dialect, as a cross-engine restore into podman writes them. The
archive inside also carries the base (``image/``, ctrmig's ``--include-image``), so
``ctrmig restore --image REF`` needs nothing but the checkpoint image. Pushing the base
beside, rather than layering it under the checkpoint, keeps the checkpoint's files out of
the container's root filesystem and lets the registry share the base's layers between
checkpoints of the same image.

A checkpoint image holds the container's whole memory: whoever can pull it from the
registry can read it. An encrypted archive (``--encrypt-to``) cannot be one: podman reads
the layer's files in clear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ctrmig.archive import Archive, Manifest, portable, read_manifest
from ctrmig.archive.layout import CONFIG_DUMP
from ctrmig.archive.spool import copy_member
from ctrmig.archive.streams import Progress
from ctrmig.errors import ArchiveError, CtrmigError, OptionError
from ctrmig.images import oci, transport
from ctrmig.images.oci import Base, Facts, Image
from ctrmig.images.transport import base_ref, is_registry_ref
from ctrmig.options import CheckpointOptions, RestoreOptions
from ctrmig.protocol import Migrator

__all__ = [
    "Image",
    "Pushed",
    "base_ref",
    "check_ref",
    "checkpoint",
    "delete",
    "has_tag",
    "is_registry_ref",
    "pulled",
    "push",
]

log = logging.getLogger(__name__)

#: How the layer names the base image when it stays in the engine's store.
LOCAL_ONLY = ("podman",)


@dataclass(frozen=True)
class Pushed:
    """Where a checkpoint image went."""

    ref: str
    digest: str  # the manifest's digest, as written
    base: str  # the base image it names ("" if none)
    registry: bool


def check_ref(ref: str, engine: Migrator | None) -> bool:
    """Refuse a ``ref`` no checkpoint image can be written to; True if it names a
    registry (else: the podman engine's own store)."""
    transport.split_tag(transport.check_name(ref))
    if is_registry_ref(ref):
        return True
    _store(ref, engine)
    return False


def _store(ref: str, engine: Migrator | None) -> Migrator:
    """The engine whose image store holds (or is to hold) the local image ``ref``."""
    if engine is None or engine.engine not in LOCAL_ONLY:
        raise OptionError(
            f"{ref!r} names no registry, and only podman keeps checkpoint images in its "
            "own store",
            hint="name a registry (host:port/repo:tag, host.domain/repo:tag), or use "
                 "the podman engine")
    return engine


def checkpoint(engine: Migrator, container: str, ref: str,
               options: CheckpointOptions | None = None, *, workdir: Path | None = None,
               progress: Progress | None = None) -> tuple[Archive, Pushed]:
    """Checkpoint ``container`` into checkpoint image ``ref`` (see :func:`push`).

    The archive carries the base image unless ``include_image`` is False (an engine that
    cannot carry images: never). If the push fails, a container the checkpoint stopped is
    resumed from it, as when writing an archive fails.
    """
    opts = options or CheckpointOptions()
    if opts.encrypt_to:
        raise OptionError(
            "an encrypted archive cannot be a checkpoint image: podman and CRI-O read its "
            "files in clear",
            hint="push to a registry only trusted readers can pull from, or move the "
                 "encrypted archive as a file")
    check_ref(ref, engine)
    carry = opts.include_image
    if carry is None:
        carry = bool(getattr(engine, "carries_images", False))
    opts = dataclasses.replace(opts, include_image=carry, compression="none")
    with _private_dir(workdir) as tmp:
        archive = engine.checkpoint(container, tmp / "archive.tar", opts, progress=progress)
        assert archive.path is not None
        try:
            pushed = push(archive.path, ref, engine, workdir=workdir)
        except BaseException as e:
            if not opts.leave_running:
                log.warning("writing %s failed (%s); resuming %s", ref, e, container)
                try:
                    engine.resume(container)
                except CtrmigError as again:
                    log.error("resuming %s failed too: %s", container, again)
            raise
    return Archive(None, archive.manifest), pushed


def push(archive: Path, ref: str, engine: Migrator | None = None, *,
         workdir: Path | None = None) -> Pushed:
    """Write ``archive`` (ctrmig's, unencrypted) as checkpoint image ``ref``: pushed when
    ``ref`` names a registry (the carried base image pushed beside it first), else loaded
    into ``engine``'s image store (podman's)."""
    manifest = read_manifest(archive)
    registry = check_ref(ref, engine)
    with _private_dir(workdir) as tmp:
        base = Base(manifest.container.image, manifest.container.image_id.removeprefix(
            "sha256:"))
        if registry:
            base = _push_base(archive, manifest, ref, tmp) or base
        rewrite = _podman_dialect(archive, manifest, base)
        notes = oci.checkpoint_annotations(_facts(manifest), base, manifest.container.image)
        layout = tmp / "layout"
        digest = oci.write_layout(archive, layout, notes, arch=manifest.arch,
                                  rewrite=rewrite)
        source = f"oci:{layout}:{oci.LAYOUT_TAG}"
        if registry:
            transport.copy(source, f"docker://{ref}", what=f"push {ref}")
        else:
            loadable = tmp / "image.tar"
            transport.copy(source, f"oci-archive:{loadable}:{ref}", what=f"save {ref}")
            oci.remove_layout(layout)
            _store(ref, engine)._load_image(loadable, "oci-archive")  # type: ignore[attr-defined]
    log.debug("checkpoint image %s written (base %s)", ref, base.name or "-")
    return Pushed(ref, digest, base.name, registry)


def _podman_dialect(archive: Path, manifest: Manifest, base: Base) -> dict[str, oci.Rewrite]:
    """The members podman's native restore of the image reads, rewritten for it: its own
    config.dump naming the pushed base; another engine's config.dump, spec.dump and CRIU
    images as the cross-engine restore into podman makes them (:mod:`ctrmig.engines.podman.
    foreign`). Nothing where podman cannot restore the checkpoint (said, not refused: ctrmig
    still restores the image into any engine)."""
    if manifest.engine == "podman":
        if base.name == manifest.container.image:
            return {}
        return {CONFIG_DUMP: partial(oci.podman_config, base=base)}
    # Imported here: it loads the podman adapter (podman-py), which most uses never need.
    from ctrmig.engines.podman import foreign as podman_foreign

    try:
        described = portable.load(archive, manifest, extracted=False)
        podman_foreign.check(described, RestoreOptions())
    except ArchiveError as e:
        log.warning("podman cannot restore this %s checkpoint image natively (%s); "
                    "`ctrmig restore --image` can", manifest.engine, e.message)
        return {}
    # `podman container restore REF` without --name keeps the ID it finds (and wants one).
    recorded = manifest.container.id
    ctr_id = recorded if re.fullmatch(r"[0-9a-f]{64}", recorded) else secrets.token_hex(32)
    replaced = podman_foreign.members(
        dataclasses.replace(described, image=base.name), described.name, base.image_id,
        f"{podman_foreign.DEFAULT_STORE}/volumes", ctr_id)
    return {member: partial(_replaced, data) for member, data in replaced.items()}


def _replaced(data: bytes, original: bytes) -> bytes:
    return data


def _push_base(archive: Path, manifest: Manifest, ref: str, tmp: Path) -> Base | None:
    """Push the base image the archive carries beside ``ref``; None if it carries none."""
    carried = manifest.extra.get("image_archive")
    if not isinstance(carried, dict) or carried.get("member") not in manifest.files:
        log.warning("%s: the archive carries no base image; the image names %s, which the "
                    "target must be able to pull", ref, manifest.container.image or "-")
        return None
    fmt = str(carried.get("format", "oci-archive"))
    saved = tmp / "base.tar"
    copy_member(archive, str(carried["member"]), saved)
    name = base_ref(ref)
    transport.copy(f"{fmt}:{saved}", f"docker://{name}", what=f"push {name}")
    saved.unlink()
    return Base(name, transport.config_digest(name))


def has_tag(ref: str) -> bool:
    """Whether ``ref`` ends in a tag or digest (``repo:tag``, ``repo@sha256:...``)."""
    return "@" in ref or ref.rfind(":") > ref.rfind("/")


def delete(pushed: Pushed) -> None:
    """Delete a pushed checkpoint image from the registry, where it allows deletes
    (distribution's ``storage.delete.enabled``), else say that it stays there. Its base
    stays: a registry deletes a manifest, not a tag, and other checkpoints of the same
    image name the same base manifest."""
    if not pushed.registry:
        return
    try:
        transport.delete(pushed.ref)
    except CtrmigError as e:
        log.warning("the registry keeps %s (and with it the checkpoint's memory): %s",
                    pushed.ref, e.message)


def _facts(manifest: Manifest) -> Facts:
    return Facts(container=manifest.container.name, engine=manifest.engine,
                 engine_version=manifest.engine_version, criu_version=manifest.criu_version,
                 runtime="runc" if manifest.engine in ("podman", "docker", "runc") else "",
                 arch=manifest.arch, kernel=manifest.kernel)


@contextlib.contextmanager
def pulled(ref: str, engine: Migrator | None = None, *,
           workdir: Path | None = None) -> Iterator[tuple[Image, Path]]:
    """Checkpoint image ``ref`` (pulled from its registry, else taken from ``engine``'s
    store) and the archive it carries, in a private temporary directory removed after.
    The image's layout is gone once the archive is written (its annotations stay)."""
    transport.check_name(ref)
    with _private_dir(workdir) as tmp:
        layout = tmp / "layout"
        target = f"oci:{layout}:{oci.LAYOUT_TAG}"
        if is_registry_ref(ref):
            transport.copy(f"docker://{ref}", target, what=f"pull {ref}")
        else:
            saved = tmp / "image.tar"
            _store(ref, engine)._export_image(ref, saved)  # type: ignore[attr-defined]
            transport.copy(f"oci-archive:{saved}", target, what=f"read {ref}")
            saved.unlink()
        image = oci.read_layout(layout)
        archive = tmp / "archive.tar"
        oci.write_archive(image, archive)
        oci.remove_layout(layout)  # the archive holds it all now: half the disk
        yield image, archive


@contextlib.contextmanager
def _private_dir(workdir: Path | None) -> Iterator[Path]:
    """A ``0700`` temporary directory (the checkpoint's memory goes through it)."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-image-", dir=workdir) as tmp:
        yield Path(tmp)
