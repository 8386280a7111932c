"""The docker engine: :class:`DockerMigrator` and the modules it is made of.

``migrator`` is the adapter; ``api`` holds every Engine API call and its error translator;
``config`` translates the recorded container; ``checkpoints`` handles dockerd's checkpoint
directories and containerd's race (moby#42900); ``rootfs`` carries filesystem changes and
``volumes`` the content of the container's volumes.
"""

from ctrmig.engines.docker.migrator import DockerMigrator

__all__ = ["DockerMigrator"]
