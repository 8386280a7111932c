"""The preflight's vocabulary: one :class:`Check`, the :class:`PreflightReport` of all of
them, and the :class:`Facts` the source side hands the target side (as JSON over ssh)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ctrmig.errors import PreflightError

Status = Literal["pass", "fail", "unavailable"]
SOURCE, TARGET = "source", "target"
#: Where a migration's memory lands on the target: in the archive (spooled or extracted,
#: then the engine's copy), once in a pages directory beside the spool (the direct
#: pre-copy route), or on no disk at all (post-copy: fetched into the restored memory).
MEMORY_IN_ARCHIVE, MEMORY_IN_PAGES, MEMORY_NOT_ON_DISK = "archive", "pages", "none"
SETUP = "run scripts/setup-host on that host"
API_UNTOLD = "not told by the {engine} API (run `ctrmig doctor` on that host)"


@dataclass(frozen=True)
class Check:
    """One named check on one host (``source`` or ``target``)."""

    host: str
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class PreflightReport:
    """Every check of one planned migration; ``ok`` when none failed."""

    container: str
    source: str
    target: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"container": self.container, "source": self.source, "target": self.target,
                "ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def error(self) -> PreflightError:
        """The one error listing every failure (for a report that is not ok)."""
        failed = self.failures
        listed = "; ".join(f"{c.host} {c.name}: {c.detail}" for c in failed)
        fixes = "; ".join(dict.fromkeys(c.fix for c in failed if c.fix))
        err = PreflightError(
            f"{self.container} cannot move to {self.target}: {len(failed)} check(s) failed "
            f"before anything was frozen: {listed}",
            hint=fixes or None, failures=[f"{c.host} {c.name}: {c.detail}" for c in failed])
        err.report = self
        return err


@dataclass
class Facts:
    """What the source side knows of the container and its host, for the target to judge.

    Sizes and privileges are None where they could not be told (an API-only source)."""

    engine: str
    container: str
    found: bool = False
    name: str = ""
    image: str = ""
    carries_images: bool = False
    memory_bytes: int | None = None
    rootfs_bytes: int | None = None
    image_bytes: int | None = None
    #: ("bind", host path, destination) or ("volume", volume name, destination)
    mounts: list[tuple[str, str, str]] = field(default_factory=list)
    #: (host port, protocol, host address)
    ports: list[tuple[int, str, str]] = field(default_factory=list)
    privileges: list[tuple[str, str]] | None = None
    pids: list[int] = field(default_factory=list)  # the process engine's PIDs
    #: Namespaces shared with a pod or another container (no other engine recreates them)
    joined: list[str] = field(default_factory=list)
    criu_version: str = ""
    cpuinfo: str = ""  # base64 of CRIU's cpuinfo.img, from the source host
    host: str = ""  # resources.host_key() of the source host

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Facts:
        known = {f.name for f in dataclasses.fields(cls)}
        facts = cls(**{k: v for k, v in data.items() if k in known})
        facts.mounts = [tuple(m) for m in facts.mounts]  # type: ignore[misc]
        facts.ports = [tuple(p) for p in facts.ports]  # type: ignore[misc]
        if facts.privileges is not None:
            facts.privileges = [tuple(p) for p in facts.privileges]  # type: ignore[misc]
        return facts

    def estimate(self, with_image: bool, with_memory: bool = True) -> int | None:
        """The archive's expected size (uncompressed), or None if a part is unknown;
        ``with_memory`` False: without the pages (they reach the target another way)."""
        if self.memory_bytes is None or self.rootfs_bytes is None:
            return None
        return (self.memory_bytes if with_memory else 0) + self.rootfs_bytes + (
            (self.image_bytes or 0) if with_image else 0)
