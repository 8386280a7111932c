"""``ENGINE[+ADDRESS]`` strings -> migrators, for the CLI and for recovery.

Addresses: ``unix:///path`` and ``tcp://host:port`` reach podman's or docker's API;
``ssh://[user@]host[:port]`` runs ctrmig on that host (any engine). Examples:
``podman``, ``podman+tcp://10.0.0.2:8080``, ``docker+unix:///run/docker.sock``,
``runc+ssh://root@host-b``.
"""

from __future__ import annotations

from typing import Any

from ctrmig import settings
from ctrmig.engines.remote import RemoteMigrator
from ctrmig.errors import OptionError
from ctrmig.protocol import Migrator
from ctrmig.registry import engine_names, migrator

API_ENGINES = {"podman": "url", "docker": "base_url"}


def split(spec: str) -> tuple[str, str | None]:
    """``"podman+tcp://h:1"`` -> ``("podman", "tcp://h:1")``."""
    engine, _, address = spec.partition("+")
    if engine not in engine_names():
        names = ", ".join(engine_names())
        raise OptionError(f"unknown engine {engine!r} in {spec!r}",
                          hint=f"write ENGINE[+ADDRESS] with ENGINE one of {names}")
    return engine, address or None


def connect(spec: str, **engine_options: Any) -> Migrator:
    """Build the migrator an ``ENGINE[+ADDRESS]`` string names."""
    engine, address = split(spec)
    if address is None:
        return migrator(engine, **engine_options)
    if address.startswith("ssh://"):
        ssh_options = settings.current().ssh_options
        return RemoteMigrator(engine, address, ssh_options=ssh_options)
    if engine in API_ENGINES and address.startswith(("unix://", "tcp://", "http://")):
        return migrator(engine, **{API_ENGINES[engine]: address}, **engine_options)
    raise OptionError(
        f"{spec!r}: the {engine} engine cannot be reached at {address!r}",
        hint="podman and docker take unix:// tcp:// or ssh:// addresses; runc and process "
             "take ssh://",
    )
