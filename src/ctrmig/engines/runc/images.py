"""The runc engine's image cache: local images copied by skopeo and unpacked by umoci.

Each image is kept once per manifest digest under ``images/HEX/``: layout/ (skopeo's OCI
layout), rootfs/ (umoci's pristine unpack, the overlay lower layer of every container
made from it), image-config.json and source-refs (the references it was read from).
Whether an image is missing is asked of its store (podman's storage, the docker daemon, a
path), never read from a tool's wording; the tool's words only go into the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrmig.engines.runc.state import StateDir, read_text, to_json
from ctrmig.errors import CommandError, CtrmigError, ImageNotFoundError, OptionError
from ctrmig.host import http, proc

log = logging.getLogger(__name__)

TRANSPORTS = ("containers-storage:", "docker-daemon:", "oci:", "oci-archive:",
              "docker-archive:", "dir:")
IMAGE_TIMEOUT = 600.0
STORE_TIMEOUT = 60.0
OCI_REF_NAME = "org.opencontainers.image.ref.name"
# containers-storage:[driver@graphroot+runroot:options]REF (every part optional)
_STORE_SPEC = re.compile(
    r"\[(?:[^@\]]+@)?(?P<root>[^+:\]]*)(?:\+(?P<runroot>[^:\]]*))?(?::[^\]]*)?\]")


@dataclass(frozen=True)
class Image:
    """An image unpacked in the cache."""

    ref: str            # as the user gave it
    transport_ref: str  # what skopeo reads
    digest: str         # sha256:... of the source manifest
    rootfs: Path        # pristine unpack (overlay lower layer)
    config: dict[str, Any]  # the OCI image config's "config" object


def transport_ref(image: str) -> str:
    """The skopeo reference of ``image``; a bare reference means containers-storage."""
    if image.startswith(TRANSPORTS):
        return image
    if "://" in image:
        raise OptionError(
            f"image {image!r}: only local transports are supported",
            hint="use containers-storage:, docker-daemon:, oci:, oci-archive:, "
                 "docker-archive: or dir:",
        )
    return f"containers-storage:{image}"


class ImageCache:
    """The unpacked images of one state dir."""

    def __init__(self, paths: StateDir, *, docker_url: str):
        self.dir = paths.images
        self.paths = paths
        self.docker_url = docker_url  # where a docker-daemon: image is looked up

    def get(self, image: str, recorded_transport: str | None = None,
            digest: str | None = None) -> Image:
        """The unpacked image, from the cache or copied with skopeo and unpacked by umoci.

        With ``digest`` (a restore), a cached copy of that digest is used as is;
        otherwise the image is read from ``recorded_transport`` (or ``image``) and must
        still have that digest.
        """
        ref = recorded_transport or transport_ref(image)
        if digest and self.holds(digest):
            return self._cached(image, ref, digest)
        found = self._inspect_digest(image, ref)
        if digest and found != digest:
            raise ImageNotFoundError(
                f"image {image!r} with digest {digest} is not on this host "
                f"({ref} now has digest {found})",
                hint="make the original image available (e.g. skopeo copy it here)",
            )
        cache = self._dir(found)
        with _flock(cache.with_suffix(".lock")):
            if not (cache / "rootfs").is_dir():
                self._unpack(ref, cache)
            refs = read_text(cache / "source-refs").splitlines()
            if ref not in refs:
                (cache / "source-refs").write_text("\n".join([*refs, ref]) + "\n")
        return self._cached(image, ref, found)

    def holds(self, digest: str) -> bool:
        """Whether the image of ``digest`` is unpacked here."""
        return (self._dir(digest) / "rootfs").is_dir()

    def has(self, ref: str) -> bool:
        """Whether ``ref`` was unpacked here before or skopeo finds it now."""
        tref = transport_ref(ref)
        for known in self.dir.glob("*/source-refs"):
            if tref in known.read_text().splitlines():
                return True
        try:
            self._inspect_digest(ref, tref)
        except ImageNotFoundError:
            return False
        return True

    def export(self, ref: str, dest: Path, digest: str | None = None) -> str:
        """Save the cached image of ``digest`` (default: what ``ref`` is now) as an
        oci-archive tagged by its digest; return the format."""
        digest = digest or self.get(ref).digest
        cache = self._dir(digest)
        if not (cache / "layout" / "index.json").is_file():
            raise ImageNotFoundError(f"image {ref!r} ({digest}) is not in the image cache")
        proc.run(["skopeo", "copy", "--quiet", f"oci:{cache / 'layout'}:latest",
                  f"oci-archive:{dest}:{_digest_tag(digest)}"], timeout=IMAGE_TIMEOUT,
                 what=f"skopeo copy {ref} to the archive")
        return "oci-archive"

    def load(self, path: Path, fmt: str) -> None:
        """Unpack an image carried in an archive into the cache, under its source digest."""
        if fmt != "oci-archive":
            raise ImageNotFoundError(f"the archive carries its image as {fmt!r}; the runc "
                                     "engine reads oci-archive only")
        tag = _oci_archive_tag(path)
        digest = tag.replace("-", ":", 1)
        cache = self._dir(digest)
        with _flock(cache.with_suffix(".lock")):
            if not (cache / "rootfs").is_dir():
                self._unpack(f"oci-archive:{path}:{tag}", cache)
        log.info("unpacked the archive's image %s", digest)

    def _dir(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise ImageNotFoundError(f"bad image digest {digest!r}")
        return self.dir / hexpart

    def _cached(self, image: str, ref: str, digest: str) -> Image:
        cache = self._dir(digest)
        config = json.loads((cache / "image-config.json").read_text())
        return Image(image, ref, digest, cache / "rootfs", config.get("config") or {})

    def _inspect_digest(self, image: str, ref: str) -> str:
        res = proc.run(["skopeo", "inspect", *self._daemon("--daemon-host", ref),
                        "--format", "{{.Digest}}", ref],
                       timeout=IMAGE_TIMEOUT, check=False)
        err = res.stderr.decode(errors="replace")
        if res.returncode != 0:
            if present(ref, docker_url=self.docker_url) is False:
                raise ImageNotFoundError(f"image {image!r} not found ({ref})",
                                         stderr=proc.tail(err),
                                         hint="build or load it locally; registries are "
                                              "not used")
            raise CommandError(f"skopeo inspect {ref} failed (exit {res.returncode})",
                               argv=res.args, returncode=res.returncode,
                               stderr=proc.tail(err))
        digest = res.stdout.decode().strip()
        if not digest.startswith("sha256:"):
            raise CommandError(f"skopeo inspect {ref} printed no digest: {digest!r}",
                               stderr=proc.tail(err))
        return digest

    def _daemon(self, flag: str, ref: str) -> list[str]:
        """skopeo's flag for the daemon a docker-daemon: ``ref`` is read from (skopeo
        reads no DOCKER_HOST: it would ask /var/run/docker.sock, not ``docker_url``)."""
        return [flag, self.docker_url] if ref.startswith("docker-daemon:") else []

    def _unpack(self, ref: str, cache: Path) -> None:
        tmp = self.paths.new_workdir("image")
        try:
            proc.run(["skopeo", "copy", "--quiet", *self._daemon("--src-daemon-host", ref), ref,
                      f"oci:{tmp / 'layout'}:latest"],
                     timeout=IMAGE_TIMEOUT, what=f"skopeo copy {ref}")
            proc.run(["umoci", "unpack", "--image", f"{tmp / 'layout'}:latest",
                      str(tmp / "bundle")], timeout=IMAGE_TIMEOUT, what="umoci unpack")
            (tmp / "image-config.json").write_bytes(to_json(_image_config(tmp / "layout")))
            (tmp / "bundle" / "rootfs").rename(tmp / "rootfs")
            shutil.rmtree(tmp / "bundle")
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --- is the image there? (asked of its store) ----------------------------------------------


def present(ref: str, *, docker_url: str) -> bool | None:
    """Whether the store behind skopeo reference ``ref`` holds the image: True, False, or
    None when the store cannot tell (it is unreachable, or the question makes no sense)."""
    transport, _, rest = ref.partition(":")
    if transport == "containers-storage":
        return _in_containers_storage(rest)
    if transport == "docker-daemon":
        return _in_docker(rest, docker_url)
    if transport in ("oci", "oci-archive"):
        path, _, tag = rest.partition(":")
        return _in_oci(Path(path), tag, archive=transport == "oci-archive")
    if transport == "docker-archive":
        return Path(rest.partition(":")[0]).exists()
    if transport == "dir":
        return Path(rest).exists()
    return None


def _in_containers_storage(ref: str) -> bool | None:
    """``podman image exists`` (exit 1: absent), in the store the reference names."""
    argv = ["podman"]
    spec = _STORE_SPEC.match(ref)
    if spec:
        ref = ref[spec.end():]
        # Not --storage-driver: podman 4.3 refuses one its database did not record
        # ('graph driver "" does not match our storage graph driver "overlay"').
        for flag, value in (("--root", spec["root"]), ("--runroot", spec["runroot"])):
            if value:
                argv += [flag, value]
    try:
        res = proc.run([*argv, "image", "exists", ref], timeout=STORE_TIMEOUT, check=False)
    except CtrmigError:  # podman is not installed, or hangs
        return None
    return {0: True, 1: False}.get(res.returncode)


def _in_docker(ref: str, docker_url: str) -> bool | None:
    """Ask the docker daemon (404: absent)."""
    import docker  # only here: the docker SDK is slow to import and rarely needed
    import requests

    try:
        with http.api_errors("docker", f"inspect image {ref}", start_hint="start dockerd",
                             catch=(docker.errors.DockerException, requests.RequestException),
                             not_found=ImageNotFoundError):
            client = docker.APIClient(base_url=docker_url, timeout=STORE_TIMEOUT)
            try:
                client.inspect_image(ref)
            finally:
                client.close()
    except ImageNotFoundError:
        return False
    except CtrmigError:
        return None
    return True


def _in_oci(path: Path, tag: str, *, archive: bool) -> bool | None:
    """An OCI layout (or oci-archive) at ``path`` that holds ``tag`` (any, without one)."""
    if not path.exists():
        return False
    try:
        index = _archive_index(path) if archive else json.loads((path / "index.json").read_text())
        manifests = index["manifests"]
        names = {(m.get("annotations") or {}).get(OCI_REF_NAME) for m in manifests}
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not a layout skopeo can read: not a question of a missing image
    return tag in names if tag else bool(manifests)


# --- OCI layouts and archives ------------------------------------------------------------


def _digest_tag(digest: str) -> str:
    """An OCI tag that carries a digest ("sha256:HEX" -> "sha256-HEX")."""
    return digest.replace(":", "-", 1)


def _oci_archive_tag(path: Path) -> str:
    """The digest tag of the one image in an oci-archive we wrote (from its index.json)."""
    try:
        tag = _archive_index(path)["manifests"][0]["annotations"][OCI_REF_NAME]
    except (OSError, tarfile.TarError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ImageNotFoundError(f"the archive's image {path.name} is unreadable: {e}") from None
    if not isinstance(tag, str) or not re.fullmatch(r"sha256-[0-9a-f]{64}", tag):
        raise ImageNotFoundError(f"the archive's image is not tagged by digest ({tag!r})")
    return tag


def _archive_index(path: Path) -> Any:
    """The index.json of an oci-archive."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("index.json")
        return json.loads(member.read(1 << 20)) if member else {}


def _image_config(layout: Path) -> dict[str, Any]:
    """The OCI image config of the only image in an OCI layout."""
    def blob(digest: str) -> dict[str, Any]:
        algo, _, hexpart = digest.partition(":")
        data: dict[str, Any] = json.loads((layout / "blobs" / algo / hexpart).read_text())
        return data

    index = json.loads((layout / "index.json").read_text())
    manifest = blob(index["manifests"][0]["digest"])
    return blob(manifest["config"]["digest"])


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
