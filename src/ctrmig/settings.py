"""Settings from the environment and the default sockets and directories: read in one place.

The CLI reads the environment once at its entry point (:func:`load` then :func:`use`); a
library caller gets the same values read once on first use (:func:`current`), or builds a
:class:`Settings` of its own and installs it with :func:`use`. Nothing else in ctrmig reads
``os.environ``: every component gets its paths and addresses from here, passed down.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PODMAN_SOCKET = Path("/run/podman/podman.sock")
DEFAULT_PODMAN_URL = f"unix://{DEFAULT_PODMAN_SOCKET}"
DEFAULT_DOCKER_SOCKET = Path("/var/run/docker.sock")
DEFAULT_DOCKER_URL = f"unix://{DEFAULT_DOCKER_SOCKET}"
STATE_ROOT = Path("/var/lib/ctrmig")
RUN_ROOT = Path("/run/ctrmig")

#: Environment variable -> what it sets (the CLI's --help and the README name these).
ENVIRONMENT = {
    "CTRMIG_ENGINE": "the engine when --engine is not given",
    "CTRMIG_PODMAN_URL": f"podman's API address (default {DEFAULT_PODMAN_URL})",
    "DOCKER_HOST": f"dockerd's API address (default {DEFAULT_DOCKER_URL})",
    "CTRMIG_RUNC_STATE_DIR": f"the runc engine's state (default {STATE_ROOT}/runc)",
    "CTRMIG_PROCESS_STATE_DIR": f"the process engine's state (default {STATE_ROOT}/process)",
    "CTRMIG_JOURNAL_DIR": f"journals of migrations (default {STATE_ROOT}/migrations)",
    "CTRMIG_LOCK_DIR": f"per-container locks (default {RUN_ROOT}/locks)",
    "CTRMIG_RUN_DIR": f"API services ctrmig starts (default {RUN_ROOT})",
    "CTRMIG_REMOTE_COMMAND": "ctrmig on an ssh target (default: ctrmig on its PATH)",
    "CTRMIG_SSH_OPTIONS": "extra ssh flags for ssh:// targets",
    "CTRMIG_RECOVER_GRACE": "seconds recover waits for a committed API target (default 60)",
    "CONTAINERS_REGISTRIES_CONF": "containers' registries.conf for checkpoint images' pushes "
                                  "and pulls (default /etc/containers/registries.conf)",
}


@dataclass(frozen=True)
class Settings:
    """Where ctrmig finds engines and keeps its state."""

    engine: str | None = None
    podman_url: str = DEFAULT_PODMAN_URL
    docker_url: str = DEFAULT_DOCKER_URL
    runc_state_dir: Path = STATE_ROOT / "runc"
    process_state_dir: Path = STATE_ROOT / "process"
    journal_dir: Path = STATE_ROOT / "migrations"
    lock_dir: Path = RUN_ROOT / "locks"
    run_dir: Path = RUN_ROOT
    remote_command: str = "ctrmig"
    ssh_options: tuple[str, ...] = ()
    #: Seconds ``recover`` watches for an API target that may still be importing an archive
    #: it received whole before ctrmig died (podman's API service goes on alone): podman
    #: imports 1 GiB in about 10 s here.
    recover_grace: float = 60.0
    #: containers' registries.conf for skopeo (checkpoint images): which registries are
    #: insecure; None: skopeo's own default (/etc/containers/registries.conf and .d).
    #: podman reads the variable itself; skopeo 1.9 does not, so ctrmig passes it.
    registries_conf: Path | None = None

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def load(environ: Mapping[str, str]) -> Settings:
    """Settings from environment variables (see :data:`ENVIRONMENT`); unset ones default."""
    base = Settings()

    def path(var: str, default: Path) -> Path:
        return Path(environ[var]) if environ.get(var) else default

    return Settings(
        engine=environ.get("CTRMIG_ENGINE") or None,
        podman_url=environ.get("CTRMIG_PODMAN_URL") or base.podman_url,
        docker_url=environ.get("DOCKER_HOST") or base.docker_url,
        runc_state_dir=path("CTRMIG_RUNC_STATE_DIR", base.runc_state_dir),
        process_state_dir=path("CTRMIG_PROCESS_STATE_DIR", base.process_state_dir),
        journal_dir=path("CTRMIG_JOURNAL_DIR", base.journal_dir),
        lock_dir=path("CTRMIG_LOCK_DIR", base.lock_dir),
        run_dir=path("CTRMIG_RUN_DIR", base.run_dir),
        remote_command=environ.get("CTRMIG_REMOTE_COMMAND") or base.remote_command,
        ssh_options=tuple(shlex.split(environ.get("CTRMIG_SSH_OPTIONS", ""))),
        recover_grace=float(environ.get("CTRMIG_RECOVER_GRACE") or base.recover_grace),
        registries_conf=(Path(environ["CONTAINERS_REGISTRIES_CONF"])
                         if environ.get("CONTAINERS_REGISTRIES_CONF") else None),
    )


_current: Settings | None = None


def current() -> Settings:
    """The settings in force: those given to :func:`use`, else the environment's (read once)."""
    global _current
    if _current is None:
        _current = load(os.environ)
    return _current


def use(settings: Settings) -> Settings:
    """Install ``settings`` for every component built from now on; return the previous."""
    global _current
    previous = current()
    _current = settings
    return previous
