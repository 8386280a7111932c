"""``ENGINE[+ADDRESS]`` strings -> migrators, for the CLI and for recovery.

Addresses:

* ``podman+ssh://[user@]host[:port][/path/to/podman.sock]``: podman's API on that host
  through ssh, which forwards its unix socket (default /run/podman/podman.sock) as
  podman-remote does: nothing listens on the network, ssh authenticates and encrypts.
* ``ENGINE+ssh://[user@]host[:port]`` for docker, runc and process: ctrmig runs on that
  host, the archive streams through ssh (docker's restore must write into the target's
  own disk, which its API cannot do).
* ``unix:///path``: podman's or docker's API on this host.
* ``tcp://host:port``: podman's or docker's API unauthenticated and in clear over the
  network, which gives root on that host to anyone who reaches the port: a migration
  refuses it unless ``insecure`` (``--insecure``), see :func:`check_insecure`.

Examples: ``podman``, ``podman+ssh://root@host-b``, ``docker+ssh://root@host-b``,
``runc+ssh://root@host-b``, ``docker+unix:///run/docker.sock``.
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
    """Build the migrator an ``ENGINE[+ADDRESS]`` string names (:func:`check_insecure`
    first, for a link that must not be plain tcp:// by default)."""
    engine, address = split(spec)
    if address is None:
        return migrator(engine, **engine_options)
    if address.startswith("ssh://"):
        ssh_options = settings.current().ssh_options
        if engine == "podman":
            return migrator(engine, url=address, ssh_options=ssh_options, **engine_options)
        return RemoteMigrator(engine, address, ssh_options=ssh_options)
    if engine in API_ENGINES and address.startswith(("unix://", "tcp://", "http://")):
        return migrator(engine, **{API_ENGINES[engine]: address}, **engine_options)
    raise OptionError(
        f"{spec!r}: the {engine} engine cannot be reached at {address!r}",
        hint="podman and docker take unix:// tcp:// or ssh:// addresses; runc and process "
             "take ssh://",
    )


def check_insecure(where: str, insecure: bool) -> None:
    """Refuse a plain network API link (tcp://) unless ``insecure``: say why."""
    if insecure or not any(s in where for s in ("tcp://", "http://")):
        return
    engine = "docker" if where.startswith("docker") else "podman"
    raise OptionError(
        f"{where}: a tcp:// API has no authentication and no encryption: anyone who "
        "reaches the port is root on that host, and the archive (the container's whole "
        "memory) crosses the network in clear",
        hint=f"use {engine}+ssh://[user@]host[:port] instead, or pass --insecure "
             "(insecure=True) on a network you trust",
    )
