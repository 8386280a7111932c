"""What restore refuses before CRIU runs: a changed or missing executable, a missing
file, a file whose size changed under a saved offset, a terminal with nothing to replace
it, and PIDs already taken (CRIU restores a plain process under its original PIDs)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from ctrmig.engines.process import inherit
from ctrmig.engines.process.tree import HASH_LIMIT, sha256
from ctrmig.errors import ImageNotFoundError, NameInUseError, RestoreError
from ctrmig.host import proc

#: How long restore waits for the PIDs of a stopped or dying process to be freed (the
#: source of a same-host migration is killed just after its archive is complete).
PID_GRACE = 5.0


def check_config(config: dict[str, Any], stdio: Mapping[int, inherit.Stdio]) -> None:
    """Refuse, before CRIU runs, what would make the restore fail or go wrong (all but
    taken PIDs: :func:`check_pids_free`)."""
    pid = int(config["pid"])
    _check_exe(config)
    cwd = config["cwd"]
    if not os.path.isdir(cwd):
        raise RestoreError(f"the working directory of PID {pid} is missing: {cwd}",
                           hint="create it on this host, then restore")
    for entry in config["files"]:
        _check_file(pid, entry)
    for entry in config["mapped"]:
        _check_file(pid, {**entry, "access": "r", "append": False}, what="mapped file")
    inherit.check_terminal(config, stdio)


def _check_exe(config: dict[str, Any]) -> None:
    exe = config["exe"]
    if not os.path.isfile(exe):
        raise ImageNotFoundError(
            f"the executable of PID {config['pid']} is missing on this host: {exe}",
            hint="install the same program at the same path, then restore",
        )
    digest = sha256(exe)
    if digest != config["exe_sha256"]:
        raise RestoreError(
            f"the executable {exe} differs from the checkpointed one "
            f"(sha256 {digest[:12]}... here, {config['exe_sha256'][:12]}... in the archive)",
            hint="restore needs the very same binary: install that version of the program",
        )


def _check_file(pid: int, entry: dict[str, Any], what: str = "file") -> None:
    path = entry["path"]
    if path.startswith("/proc/"):
        return  # e.g. its own /proc/PID/stat: there once it runs again (CRIU sees to it)
    if not os.path.isfile(path):
        hint = ("it was open for writing only: create it (e.g. touch it) to let the "
                "process write to a fresh file" if entry["access"] == "w"
                else "copy it to this host at the same path, then restore")
        raise RestoreError(f"a {what} PID {pid} held open is missing: {path}", hint=hint)
    size = os.stat(path).st_size
    if entry.get("sha256") and entry["access"] == "r" and size <= HASH_LIMIT:
        if sha256(path) != entry["sha256"]:
            raise RestoreError(f"the {what} {path} changed since the checkpoint",
                               hint="restore needs the same content it had then")
    elif entry.get("size") is not None and size != entry["size"] and entry["access"] != "w":
        raise RestoreError(
            f"the {what} {path} changed size since the checkpoint "
            f"({entry['size']} -> {size} bytes); CRIU resumes it at its saved offset",
            hint="restore needs the file as it was",
        )


def tree_pids(config: dict[str, Any]) -> list[int]:
    """Every PID and TID the tree in ``config`` had: CRIU restores each as it was."""
    tree = config["tree"]
    return [int(n) for n in [*tree["pids"], *tree["tids"]]]


def check_pids_free(wanted: list[int]) -> None:
    """NameInUseError if a PID in ``wanted`` is taken; a stopped or dead holder (a
    checkpointed source on its way out) is given :data:`PID_GRACE` seconds to go."""
    deadline = time.monotonic() + PID_GRACE
    while True:
        taken = {n: st for n in wanted if (st := proc.state(n)) is not None}
        # A stopped or dead holder may be a checkpointed source on its way out.
        if not taken or any(st not in "TtZX" for st in taken.values()):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for n, st in taken.items():
        state = {"Z": "a zombie not yet reaped by its parent", "T": "stopped",
                 "t": "stopped"}.get(st, "running")
        raise NameInUseError(
            f"PID {n}, which the checkpointed process needs, is taken ({state})",
            hint="a plain process is restored under its original PIDs: if the source "
                 "still runs, stop it first (or checkpoint without --leave-running); "
                 "else restore on another host",
        )
