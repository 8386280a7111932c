"""``ctrmig doctor``: can this host checkpoint and restore with each engine?

Every requirement is one :class:`Check` with a status (``pass``, ``fail``, or
``unavailable`` for optional kernel features that only some options need), a one-line
detail and a one-line fix. An engine is usable when every check it depends on passed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import ctrmig
from ctrmig import settings
from ctrmig.errors import CtrmigError
from ctrmig.host import criu, proc, services
from ctrmig.recovery import still_running

Status = Literal["pass", "fail", "unavailable"]
ENGINES = ("podman", "docker", "runc")
SETUP = "run scripts/setup-host"
_CRIU_USERS = ("podman", "docker", "runc", "process")


@dataclass(frozen=True)
class Check:
    """One requirement: ``engines`` are the engines that cannot work without it."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    engines: tuple[str, ...] = ()


@dataclass
class Report:
    """Every check, and which of the engines asked about are usable."""

    checks: list[Check]
    asked: tuple[str, ...]
    engines: dict[str, bool] = field(init=False)

    def __post_init__(self) -> None:
        self.engines = {
            e: all(c.status == "pass" for c in self.checks if e in c.engines) for e in self.asked
        }

    @property
    def ok(self) -> bool:
        return all(self.engines.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "engines": self.engines,
                "checks": [asdict(c) | {"engines": list(c.engines)} for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _socket(url: str) -> Path | None:
    return Path(url[len("unix://"):]) if url.startswith("unix://") else None


def check_criu() -> list[Check]:
    """CRIU installed, ``criu check`` passing, the kernel's checkpoint/restore support, and
    the optional features (lazy pages, memory tracking)."""
    version = criu.version()
    if not version:
        return [Check("criu", "fail", "criu is not installed", SETUP, _CRIU_USERS)]
    checks = [Check("criu", "pass", f"version {version}", "", _CRIU_USERS)]
    passed, last = criu.check()
    checks.append(Check("criu check", "pass" if passed else "fail", last or "no output",
                        "" if passed else f"{SETUP} (needs a CRIU that supports this kernel)",
                        _CRIU_USERS))
    # ns_last_pid exists only with CONFIG_CHECKPOINT_RESTORE=y.
    has_cr = Path("/proc/sys/kernel/ns_last_pid").exists()
    checks.append(Check("kernel checkpoint/restore", "pass" if has_cr else "fail",
                        "CONFIG_CHECKPOINT_RESTORE=y" if has_cr else "CONFIG_CHECKPOINT_RESTORE "
                        "is not set", "" if has_cr else "boot a kernel with "
                        "CONFIG_CHECKPOINT_RESTORE=y", _CRIU_USERS))
    lazy = criu.lazy_pages_supported()
    checks.append(Check("lazy pages (userfaultfd)", "pass" if lazy else "unavailable",
                        "restore --lazy-pages works" if lazy else "restore --lazy-pages cannot "
                        "work here", "" if lazy else "a kernel with CONFIG_USERFAULTFD=y"))
    track = criu.memory_tracking_supported()
    checks.append(Check("memory tracking (soft-dirty)", "pass" if track else "unavailable",
                        "pre-copy (pre-checkpoint) works" if track else "pre-copy (pre-checkpoint)"
                        " cannot work here", "" if track else "a kernel with "
                        "CONFIG_MEM_SOFT_DIRTY=y"))
    return checks


def check_tools() -> list[Check]:
    """runc, and skopeo/umoci that turn images into runc bundles."""
    checks = []
    for tool, why in (("runc", "runs containers"), ("skopeo", "copies images for runc"),
                      ("umoci", "unpacks images for runc")):
        path = shutil.which(tool)
        if path is None:
            checks.append(Check(tool, "fail", f"not installed ({why})",
                                f"apt-get install {tool}", ("runc",)))
            continue
        try:
            version = proc.output([tool, "--version"], timeout=15).splitlines()[0]
        except CtrmigError as e:
            checks.append(Check(tool, "fail", f"{path} does not run: {e.message}",
                                f"reinstall {tool}", ("runc",)))
            continue
        checks.append(Check(tool, "pass", version, "", ("runc",)))
    return checks


def check_podman(url: str | None = None) -> list[Check]:
    """podman's API reachable, and its OCI runtime able to checkpoint."""
    url = url or settings.current().podman_url
    try:
        m = ctrmig.migrator("podman", url=url)
        try:
            version = m.version()
            info_of = getattr(m, "info", None)
            info: dict[str, Any] = info_of() if info_of is not None else {}
        finally:
            m.close()
    except CtrmigError as e:
        return [Check("podman API", "fail", f"{url}: {e.message}",
                      "ctrmig service start podman", ("podman",))]
    checks = [Check("podman API", "pass", f"podman {version} at {url}", "", ("podman",))]
    runtime = (info.get("host") or {}).get("ociRuntime") or {}
    name, rt_version = str(runtime.get("name", "")), str(runtime.get("version", ""))
    if name == "runc" or (name == "crun" and "+CRIU" in rt_version):
        checks.append(Check("podman runtime", "pass", f"{name} can checkpoint", "",
                            ("podman",)))
    else:
        checks.append(Check(
            "podman runtime", "fail",
            f"{name or 'unknown runtime'} cannot checkpoint (needs runc, or crun built +CRIU)",
            'set runtime = "runc" under [engine] in containers.conf (scripts/setup-host)',
            ("podman",)))
    return checks


def check_docker(url: str | None = None) -> list[Check]:
    """dockerd reachable, with experimental features on (needed for checkpoints)."""
    url = url or settings.current().docker_url
    sock = _socket(url)
    if sock is None:
        return [Check("docker daemon", "fail", f"{url}: only unix:// sockets are checked",
                      "point DOCKER_HOST at a unix socket", ("docker",))]
    try:
        info = services.docker_info(sock)
    except (CtrmigError, ValueError) as e:
        detail = e.message if isinstance(e, CtrmigError) else f"bad /info answer: {e}"
        return [Check("docker daemon", "fail", detail, "ctrmig service start docker",
                      ("docker",))]
    checks = [Check("docker daemon", "pass",
                    f"docker {info.get('ServerVersion', '?')} at {url}", "", ("docker",))]
    experimental = bool(info.get("ExperimentalBuild"))
    checks.append(Check("docker experimental", "pass" if experimental else "fail",
                        "on" if experimental else "off: docker refuses checkpoints",
                        "" if experimental else 'set "experimental": true in '
                        "/etc/docker/daemon.json and restart dockerd", ("docker",)))
    return checks


def check_migrations(journal_dir: Path | None = None) -> list[Check]:
    """Migrations whose ctrmig died: their containers wait, stopped, for ``ctrmig recover``.
    Listed for the operator; they make no engine unusable."""
    directory = journal_dir or settings.current().journal_dir
    waiting = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not still_running(data):
            waiting.append(str(data.get("container", path.stem)))
    if not waiting:
        return [Check("unfinished migrations", "pass", "none")]
    return [Check("unfinished migrations", "fail",
                  f"{len(waiting)} left by a ctrmig that died: {', '.join(waiting[:5])}",
                  "ctrmig recover")]


def diagnose(
    engines: Iterable[str] = ENGINES,
    *,
    podman_url: str | None = None,
    docker_url: str | None = None,
) -> Report:
    """Run the checks the given engines need (CRIU's always) and report."""
    asked = tuple(dict.fromkeys(engines))
    steps: list[Callable[[], list[Check]]] = [check_criu, check_migrations]
    if "runc" in asked:
        steps.append(check_tools)
    if "podman" in asked:
        steps.append(lambda: check_podman(podman_url))
    if "docker" in asked:
        steps.append(lambda: check_docker(docker_url))
    return Report([c for step in steps for c in step()], asked)
