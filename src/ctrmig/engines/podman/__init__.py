"""The podman adapter: podman's REST API (:mod:`.migrator`), and the direct route through
podman's storage when it is on this host (:mod:`.direct`, its files: :mod:`.bundle`)."""

from ctrmig.engines.podman.migrator import PodmanMigrator

__all__ = ["PodmanMigrator"]
