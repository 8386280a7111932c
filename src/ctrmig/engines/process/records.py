"""The process engine's state dir, and the ``config.dump`` it reads back.

``PID.json``: a record of a process this engine restored (for ``list()`` and ``logs()``),
valid while that very process (same PID and start time) runs. ``PID.log``: the output of
one whose stdout/stderr had to be replaced. ``checkpoints/PID/``: the images and
``config.dump`` of a checkpoint kept for ``resume()``. ``checkpoints/.PID-*/``: a dump
under way, its ``owner.json`` naming the ctrmig making it and the tree it stops; one whose
ctrmig was killed is an :class:`Orphan` (``ctrmig recover`` resumes its tree).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctrmig.archive.layout import CHECKPOINT_DIR, CONFIG_DUMP
from ctrmig.engines.process.tree import CONFIG_VERSION, alive
from ctrmig.errors import ArchiveError
from ctrmig.host import proc
from ctrmig.host.files import private_dir, write_private

log = logging.getLogger(__name__)

OWNER = "owner.json"


@dataclass(frozen=True)
class Orphan:
    """A dump whose ctrmig died before the migration ended, and the tree it dumped:
    "checkpointing" (a CRIU still holds it), "stopped" (left stopped by CRIU, its memory
    whole there) or "running" (its CRIU let go of it)."""

    path: Path
    pid: int
    pids: list[int]
    state: str


def read_config(source: Path) -> dict[str, Any]:
    """The ``config.dump`` in ``source`` (an extracted archive or a kept checkpoint)."""
    try:
        config: dict[str, Any] = json.loads((source / CONFIG_DUMP).read_text())
    except FileNotFoundError:
        raise ArchiveError(f"the archive has no {CONFIG_DUMP}",
                           hint="it was not written by the process engine") from None
    except ValueError as e:
        raise ArchiveError(f"{CONFIG_DUMP} is not valid JSON: {e}") from None
    if config.get("version") != CONFIG_VERSION:
        raise ArchiveError(f"unsupported {CONFIG_DUMP} version {config.get('version')!r}",
                           hint="upgrade ctrmig")
    return config


class StateDir:
    """Records of restored processes, their logs, and kept checkpoints, under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.kept_dir = root / "checkpoints"

    # --- kept checkpoints ------------------------------------------------------------------

    def kept(self, pid: int) -> Path:
        """Where the checkpoint of ``pid`` is kept (it may not be)."""
        return self.kept_dir / str(pid)

    def has_kept(self, pid: int) -> bool:
        return (self.kept(pid) / CHECKPOINT_DIR / "inventory.img").is_file()

    def kept_configs(self) -> Iterator[dict[str, Any]]:
        """The config of every kept checkpoint (unreadable ones left out)."""
        for path in self.kept_dir.glob("*/" + CONFIG_DUMP):
            if path.parent.name.startswith("."):  # a dump under way, not kept
                continue
            try:
                yield read_config(path.parent)
            except ArchiveError:
                continue

    def new_dump(self, pid: int, tree: Sequence[int]) -> Path:
        """A fresh private directory for a dump of ``pid`` (with its images directory):
        on the same filesystem as the kept ones, so that keeping it is a rename. It names
        this ctrmig and the ``tree`` its dump stops, for :meth:`orphans`."""
        private_dir(self.kept_dir)
        dump = Path(tempfile.mkdtemp(prefix=f".{pid}-", dir=self.kept_dir))  # made 0700
        (dump / CHECKPOINT_DIR).mkdir(0o700)
        write_private(dump / OWNER, json.dumps({
            "owner": os.getpid(), "owner_start": proc.start_time(os.getpid()),
            "pid": pid, "start": proc.start_time(pid), "tree": list(tree)}))
        return dump

    def _dumps(self, pid: int | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """The dumps under way (of ``pid``, or all) and their ``owner.json``; one being
        written, or not made by :meth:`new_dump`, is left out."""
        for path in self.kept_dir.glob(f".{'*' if pid is None else pid}-*/{OWNER}"):
            try:
                data = json.loads(path.read_text())
                yield path.parent, {"owner": int(data["owner"]), "pid": int(data["pid"]),
                                    "tree": [int(p) for p in data["tree"]],
                                    "owner_start": data["owner_start"],
                                    "start": data["start"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def orphans(self, pid: int | None = None) -> list[Orphan]:
        """The dumps (of ``pid``, or all) whose ctrmig is gone, with the state of the tree
        they dumped; a dump whose tree no longer needs it (gone, or running on) is
        removed."""
        found: list[Orphan] = []
        for path, data in self._dumps(pid):
            if proc.running(data["owner"], data["owner_start"]):
                continue
            same = proc.running(data["pid"], data["start"])
            state = {"t": "checkpointing", "T": "stopped"}.get(proc.state(data["pid"]) or "")
            if same and state:  # t: in a ptrace stop, T: in a signal stop (proc(5))
                found.append(Orphan(path, data["pid"], data["tree"], state))
                continue
            shutil.rmtree(path, ignore_errors=True)
            if same:
                found.append(Orphan(path, data["pid"], data["tree"], "running"))
        return found

    def drop_dumps(self, pid: int) -> None:
        """Remove this ctrmig's dumps of ``pid`` (what :meth:`new_dump` made)."""
        for path, data in self._dumps(pid):
            if data["owner"] == os.getpid():
                shutil.rmtree(path, ignore_errors=True)

    def keep(self, dump: Path, pid: int) -> None:
        """Keep the images in ``dump`` (from :meth:`new_dump`) as the checkpoint of ``pid``."""
        kept = self.kept(pid)
        shutil.rmtree(kept, ignore_errors=True)
        dump.rename(kept)

    def drop_kept(self, pid: int) -> None:
        shutil.rmtree(self.kept(pid), ignore_errors=True)

    # --- restored processes ----------------------------------------------------------------

    def log_file(self, pid: int) -> str:
        """The log that takes the stdout/stderr of restored ``pid`` (its directory made)."""
        private_dir(self.root)
        return str(self.root / f"{pid}.log")

    def record(self, pid: int) -> dict[str, Any] | None:
        """The restore record of ``pid`` if that process still runs, else None."""
        return self._live(self.root / f"{pid}.json")

    def records(self) -> Iterator[dict[str, Any]]:
        """The restore records whose processes still run."""
        for path in self.root.glob("*.json"):
            data = self._live(path)
            if data is not None:
                yield data

    def forget(self, pid: int) -> None:
        (self.root / f"{pid}.json").unlink(missing_ok=True)

    def write_record(self, pid: int, config: dict[str, Any], logfile: str | None) -> None:
        """Remember a restored process for list() and logs()."""
        try:
            private_dir(self.root)
            record = {"pid": pid, "start_time": proc.start_time(pid), "exe": config["exe"],
                      "argv": config["argv"], "log": logfile, "restored": time.time()}
            path = self.root / f"{pid}.json"
            write_private(path.with_suffix(".tmp"), json.dumps(record))
            path.with_suffix(".tmp").replace(path)
        except OSError as e:  # the process runs; a missing record only hides it from list()
            log.warning("cannot record restored PID %d in %s: %s", pid, self.root, e)

    @staticmethod
    def _live(path: Path) -> dict[str, Any] | None:
        """A restore record whose process still runs (same PID and start time), or None."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not alive(pid) or proc.start_time(pid) != data.get("start_time"):
            return None
        return data
