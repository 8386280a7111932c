"""A migration's journal, and ``ctrmig recover``: finish or roll back what a killed ctrmig
left, so that the container runs exactly once.

:func:`ctrmig.migrate` writes a :class:`Journal` before the source can stop and removes it
when the migration ends either way; :func:`recover` reads those that are left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tenacity

from ctrmig import endpoints, images, locks, settings
from ctrmig.direct import route as direct_route
from ctrmig.engines.base import listing
from ctrmig.errors import BusyError, CtrmigError
from ctrmig.host import proc, scratch
from ctrmig.host.files import open_private, private_dir
from ctrmig.protocol import Migrator

log = logging.getLogger(__name__)


class Journal:
    """A migration's state on disk, so that a killed ctrmig can be recovered from.

    Written (atomically) before the source can stop, removed when the migration ended
    either way; ``ctrmig recover`` finishes or rolls back what a journal still describes.
    """

    def __init__(self, directory: Path, data: dict[str, Any]):
        private_dir(directory)
        self.path = directory / f"{data['container']}-{uuid.uuid4().hex[:8]}.json"
        self.data = {**data, **_process(os.getpid()), "started": time.time()}

    def committed(self, helpers: Sequence[int]) -> None:
        """The target may now finish on its own (see RestoreOptions.on_commit); ``helpers``
        are local processes (ssh) that may carry the restore on after ctrmig died."""
        self.phase("committed", helpers=[_process(pid) for pid in helpers])

    def phase(self, phase: str, **facts: Any) -> None:
        self.data.update(facts, phase=phase)
        tmp = self.path.with_suffix(".tmp")
        with open_private(tmp) as f:
            f.write(json.dumps(self.data).encode())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def connected(own: contextlib.ExitStack, endpoint: Migrator | str) -> Migrator:
    """``endpoint`` itself, or the engine a ``ENGINE[+ADDRESS]`` string names, connected
    (and closed with ``own``)."""
    if not isinstance(endpoint, str):
        return endpoint
    m = endpoints.connect(endpoint)
    own.callback(m.close)
    return m


def _process(pid: int) -> dict[str, Any]:
    """A process as a journal names it: PID and start time (PIDs get reused)."""
    return {"pid": pid, "start": proc.start_time(pid)}


def still_running(process: dict[str, Any]) -> bool:
    """Whether the process a journal names (``pid`` and ``start``) still runs."""
    return proc.running(int(process.get("pid", 0)), process.get("start"))


# States an engine reports while an operation is under way (runc's for a checkpoint or
# restore in progress, podman's and docker's transitions): not a state to decide on.
TRANSIENT_STATES = frozenset({"checkpointing", "restoring", "stopping", "removing"})
#: States of a container made but not started yet. podman 5.4 shows a container it is
#: importing as "created" until CRIU has restored it (4.3 showed nothing until running).
NOT_YET_STARTED = frozenset({"created", "configured", "initialized"})
SETTLE_TIMEOUT = 900.0  # as long as an engine call may take


def _state(m: Migrator, name: str) -> str | None:
    """The container's state on that engine (or the operation a live ctrmig is doing on
    it there), or None if it has none by that name."""
    for c in listing(m):
        if name in (c.name, c.id):
            return c.state.lower() or "unknown"
    return None


def _settled_state(m: Migrator, name: str) -> str | None:
    """The container's state once no operation is working on it any more.

    A killed ctrmig can leave its engine calls running (a ``runc checkpoint`` in its own
    session, a restore on the target host): deciding before they end could resume a
    container that is about to stop, or keep one about to be stopped.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    said = None
    while True:
        state = _state(m, name)
        if state not in TRANSIENT_STATES or time.monotonic() > deadline:
            return state
        if state != said:
            log.info("%s is %s on %s; waiting for that to end", name, state, m.engine)
            said = state
        time.sleep(0.5)


RESUME_PATIENCE = 120.0  # seconds recover() keeps trying to resume a stopped source
RESUME_WAIT = tenacity.wait_exponential(multiplier=0.5, max=5)


def _resume_when_ready(m: Migrator, container: str) -> None:
    """Resume a source that a killed migration stopped; retry while it is not ready.

    The engine may still be saving the checkpoint the killed ctrmig asked for: dockerd
    reports the container exited as soon as CRIU stopped it, and resuming before the
    checkpoint is saved fails ("descriptors.json: no such file or directory"). A resume
    that fails leaves the container stopped, so trying again is safe.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(RESUME_PATIENCE),
        wait=RESUME_WAIT,
        retry=tenacity.retry_if_exception_type(CtrmigError),
        before_sleep=lambda state: log.warning(
            "resuming %s failed (%s); its checkpoint may still be being saved, retrying",
            container, state.outcome.exception() if state.outcome else "?"),
        reraise=True,
    )
    retrying(m.resume, container)


def _wait_for_helpers(helpers: list[dict[str, Any]], container: str) -> None:
    """Wait (bounded) for the ssh sessions a killed ctrmig left carrying a restore."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    live = [str(h["pid"]) for h in helpers if still_running(h)]
    if live:
        log.info("%s: an ssh session (pid %s) still carries its restore; waiting for it",
                 container, ", ".join(live))
    while any(still_running(h) for h in helpers) and time.monotonic() < deadline:
        time.sleep(0.5)


def _appearing_state(m: Migrator, name: str, grace: float) -> str | None:
    """The target's settled state, watching up to ``grace`` seconds for it to appear and
    start."""
    deadline = time.monotonic() + grace
    log.info("%s: the target got the whole archive and may still be restoring it; "
             "watching for it up to %.0f s", name, grace)
    while ((state := _settled_state(m, name)) is None or state in NOT_YET_STARTED) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def recover(journal_dir: Path | None = None) -> list[str]:
    """Finish or roll back every migration whose ctrmig died; return what was done.

    A migration whose target container runs is finished (the source removed unless it was
    to be kept); otherwise any half-made target is removed and a stopped source resumed.
    So the container ends up running exactly once. Before deciding, recover() waits for
    whatever may still change the answer: a checkpoint or restore under way on either
    side, an ssh session still carrying the archive, a target engine still importing an
    archive it received whole. Last, it removes the scratch space of dead ctrmig processes.
    """
    directory = journal_dir or settings.current().journal_dir
    done: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            # Two recovers at once must not both act on one migration.
            with locks.container_lock("journal", path.stem, str(directory.absolute()),
                                      "recovering"):
                if path.exists():  # the other recover may have just finished it
                    done.append(_recover_one(path))
        except BusyError:
            done.append(f"{path.stem}: being recovered by another ctrmig")
    scratch.sweep()  # what ctrmig processes killed on the way left (spools, copies)
    return done


def _recover_one(path: Path) -> str:
    """Finish or roll back the migration the journal at ``path`` describes; say what."""
    data = json.loads(path.read_text())
    if data.get("pid") != os.getpid() and still_running(data):
        return f"{data['container']}: still being migrated by pid {data['pid']}"
    for side in (data["from"], data["to"]):  # allowed as the migration was
        endpoints.check_insecure(side, bool(data.get("insecure")))
    with contextlib.ExitStack() as own:
        return _recover_between(data, connected(own, data["from"]),
                                connected(own, data["to"]), path)
    raise AssertionError("unreachable")  # pragma: no cover


def _recover_between(data: dict[str, Any], src: Migrator, dst: Migrator, path: Path) -> str:
    container, target_name = data["container"], data["name"]
    committed = data.get("phase") == "committed"
    helpers = data.get("helpers") or []
    _wait_for_helpers(helpers, container)
    # The source first: a checkpoint still running there decides what the target gets.
    source_state = _settled_state(src, container)
    target_state = _settled_state(dst, target_name)
    if (target_state is None or target_state in NOT_YET_STARTED) and committed \
            and not helpers:
        # An API engine (podman) that got every byte goes on alone; over ssh, the
        # session ended above and the remote lock showed no restore: nothing can come.
        target_state = _appearing_state(dst, target_name, settings.current().recover_grace)
    if target_state != "running":
        source_state = _settled_state(src, container)
    if target_state == "running":
        if not data.get("keep_source"):
            if source_state is not None:
                src.remove(container)
            if data.get("volumes") and (remove := getattr(src, "remove_volumes", None)):
                remove(data["volumes"])  # docker: what went along with the archive
        said = f"{container}: finished; it runs on {data['to']} as {target_name}"
    elif source_state is None and target_state is None:
        said = f"{container}: found on neither host; nothing to recover"
    else:
        if target_state is not None:
            dst.remove(target_name)
        if source_state not in (None, "running"):
            _resume_when_ready(src, container)
        said = f"{container}: rolled back; it runs on {data['from']}"
    if data.get("pages_dir"):  # pre-copy pages the target received and no restore took
        direct_route.discard_pages(dst, str(data["pages_dir"]))
    if data.get("via"):  # the checkpoint image a --via migration pushed leaves the registry
        images.delete(images.Pushed(str(data["via"]), "", "", registry=True))
    path.unlink()
    return said
