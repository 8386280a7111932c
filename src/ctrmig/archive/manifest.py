"""manifest.yaml: what a ctrmig checkpoint archive holds and where it came from.

The manifest is the last member of the archive, so that an archive can be written in one
streaming pass; it lists the size and sha256 of every other member.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from ctrmig.errors import ManifestError

FORMAT = "ctrmig-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one archive member."""

    size: int
    sha256: str


@dataclass
class ContainerRecord:
    """The checkpointed container (or process) as the source engine saw it."""

    name: str
    id: str = ""
    image: str = ""
    image_id: str = ""
    command: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """The parsed manifest.yaml of a checkpoint archive."""

    engine: str
    container: ContainerRecord
    engine_version: str = ""
    criu_version: str = ""
    kernel: str = field(default_factory=platform.release)
    arch: str = field(default_factory=platform.machine)
    source_host: str = field(default_factory=socket.gethostname)
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- derived facts, for inspect -------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes of dumped memory pages (CRIU's pages-*.img)."""
        return sum(
            f.size for p, f in self.files.items() if os.path.basename(p).startswith("pages-")
        )

    @property
    def rootfs_diff_bytes(self) -> int:
        entry = self.files.get("rootfs-diff.tar")
        return entry.size if entry else 0

    # -- YAML -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        ordered: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version}
        for key in ("engine", "engine_version", "criu_version", "kernel", "arch",
                    "source_host", "created", "container", "options", "extra"):
            ordered[key] = data[key]
        ordered["files"] = {p: {"size": f.size, "sha256": f.sha256}
                            for p, f in sorted(self.files.items())}
        return ordered

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Manifest:
        """Parse and validate manifest.yaml text (safe_load only); raise ManifestError."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ManifestError(f"manifest.yaml is not valid YAML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("manifest.yaml is not a mapping")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a ctrmig manifest (format: {data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"unsupported manifest format_version {version!r}",
                hint=f"this ctrmig reads version {FORMAT_VERSION}; upgrade ctrmig",
            )
        try:
            container = data["container"]
            record = ContainerRecord(
                name=_str(container, "name"),
                id=_str(container, "id", ""),
                image=_str(container, "image", ""),
                image_id=_str(container, "image_id", ""),
                command=[str(c) for c in _typed(container, "command", list, [])],
            )
            files = {}
            for path, entry in _typed(data, "files", dict, {}).items():
                size, digest = entry["size"], entry["sha256"]
                if not isinstance(path, str) or not isinstance(size, int) or size < 0:
                    raise ManifestError(f"bad files entry for {path!r}")
                if not isinstance(digest, str) or len(digest) != 64:
                    raise ManifestError(f"bad sha256 for {path!r}")
                files[path] = FileEntry(size=size, sha256=digest)
            return cls(
                engine=_str(data, "engine"),
                container=record,
                engine_version=_str(data, "engine_version", ""),
                criu_version=_str(data, "criu_version", ""),
                kernel=_str(data, "kernel", ""),
                arch=_str(data, "arch", ""),
                source_host=_str(data, "source_host", ""),
                created=str(data.get("created", "")),
                options=_typed(data, "options", dict, {}),
                extra=_typed(data, "extra", dict, {}),
                files=files,
                format_version=version,
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"manifest.yaml misses or mistypes a field: {e}") from None


def _typed(data: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in data or data[key] is None:
        if default is ...:
            raise ManifestError(f"manifest.yaml has no {key!r}")
        return default
    value = data[key]
    if not isinstance(value, kind):
        raise ManifestError(f"manifest.yaml field {key!r} must be a {kind.__name__}")
    return value


def _str(data: dict[str, Any], key: str, default: Any = ...) -> str:
    value = _typed(data, key, (str, int, float), default)  # type: ignore[arg-type]
    return str(value)
