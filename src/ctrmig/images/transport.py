"""Moving OCI images between layouts, archives and registries: skopeo, as podman would.

skopeo reads containers' registries.conf (``/etc/containers/registries.conf`` and its
``.d`` drop-ins, or the file ``CONTAINERS_REGISTRIES_CONF`` names, as podman does), so a
registry marked ``insecure = true`` there is reached over plain http, every other one over
TLS.
"""

from __future__ import annotations

import json

from ctrmig import settings
from ctrmig.errors import CommandError, OptionError
from ctrmig.host import proc

TIMEOUT = 900.0  # a checkpoint image is the container's memory: pushes take a while


def check_name(ref: str) -> str:
    """``ref`` if it is an image name ctrmig can use (no transport, no spaces)."""
    if "://" in ref or not ref or any(c.isspace() for c in ref):
        raise OptionError(f"{ref!r} is not an image name",
                          hint="name it as podman does, without a transport: "
                               "host:port/repo:tag, or localhost/name:tag")
    return ref


def is_registry_ref(ref: str) -> bool:
    """Whether ``ref`` names a registry (``host.domain/…``, ``host:port/…``), not the
    engine's local store (``name:tag``, ``localhost/name``: podman's local names)."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first) and first != "localhost"


def split_tag(ref: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag or "latest"); digests are refused (we push by tag)."""
    if "@" in ref:
        raise OptionError(f"{ref!r}: name a tag to push, not a digest")
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, "latest"


def base_ref(ref: str) -> str:
    """Where the base image of checkpoint image ``ref`` is pushed: beside it, same
    repository, tag ``TAG-base``."""
    repo, tag = split_tag(ref)
    return f"{repo}:{tag}-base"


#: What skopeo says -> what to do about it.
_HINTS = (
    ("server gave HTTP response to HTTPS client",
     "the registry speaks plain http: mark it `insecure = true` in registries.conf "
     "([[registry]] location = \"HOST:PORT\"), or name that file in "
     "CONTAINERS_REGISTRIES_CONF"),
    ("connection refused", "nothing listens at that registry address"),
    ("unauthorized", "log in to the registry first (`podman login` / `skopeo login`)"),
    ("manifest unknown", "no such image or tag in that registry"),
)


def _skopeo(*args: str, what: str) -> str:
    conf = settings.current().registries_conf
    flags = ["--registries-conf", str(conf)] if conf is not None else []
    try:
        res = proc.run(["skopeo", *flags, *args], timeout=TIMEOUT, what=what)
    except CommandError as e:
        text = (e.stderr or "").lower()
        hint = next((h for needle, h in _HINTS if needle.lower() in text), None)
        if hint is None or e.hint:
            raise
        raise CommandError(e.message, argv=e.argv, returncode=e.returncode,
                           stderr=e.stderr, hint=hint) from None
    return res.stdout.decode()


def copy(src: str, dest: str, *, what: str) -> None:
    """``skopeo copy SRC DEST`` (transports spelled out: ``oci:DIR:TAG``, ``docker://REF``,
    ``oci-archive:FILE``, ``docker-archive:FILE``)."""
    _skopeo("copy", "--quiet", src, dest, what=what)


def config_digest(ref: str) -> str:
    """The config blob's digest of the image at ``docker://ref``: what podman calls the
    image's ID once it pulled it (hex, no ``sha256:``)."""
    manifest = json.loads(_skopeo("inspect", "--raw", f"docker://{ref}",
                                  what=f"skopeo inspect {ref}"))
    digest = str((manifest.get("config") or {}).get("digest", ""))
    return digest.removeprefix("sha256:")


def delete(ref: str) -> None:
    """``skopeo delete docker://ref``: the registry drops the tag's manifest."""
    _skopeo("delete", f"docker://{ref}", what=f"delete {ref}")
