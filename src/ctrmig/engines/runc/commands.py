"""runc's command lines in one place, and the words of its failures.

Every runc call goes through :class:`Runc` (``runc --root ROOT ...``); ctrmig's options
become runc/CRIU flags in :func:`criu_option_args` alone (the one function the option
table will replace).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from ctrmig.engines.runc.state import read_text
from ctrmig.errors import CtrmigError
from ctrmig.host import criu, proc
from ctrmig.host.files import private_dir
from ctrmig.protocol import CheckpointOptions, RestoreOptions

TOOL_TIMEOUT = 120.0
#: The CRIU logs a runc checkpoint/restore leaves in its work dir.
CRIU_LOGS = ("restore.log", "dump.log", "lazy-pages.log")


def criu_option_args(opts: CheckpointOptions | RestoreOptions) -> list[str]:
    """The ``runc checkpoint``/``runc restore`` flags of ctrmig's options."""
    flags = []
    if isinstance(opts, CheckpointOptions) and opts.leave_running:
        flags.append("--leave-running")
    if opts.tcp_established:
        flags.append("--tcp-established")
    if opts.file_locks:
        flags.append("--file-locks")
    if isinstance(opts, RestoreOptions) and opts.lazy_pages:
        flags.append("--lazy-pages")
    return flags


class Runc:
    """runc on one ``--root``: the argv of each call, and runc's view of its containers."""

    def __init__(self, root: Path):
        self.root = root

    def argv(self, *args: str) -> list[str]:
        """``runc --root ROOT ARGS``."""
        return ["runc", "--root", str(self.root), *args]

    def checkpoint_argv(self, name: str, images: Path, work: Path, opts: CheckpointOptions,
                        *, page_server: str | None = None, lazy: bool = False,
                        leave_running: bool = False) -> list[str]:
        """``page_server`` ADDR:PORT: the pages go there (pre-copy), or with ``lazy`` the
        dump serves them there until the last one was fetched (post-copy)."""
        flags = criu_option_args(opts)
        if leave_running and "--leave-running" not in flags:
            flags.append("--leave-running")
        if page_server is not None:
            flags += ["--page-server", page_server]
        if lazy:
            flags.append("--lazy-pages")
        return [*self.argv("checkpoint", "--image-path", str(images), "--work-path", str(work)),
                *flags, name]

    @staticmethod
    def run_args(name: str, bundle: Path) -> list[str]:
        """The arguments (after runc's global flags) that start a container detached."""
        return ["run", "--detach", "--bundle", str(bundle), name]

    @staticmethod
    def restore_args(name: str, images: Path, work: Path, bundle: Path,
                     opts: RestoreOptions | None = None) -> list[str]:
        """The arguments (after runc's global flags) that restore a container detached."""
        return ["restore", "--detach", "--image-path", str(images), "--work-path", str(work),
                "--bundle", str(bundle), *(criu_option_args(opts) if opts else []), name]

    @staticmethod
    def version() -> str:
        text = proc.output(["runc", "--version"], timeout=TOOL_TIMEOUT)
        return text.splitlines()[0] if text else ""

    def knows(self, name: str) -> bool:
        """Whether runc has a container ``name`` (its state file: what ``runc state``
        reads, without its 6-14 ms of process start, which a restore paid in downtime)."""
        return (self.root / name / "state.json").exists()

    def state(self, name: str) -> dict[str, Any] | None:
        """``runc state NAME``, or None if runc has no such container."""
        res = proc.run(self.argv("state", name), timeout=TOOL_TIMEOUT, check=False)
        if res.returncode != 0:
            return None
        data = json.loads(res.stdout or b"null")
        return data if isinstance(data, dict) else None

    def containers(self) -> list[dict[str, Any]]:
        """``runc list``: one dict (id, status, ...) per container runc knows."""
        text = proc.output(self.argv("list", "--format", "json"), timeout=TOOL_TIMEOUT)
        data = json.loads(text or "null")
        return data if isinstance(data, list) else []

    def delete(self, name: str) -> None:
        """``runc delete --force NAME``, best effort."""
        with contextlib.suppress(CtrmigError):
            proc.run(self.argv("delete", "--force", name), timeout=TOOL_TIMEOUT, check=False)

    def in_flight(self) -> dict[str, str]:
        """Containers that a ``runc checkpoint``/``runc restore`` on our root is working
        on now -> "checkpointing"/"restoring". It may be the orphan of a killed ctrmig:
        ``ctrmig recover`` waits for it instead of deciding on a state about to change."""
        root = str(self.root).encode()
        verbs = {b"checkpoint": "checkpointing", b"restore": "restoring"}
        found: dict[str, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if (len(argv) < 4 or os.path.basename(argv[0]) != b"runc"
                    or argv[1:3] != [b"--root", root]):
                continue
            verb = next((verbs[a] for a in argv[3:] if a in verbs), None)
            if verb:
                found[argv[-1].decode(errors="replace")] = verb
        return found


# --- the words of a failure --------------------------------------------------------------


def criu_tail(text: str) -> str:
    """CRIU's error lines (the last 10), without the harmless rlimit line."""
    return proc.tail("\n".join(criu.error_lines(text)) or text, 10)


def summary(text: str) -> str:
    """One line for an error message: CRIU's first real error, else runc's last message."""
    first = criu.first_error(text)
    if first:
        return first
    msgs = re.findall(r'msg="((?:[^"\\]|\\.)*)"', text)
    if msgs:
        return str(msgs[-1]).split("\\n")[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def with_criu_logs(text: str, work: Path | None) -> str:
    """``text`` followed by the error lines of each CRIU log in ``work``."""
    if work is not None:
        for name in CRIU_LOGS:
            criu_log = read_text(work / name)
            if criu_log:
                text += f"\n--- CRIU {name} ---\n" + criu_tail(criu_log)
    return text


def failure_text(runc_log: Path, work: Path | None) -> str:
    """What a failed ``runc run/restore`` said: runc's log tail and CRIU's errors."""
    return with_criu_logs(proc.tail(read_text(runc_log), 10), work)


def keep_logs(logs_dir: Path, name: str, work: Path | None) -> Path | None:
    """Copy the logs of a failed runc/CRIU run out of its work dir, which goes away."""
    if work is None:
        return None
    logs = sorted(work.glob("*.log"))
    if not logs:
        return None
    dest = logs_dir / "failed" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    private_dir(dest)
    for f in logs:
        shutil.copy2(f, dest / f.name)
    return dest
