"""The one exception hierarchy of ctrmig: catch :class:`CtrmigError` to catch everything.

Every error carries a one-line message and, where we know it, a ``hint`` that says what
to do. Errors raised from a failed tool or API call also carry that tool's ``stderr``.
This module imports nothing from ctrmig.
"""

from __future__ import annotations


class CtrmigError(Exception):
    """Root of every error ctrmig raises."""

    def __init__(self, message: str, *, hint: str | None = None, stderr: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.stderr = stderr
        if stderr:
            self.add_note(f"stderr:\n{stderr}")  # shown in tracebacks, not in str()

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


# --- usage and configuration ---------------------------------------------------------


class OptionError(CtrmigError):
    """An option or argument is invalid, or not supported by this engine or host."""


class UnknownEngineError(OptionError):
    """No adapter is registered under that engine name."""


class FeatureUnavailableError(OptionError):
    """The host lacks a kernel or CRIU feature the requested option needs."""


# --- tools, services and engines ---------------------------------------------------------


class CommandError(CtrmigError):
    """A subprocess failed; ``argv``, ``returncode`` and ``stderr`` say how."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, hint=hint, stderr=stderr)
        self.argv = argv or []
        self.returncode = returncode


class CommandTimeoutError(CommandError):
    """A subprocess ran past its timeout and was killed with its process group."""


class ToolMissingError(CtrmigError):
    """A required program (criu, runc, skopeo, umoci, ...) is not installed."""


class EngineError(CtrmigError):
    """An engine (podman, docker, runc, CRIU) refused or failed an operation."""


class EngineUnavailableError(EngineError):
    """The engine's daemon or API cannot be reached."""


class ContainerNotFoundError(EngineError):
    """No container (or process) by that name or id."""


class NameInUseError(EngineError):
    """The requested container name is already taken."""


class ImageNotFoundError(EngineError):
    """The image a container needs is not available on this host."""


class CheckpointError(EngineError):
    """Checkpointing failed; the container was left running (or restored)."""


class RestoreError(EngineError):
    """Restoring failed; nothing of the new container was left behind."""


class VolumeConflictError(RestoreError):
    """A volume the archive carries exists on this host with other content."""


class BusyError(CtrmigError):
    """Another ctrmig operation holds the lock on this container."""


class PreflightError(CtrmigError):
    """A migration was refused before anything was frozen: ``failures`` lists each check
    that failed ("target image: ..."), ``report`` is the whole preflight report."""

    def __init__(self, message: str, *, hint: str | None = None,
                 failures: list[str] | None = None):
        super().__init__(message, hint=hint)
        self.failures = failures or []
        self.report: object = None


# --- archives ---------------------------------------------------------------------------


class ArchiveError(CtrmigError):
    """A checkpoint archive cannot be used."""


class ArchiveCorruptError(ArchiveError):
    """The archive is not a (complete) tar, or its compression stream is broken."""


class UnsafeArchiveError(ArchiveError):
    """The archive holds an entry that could escape or abuse the extraction directory."""


class ManifestError(ArchiveError):
    """manifest.yaml is missing, not valid YAML, or not of the expected schema."""


class ChecksumError(ArchiveError):
    """A file's size or sha256 differs from what manifest.yaml records."""


class EngineMismatchError(ArchiveError):
    """The archive was written by another engine than the one asked to restore it."""


class PrivilegeError(ArchiveError):
    """The archive asks for more privileges than allowed without an explicit flag."""


class CriuImageError(ArchiveError):
    """A CRIU image in the archive is malformed, truncated or implausibly large."""


class EncryptedArchiveError(ArchiveError):
    """The archive is encrypted (age) and no identity given can decrypt it."""


class SignatureError(ArchiveError):
    """The archive is unsigned, signed by a key not trusted, or differs from what was
    signed."""


#: The stderr line a ctrmig run by another ctrmig (over ssh) adds to say which error it was.
ERROR_LINE = "ctrmig-error-json: "
#: The stderr line such a ctrmig prints once it is ready for the archive on its stdin.
READY_LINE = "ctrmig-ready"
#: ... and once a lazy-pages restore runs (its tasks resumed, their pages still coming).
RUNNING_LINE = "ctrmig-running"


def named(name: str) -> type[CtrmigError]:
    """The error class called ``name`` (as a remote ctrmig reports it), else EngineError.

    Command errors (their argv belongs to the other host) come back as EngineError too."""
    pending: list[type[CtrmigError]] = [CtrmigError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name and not issubclass(cls, CommandError):
            return cls
        pending += cls.__subclasses__()
    return EngineError


class NoManifestError(ManifestError):
    """The archive has no manifest.yaml: not ctrmig's (see :mod:`ctrmig.archive.foreign`),
    or cut short."""


class UntranslatableError(EngineMismatchError):
    """The archive was written by another engine and holds what this one cannot provide
    (namespaces shared with a pod or another container, a mount CRIU needs, a process)."""
