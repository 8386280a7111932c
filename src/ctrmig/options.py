"""Every checkpoint and restore option, declared once.

Each option is a field of :class:`CheckpointOptions` or :class:`RestoreOptions` whose
metadata is an :class:`Spec`: its help text, its CRIU/runc flag and its podman API
parameter. From that one declaration come the CLI flags of ``checkpoint``, ``restore`` and
``migrate`` (:mod:`ctrmig.cli`), the argv of the remote adapter (:func:`cli_args`), the
CRIU flags (:func:`criu_args`) and podman's parameters (:func:`podman_params`). An option
shared by both verbs (e.g. ``tcp_established``) uses the same :class:`Spec` in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from ctrmig.archive.writer import Compression, check_compression
from ctrmig.errors import OptionError

#: Where an option is honoured: by ctrmig itself on every engine ("ctrmig"), or by the
#: engine (adapters list what they support and refuse the rest).
Handled = Literal["ctrmig", "engine"]


@dataclass(frozen=True)
class Spec:
    """How one option is spelled everywhere it appears."""

    help: str
    #: The runc/criu command-line flag, where the option is one.
    criu: str | None = None
    #: podman's libpod API query parameter.
    podman: str | None = None
    handled: Handled = "engine"
    #: CLI flag and short alias, when not ``--`` + the field name with dashes.
    flag: str | None = None
    short: str | None = None
    metavar: str | None = None
    #: Hidden from the CLI (callbacks and other values no command line can carry).
    internal: bool = False
    #: Left out of ``migrate``'s flags (e.g. leave_running: a migration stops the source).
    not_for_migrate: bool = False

    def cli_flag(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def _spec(spec: Spec) -> dict[str, Spec]:
    """A field's metadata: its :class:`Spec`."""
    return {"spec": spec}


TCP_ESTABLISHED = Spec("Include established TCP connections (their peers must stay "
                       "reachable).", criu="--tcp-established", podman="tcpEstablished")
FILE_LOCKS = Spec("Include file locks.", criu="--file-locks", podman="fileLocks")
KEEP = Spec("Keep the engine's temporary checkpoint files.", podman="keep")
IGNORE_ROOTFS = Spec("Leave out the container's rootfs changes.", podman="ignoreRootFS")
IGNORE_VOLUMES = Spec("Leave out the content of volumes.", podman="ignoreVolumes")
PRINT_STATS = Spec("Print the engine's checkpoint/restore statistics.", podman="printStats")
# Secrecy (ctrmig.archive.crypto). Key files are read where ctrmig runs, so these are not
# migrate's (its archive never rests, and goes over ssh): checkpoint and restore only.
ENCRYPT_TO = Spec("Encrypt the archive (age) to RECIPIENT: an age recipient (age1...), an "
                  "ssh public key, or a file of them; repeatable.", handled="ctrmig",
                  metavar="RECIPIENT", not_for_migrate=True)
SIGN = Spec("Sign the archive's manifest (which holds every file's sha256) with this ssh "
            "private key.", handled="ctrmig", metavar="KEYFILE", not_for_migrate=True)
IDENTITY = Spec("Decrypt an encrypted archive with FILE (an age identity or ssh private "
                "key); repeatable.", handled="ctrmig", metavar="FILE", not_for_migrate=True)
TRUSTED_KEYS = Spec("Refuse the archive unless a key in FILE (allowed_signers or "
                    "authorized_keys style) signed it and nothing changed since.",
                    handled="ctrmig", metavar="FILE", not_for_migrate=True)
# Checkpoint images (ctrmig.images): where a checkpoint goes or comes from instead of a file.
IMAGE = Spec("The checkpoint as an OCI checkpoint image REF (podman's and CRI-O's format): "
             "host:port/repo:tag is pushed to (pulled from) that registry, insecure where "
             "containers' registries.conf says so, with its base image beside it; a name "
             "without a registry is podman's own image store. Whoever can pull it can read "
             "the container's memory.", handled="ctrmig", metavar="REF")
VIA = Spec("Move the checkpoint through this registry repository as a checkpoint image "
           "(REGISTRY/REPO, e.g. 127.0.0.1:5000/ckpt): the source pushes it, the target "
           "pulls it; the registry's readers can read the container's memory.",
           handled="ctrmig", metavar="REGISTRY/REPO")


@dataclass(frozen=True)
class CheckpointOptions:
    """What to checkpoint and how; engines refuse options they cannot honour."""

    leave_running: bool = field(default=False, metadata=_spec(Spec(
        "Keep the container running afterwards.", criu="--leave-running",
        podman="leaveRunning", handled="ctrmig", not_for_migrate=True)))
    tcp_established: bool = field(default=False, metadata=_spec(TCP_ESTABLISHED))
    file_locks: bool = field(default=False, metadata=_spec(FILE_LOCKS))
    keep: bool = field(default=False, metadata=_spec(KEEP))
    ignore_rootfs: bool = field(default=False, metadata=_spec(IGNORE_ROOTFS))
    ignore_volumes: bool = field(default=False, metadata=_spec(IGNORE_VOLUMES))
    pre_checkpoint: bool = field(default=False, metadata=_spec(Spec(
        "Pre-dump memory while the container runs (needs the kernel's memory tracking, "
        "CONFIG_MEM_SOFT_DIRTY).")))
    print_stats: bool = field(default=False, metadata=_spec(PRINT_STATS))
    #: None: carry the image when the target lacks it (migrate), never into a file.
    include_image: bool | None = field(default=None, metadata=_spec(Spec(
        "Carry the image in the archive, for a target without it [default: migrate "
        "carries it when the target lacks it; checkpoint to a file does not].",
        handled="ctrmig", flag="--include-image/--no-include-image")))
    compression: Compression = field(default="zstd", metadata=_spec(Spec(
        "Archive compression.", handled="ctrmig", flag="--compress")))
    encrypt_to: tuple[str, ...] = field(default=(), metadata=_spec(ENCRYPT_TO))
    sign: str | None = field(default=None, metadata=_spec(SIGN))

    def __post_init__(self) -> None:
        check_compression(self.compression)

    def set_options(self) -> set[str]:
        """Names of the boolean options switched on."""
        return _switched_on(self)


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore; ``name`` None restores under the archive's recorded name."""

    name: str | None = field(default=None, metadata=_spec(Spec(
        "Name of the restored container [default: the archive's].", handled="ctrmig",
        short="-n", metavar="NEW")))
    tcp_established: bool = field(default=False, metadata=_spec(TCP_ESTABLISHED))
    file_locks: bool = field(default=False, metadata=_spec(FILE_LOCKS))
    keep: bool = field(default=False, metadata=_spec(KEEP))
    ignore_rootfs: bool = field(default=False, metadata=_spec(Spec(
        "Do not apply the archive's rootfs changes.", podman="ignoreRootFS")))
    ignore_volumes: bool = field(default=False, metadata=_spec(Spec(
        "Do not restore the content of volumes.", podman="ignoreVolumes")))
    replace_volumes: bool = field(default=False, metadata=_spec(Spec(
        "Replace the content of an existing volume of the same name that differs from "
        "the archive's (else the restore refuses).")))
    print_stats: bool = field(default=False, metadata=_spec(PRINT_STATS))
    lazy_pages: bool = field(default=False, metadata=_spec(Spec(
        "Restore memory lazily, page by page on demand (needs userfaultfd). For migrate: "
        "post-copy, the target runs at once while its memory still sits on the source; "
        "if the link or the source breaks before the last page arrived, the target is "
        "killed (the source runs on, or, with the source host gone, the container is "
        "lost).")))
    # --- the direct route (ctrmig.direct): set by migrate, carried to a remote ctrmig ---
    page_images: str | None = field(default=None, metadata=_spec(Spec(
        "A directory of pages a page server received for this archive's dump (the direct "
        "route); checked against the archive's page_stream sha256 first.",
        metavar="DIR", not_for_migrate=True)))
    lazy_page_server: str | None = field(default=None, metadata=_spec(Spec(
        "With --lazy-pages: fetch pages from the page server at this loopback "
        "ADDRESS:PORT instead of the archive (post-copy).", metavar="ADDR:PORT",
        not_for_migrate=True)))
    allow_privileged: bool = field(default=False, metadata=_spec(Spec(
        "Allow an archive that asks for more than a default container has (privileges, "
        "host namespaces, devices; plain processes always do).", handled="ctrmig")))
    publish_ports: tuple[str, ...] = field(default=(), metadata=_spec(Spec(
        "Publish a port (podman syntax, e.g. 8080:80); repeatable.", podman="publishPorts",
        flag="--publish", short="-p", metavar="PORT")))
    identity: tuple[str, ...] = field(default=(), metadata=_spec(IDENTITY))
    trusted_keys: str | None = field(default=None, metadata=_spec(TRUSTED_KEYS))
    #: Called right before the target can finish the restore without the caller (the
    #: archive's last bytes leave for an engine that restores on its own, or the engine's
    #: final call is made), with the PIDs of local helper processes that may still carry
    #: it on (an ssh session). :func:`ctrmig.migrate` journals it for :func:`ctrmig.recover`.
    on_commit: Callable[[Sequence[int]], None] | None = field(
        default=None, metadata=_spec(Spec("", handled="ctrmig", internal=True)),
        compare=False, repr=False)
    #: Called once the target is ready to take the archive, by a target that says so
    #: (``signals_ready``: ctrmig over ssh, whose start costs ~0.5 s of Python);
    #: :func:`ctrmig.migrate` freezes the source only then.
    on_ready: Callable[[], None] | None = field(
        default=None, metadata=_spec(Spec("", handled="ctrmig", internal=True)),
        compare=False, repr=False)
    #: Called once a lazy-pages restore runs (CRIU resumed its tasks, their pages still
    #: coming): the end of :func:`ctrmig.migrate`'s downtime there. runc and process call
    #: it, and ctrmig over ssh (an older one does not).
    on_running: Callable[[], None] | None = field(
        default=None, metadata=_spec(Spec("", handled="ctrmig", internal=True)),
        compare=False, repr=False)

    def set_options(self) -> set[str]:
        """Names of the options switched on (publish_ports counts when given)."""
        names = _switched_on(self)
        if self.publish_ports:
            names.add("publish_ports")
        return names

    def commit(self, helpers: Sequence[int] = ()) -> None:
        """Report the point of no return to ``on_commit``, if anyone asked."""
        if self.on_commit is not None:
            self.on_commit(list(helpers))


Options = TypeVar("Options", CheckpointOptions, RestoreOptions)


def _switched_on(options: Any) -> set[str]:
    return {f.name for f in fields(options) if getattr(options, f.name) is True}


def specs(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Spec]]:
    """Each option field of ``cls`` with its :class:`Spec`."""
    for f in fields(cls):
        yield f, f.metadata["spec"]


def build(cls: type[Options], base: Options | None = None,
          overrides: Mapping[str, object] | None = None) -> Options:
    """``base`` (or the defaults) with ``overrides`` applied; unknown names and values of
    the wrong kind raise OptionError."""
    values: dict[str, Any] = dict(overrides or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise OptionError(f"unknown option(s): {', '.join(unknown)}",
                          hint=f"valid: {', '.join(sorted(known))}")
    for name in values.keys() & known.keys():
        if known[name].type == "tuple[str, ...]":
            values[name] = tuple(values[name] or ())
    for name, value in values.items():
        if known[name].type in ("bool", bool) and not isinstance(value, bool):
            raise OptionError(f"option {name} takes true or false, not {value!r}")
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)


def for_engine(options: CheckpointOptions | RestoreOptions) -> set[str]:
    """Names of the options switched on that the engine itself must honour."""
    handled_here = {f.name for f, spec in specs(type(options)) if spec.handled == "ctrmig"}
    return options.set_options() - handled_here


def cli_args(options: CheckpointOptions | RestoreOptions) -> list[str]:
    """The ``ctrmig checkpoint``/``restore`` flags that give ``options`` (non-defaults only):
    what the remote adapter passes to ctrmig on the other host."""
    args: list[str] = []
    for f, spec in specs(type(options)):
        value = getattr(options, f.name)
        if spec.internal or value == f.default:
            continue
        positive, _, negative = spec.cli_flag(f.name).partition("/")
        if isinstance(value, bool):
            if value:
                args.append(positive)
            elif negative:
                args.append(negative)
        elif isinstance(value, tuple):
            for item in value:
                args += [positive, str(item)]
        else:
            args += [positive, str(value)]
    return args


def criu_args(options: CheckpointOptions | RestoreOptions,
              only: frozenset[str] | None = None) -> list[str]:
    """CRIU/runc flags of the options switched on (``only``: of these names)."""
    return [spec.criu for f, spec in specs(type(options))
            if spec.criu and getattr(options, f.name) is True
            and (only is None or f.name in only)]


def podman_params(options: CheckpointOptions | RestoreOptions) -> dict[str, Any]:
    """podman's API parameters for ``options``."""
    params: dict[str, Any] = {}
    for f, spec in specs(type(options)):
        value = getattr(options, f.name)
        if spec.podman is None:
            continue
        if isinstance(value, tuple):
            if value:
                params[spec.podman] = list(value)
        else:
            params[spec.podman] = value
    return params
