"""A real registry for checkpoint-image tests: Debian's docker-registry (distribution).

Started once per session on 127.0.0.1 (a free port, in the session's own network
namespace) with its own config and storage directory, stopped by PID. podman and skopeo
reach it over plain http through a private registries.conf marking it insecure
(``CONTAINERS_REGISTRIES_CONF``, for podman, and ctrmig's ``registries_conf`` setting,
both set for each test that asks for it): the host's /etc/containers stays untouched.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctrmig.host import services
from ctrmig.host.files import private_dir, write_private
from tests.hosts import wait_tcp
from tests.support import override_settings

BINARY = "/usr/bin/docker-registry"


@dataclass(frozen=True)
class Registry:
    """A running registry and the registries.conf that reaches it."""

    address: str  # 127.0.0.1:PORT
    conf: Path
    root: Path

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.address}/{repo}:{tag}"

    @property
    def env(self) -> dict[str, str]:
        """What a podman or ctrmig command line needs to reach it."""
        return {"CONTAINERS_REGISTRIES_CONF": str(self.conf)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, svc: services.Service, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    svc.stop()
    raise RuntimeError(f"docker-registry did not listen on 127.0.0.1:{port}; see "
                       f"{svc.log_path}")


def start(root: Path, address: str = "127.0.0.1",
          netns: str | None = None) -> tuple[Registry, services.Service]:
    """docker-registry on ADDRESS:<free port> (in ``netns``, if given), storing under
    ``root`` (deletes allowed, so that a migration can drop its checkpoint image after)."""
    private_dir(root / "data")
    port = _free_port()
    config = root / "config.yml"
    write_private(config, (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}:{port}\n"
    ))
    conf = root / "registries.conf"
    write_private(conf, f'[[registry]]\nlocation = "{address}:{port}"\ninsecure = true\n')
    svc = services.Service("docker-registry", root / "unused.sock",
                           [BINARY, "serve", str(config)], root / "registry.log",
                           root / "registry.pid", netns=netns)
    svc.start(wait=False)
    if netns is None:
        _wait_listening(port, svc)
    else:
        try:
            wait_tcp(netns, address, port)
        except BaseException:
            svc.stop()
            raise
    return Registry(f"{address}:{port}", conf, root), svc


@pytest.fixture(scope="session")
def registry_service(session_dir: Path) -> Iterator[Registry]:
    """The session's registry, started on first use and stopped by PID at the end."""
    if not os.path.exists(BINARY):
        raise RuntimeError("docker-registry is not installed: run scripts/setup-host")
    reg, svc = start(session_dir / "registry")
    try:
        yield reg
    finally:
        svc.stop()


@pytest.fixture
def registry(registry_service: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The session's registry, reachable for this test: podman finds its registries.conf
    in ``CONTAINERS_REGISTRIES_CONF``, ctrmig in its settings (both undone after)."""
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(registry_service.conf))
    override_settings(monkeypatch, registries_conf=registry_service.conf)
    return registry_service
