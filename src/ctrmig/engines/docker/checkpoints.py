"""dockerd's checkpoints on disk, made and started around containerd's race (moby#42900).

dockerd checkpoints a container into ``<DockerRootDir>/containers/<id>/checkpoints/<name>/``
and starts a container from a checkpoint of that same directory; it offers no export and
refuses a custom checkpoint directory on start. ctrmig (root on the docker host) reads
and places these directories itself.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tenacity

from ctrmig.engines.docker.api import EngineAPI
from ctrmig.errors import CheckpointError, EngineError
from ctrmig.host import proc

log = logging.getLogger(__name__)

EXPERIMENTAL_HINT = ('enable "experimental": true in /etc/docker/daemon.json '
                     "(scripts/setup-host does) and restart dockerd")
# moby#42900: starting from a checkpoint right after one was made fails once or twice with
# "failed to upload checkpoint to containerd: commit failed: content sha256:...: already
# exists"; the same call a moment later succeeds. Matched by its words: no state check
# tells this failure from another.
START_RACE = re.compile(r"content sha256:[0-9a-f]+.*already exists")
NONCE_FILE = "ctrmig-restore.id"
#: The prefix of every checkpoint ctrmig makes (resume picks only these).
PREFIX = "ctrmig-"


def new_name() -> str:
    """A fresh checkpoint name."""
    return f"{PREFIX}{uuid.uuid4().hex[:12]}"


class Checkpoints:
    """The checkpoints of one dockerd: where they live, and making and starting them."""

    def __init__(self, api: EngineAPI, *, start_attempts: int = 8,
                 unique_uploads: bool = True):
        """``start_attempts`` bounds the retries of containerd's race (backoff 0.25 s
        doubling to 4 s); ``unique_uploads``: see :meth:`start`."""
        self.api = api
        self.start_attempts = start_attempts
        self.unique_uploads = unique_uploads

    # --- where they live ---------------------------------------------------------------------

    def data_root(self) -> Path:
        root = Path(str(self.api.info().get("DockerRootDir") or "/var/lib/docker"))
        if not (root / "containers").is_dir():
            raise EngineError(
                f"dockerd's data root {root} is not readable here",
                hint="run ctrmig as root on the docker host: checkpoints live in the data root",
            )
        return root

    def require_experimental(self) -> None:
        """dockerd's experimental features on (its /info says so), or say the fix."""
        if not self.api.info().get("ExperimentalBuild"):
            raise EngineError(
                "dockerd has experimental features off: it cannot checkpoint",
                hint=EXPERIMENTAL_HINT,
            )

    def require(self) -> None:
        """Experimental features on, CRIU installed, the data root local: or say the fix."""
        self.require_experimental()
        proc.which("criu")
        self.data_root()

    def path(self, cid: str, name: str) -> Path:
        """The directory of checkpoint ``name`` of container ``cid`` (it must exist)."""
        path = self.data_root() / "containers" / cid / "checkpoints" / name
        if not path.is_dir():
            raise CheckpointError(f"dockerd reported checkpoint {name} but {path} is missing")
        return path

    def kept(self, cid: str) -> list[str]:
        """The checkpoints ctrmig kept of ``cid``, newest first."""
        paths = (self.path(cid, n) for n in self.api.checkpoint_names(cid)
                 if n.startswith(PREFIX))
        return [p.name for p in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)]

    def place(self, cid: str, images: Path) -> tuple[str, Path]:
        """Move the CRIU images at ``images`` (ours, used once) into a new checkpoint of
        the container ``cid``: a rename on one filesystem. Returns its name and path."""
        name = new_name()
        target = self.data_root() / "containers" / cid / "checkpoints" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(images, target)
        return name, target

    def drop(self, cid: str, name: str) -> None:
        """Delete a checkpoint; a failure is only logged (it costs disk, nothing else)."""
        try:
            self.api.checkpoint_delete(cid, name)
        except EngineError as e:
            log.warning("could not delete docker checkpoint %s of %s: %s", name, cid[:12], e)

    # --- making and starting -----------------------------------------------------------------

    def create(self, cid: str, name: str, fields: Mapping[str, Any], *, label: str) -> None:
        """Checkpoint, dodging containerd's "content ... already exists" (moby#42900).

        A checkpoint writes the container's spec to containerd's content store; while the
        previous checkpoint's copy awaits garbage collection, the same blob fails the
        commit. Seen here: a stopping checkpoint right after another one failed 6 times
        in 12 and left the container stopped with no checkpoint, its state lost. Waiting
        for dockerd's own containerd content store to be empty (0.04-0.5 s) made it 0 in
        12. A container still running after the error is retried.
        """
        self.wait_for_content_gc()
        for attempt in range(1, self.start_attempts + 1):
            try:
                self.api.checkpoint_create(cid, name, fields)
                return
            except CheckpointError as e:
                if not is_start_race(e):
                    raise
                if not (self.api.inspect(cid).get("State") or {}).get("Running"):
                    raise CheckpointError(
                        f"docker container {label!r} stopped but dockerd kept no "
                        "checkpoint (containerd: content already exists, moby#42900)",
                        hint="its memory state is lost; start it afresh",
                        stderr=e.stderr,
                    ) from e
                if attempt == self.start_attempts:
                    raise
                log.warning("checkpoint hit containerd's race (moby#42900), attempt %d; "
                            "retrying", attempt)
                self.wait_for_content_gc()
                time.sleep(min(0.25 * 2 ** (attempt - 1), 4))

    def wait_for_content_gc(self, timeout: float = 60.0) -> None:
        """Wait until dockerd's private containerd holds no content blob (they are only
        checkpoint leftovers there). Unknown layouts (a system containerd): no wait."""
        blobs = (self.data_root() / "containerd" / "daemon" /
                 "io.containerd.content.v1.content" / "blobs" / "sha256")
        if not blobs.is_dir():
            log.debug("no private containerd content store at %s: not waiting", blobs)
            return
        start = time.monotonic()
        while any(blobs.iterdir()):
            if time.monotonic() - start > timeout:
                log.warning("containerd still holds content after %g s; checkpointing anyway",
                            timeout)
                return
            time.sleep(0.05)
        log.debug("waited %.2f s for containerd's garbage collection", time.monotonic() - start)

    def start(self, cid: str, name: str, path: Path | None = None) -> None:
        """Start ``cid`` from checkpoint ``name`` (at ``path``), retrying only moby#42900.

        dockerd uploads the checkpoint directory as a tar to containerd's content store;
        when a blob with the same digest is still there (containerd's own copy of a fresh
        checkpoint awaiting garbage collection, or a concurrent restore of the same
        archive) the upload fails with "already exists". A file unique to this start makes
        the digest unique: seen here, that removed the race (30 rounds, 12 concurrent
        restores, no retry). The bounded retry stays for daemons that behave otherwise.
        """
        if path is not None and self.unique_uploads:
            (path / NONCE_FILE).write_text(f"{cid} {name} {uuid.uuid4().hex}\n")
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.start_attempts),
            wait=tenacity.wait_exponential(multiplier=0.25, max=4),
            retry=tenacity.retry_if_exception(is_start_race),
            before_sleep=_log_race,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                self.api.start_from(cid, name)

    def resume(self, cid: str, name: str) -> None:
        """Start the stopped ``cid`` from its checkpoint ``name``, then drop that checkpoint.
        If the start fails, the checkpoint stays: it is the only copy of the state."""
        self.start(cid, name, self.path(cid, name))
        self.drop(cid, name)


def is_start_race(exc: BaseException) -> bool:
    return isinstance(exc, EngineError) and bool(START_RACE.search(exc.stderr or str(exc)))


def _log_race(state: tenacity.RetryCallState) -> None:
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("start from checkpoint hit containerd's race (moby#42900), attempt %d; "
                "retrying in %.2f s", state.attempt_number, wait)
