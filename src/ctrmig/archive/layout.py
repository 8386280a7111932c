"""The archive's layout: every member name, declared once.

The layout is podman's (and CRI-O's and the kubelet's): what checkpointctl reads. ctrmig adds
``manifest.yaml`` as the last member (followed only by its signature, if signed) and, in a
self-contained archive, ``image/``.
"""

from __future__ import annotations

#: CRIU's images (and runc's descriptors.json).
CHECKPOINT_DIR = "checkpoint"
#: The OCI runtime spec the container ran with.
SPEC_DUMP = "spec.dump"
#: The engine's own container config (podman's, docker's inspect, runc/process records).
CONFIG_DUMP = "config.dump"
#: The container's rootfs changes as a layer tar (OCI whiteouts for deletions).
ROOTFS_DIFF = "rootfs-diff.tar"
#: Paths the container deleted from its image, as a JSON list (podman's layout).
DELETED_FILES = "deleted.files"
#: CRIU's dump statistics.
STATS_DUMP = "stats-dump"
#: podman's network state and /dev/shm content.
NETWORK_STATUS = "network.status"
DEVSHM = "devshm-checkpoint.tar"
#: Each volume's content, one tar per volume, named and anonymous alike
#: (``volumes/<name>.tar``, podman's layout: the volume's root as ``./``, ``./sub/f``, ...).
VOLUMES_DIR = "volumes"
#: A carried image (``image/<format>.tar``).
IMAGE_DIR = "image"
#: ctrmig's manifest, the last member: format, engine, and every member's sha256.
MANIFEST_NAME = "manifest.yaml"
#: The SSH signature of manifest.yaml's bytes (``--sign``): the only member after it.
SIGNATURE_NAME = "manifest.yaml.sig"


def checkpoint_member(name: str) -> str:
    """The archive member of CRIU image ``name`` (e.g. ``inventory.img``)."""
    return f"{CHECKPOINT_DIR}/{name}"


def image_member(fmt: str) -> str:
    """The archive member of a carried image saved in format ``fmt``."""
    return f"{IMAGE_DIR}/{fmt}.tar"


def volume_member(name: str) -> str:
    """The archive member holding the content of the volume called ``name``."""
    return f"{VOLUMES_DIR}/{name}.tar"
