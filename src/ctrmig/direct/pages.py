"""The pages of a direct migration: where the source's dump sends them, what the target
receives, and the check that a restore uses exactly the bytes the source sent.

Pre-copy: the source's CRIU sends its pages to a loopback relay (:class:`PageSink` tells
the engine where); ctrmig pumps them over the link into ``criu page-server`` on the
target (:class:`Receiver`), hashing on both ends. The source's figure travels in the
archive of the non-page images (manifest ``extra["page_stream"]``); the target's is
written beside the pages (``received.json``); :func:`merge` compares the two before any
page joins the restore's images.

Post-copy: the source's CRIU serves its pages on a loopback port (``sink.port``) and
``criu lazy-pages`` on the target fetches them through :func:`lazy_relay`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrmig.direct.prefetch import Broken, Prefetcher, read_preamble
from ctrmig.direct.relay import End, Relay, SocketEnd, Tally, listener
from ctrmig.errors import ChecksumError, RestoreError
from ctrmig.host import criu, proc, scratch

log = logging.getLogger(__name__)

RECEIVED = "received.json"
PAGE_SERVER_LOG = "page-server.log"
#: The archive's manifest extra key: what the source's relay sent.
PAGE_STREAM = "page_stream"
#: Seconds without a byte after which a link carrying pages counts as broken. Pre-copy:
#: CRIU writes its pages in one go (a pause is the dump's other work, short); post-copy:
#: lazy-pages fetches without pause until the last page.
RECEIVE_IDLE = 120.0
LAZY_IDLE = 10.0
WAIT_RECEIVED = 60.0  # a restore waits this long for the receiver to write its record


@dataclass
class PageSink:
    """Where an engine's dump sends its pages (the direct route sets it; see
    ``sending_pages`` on the runc and process migrators).

    Pre-copy (``lazy`` False): a relay listens on loopback ``port``; the dump sends there
    (``--page-server``), and afterwards ``sent()`` gives the stream's size and sha256 for
    the archive. Post-copy: the dump itself serves its pages on loopback ``port``
    (``--lazy-pages``). ``marks`` records when the source froze and its dump ended.
    """

    port: int
    lazy: bool = False
    sent: Callable[[], dict[str, Any]] = dict
    marks: dict[str, float] = field(default_factory=dict)
    #: Post-copy: the dump serving the pages (the engine sets it once it is ready), and
    #: the images it wrote (their pagemaps say which pages it serves).
    serving: subprocess.Popen[bytes] | None = None
    images: Path | None = None
    #: Post-copy, set at the dump's commit: waits for the dump to end (CheckpointError
    #: if it failed) and drops what it left.
    served: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic()


class SendsPages:
    """A migrator whose dumps can send their pages to a :class:`PageSink` (mixed into the
    runc and process migrators; the direct route checks for ``sending_pages``)."""

    #: Where the next dump sends its pages; set by :meth:`sending_pages` only.
    page_sink: PageSink | None = None

    @contextlib.contextmanager
    def sending_pages(self, sink: PageSink) -> Iterator[None]:
        """Checkpoints in the block send their pages to ``sink``: the archive then holds
        every image but the pages."""
        self.page_sink = sink
        try:
            yield
        finally:
            self.page_sink = None


class Receiver:
    """``criu page-server`` on this host, fed from ``wire``: a pre-copy dump's pages land
    in ``directory``. The page server gets one end of a socket pair (``--ps-socket``): it
    listens on no port at all."""

    def __init__(self, directory: Path, wire: End, *, idle: float = RECEIVE_IDLE):
        self.directory = directory
        ours, theirs = socket.socketpair()
        try:
            self.daemon = proc.spawn(
                ["criu", "page-server", "--images-dir", str(directory),
                 "--ps-socket", str(theirs.fileno()), "--log-file", PAGE_SERVER_LOG,
                 criu.log_flag()],
                pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.relay = Relay(wire, SocketEnd(ours), name="ctrmig-pages-in", idle=idle).start()

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the stream's end and the page server's exit; record what arrived in
        ``received.json`` (and return it)."""
        self.relay.wait()
        try:
            code = self.daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill_group(self.daemon)
            code = -1
        record: dict[str, Any] = {**self.relay.forward.as_dict(), "exit": code,
                                  "error": self.relay.error}
        if code != 0 and not record["error"]:
            text = _read(self.directory / PAGE_SERVER_LOG)
            record["error"] = f"criu page-server failed (exit {code}): {proc.tail(text, 3)}"
        if record["error"]:  # no restore will use these pages: nothing to leave behind
            shutil.rmtree(self.directory, ignore_errors=True)
            return record
        tmp = self.directory / (RECEIVED + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.directory / RECEIVED)
        return record


def lazy_relay(wire: End, announce: Callable[[int], None], *, timeout: float,
               idle: float = LAZY_IDLE) -> Tally:
    """Listen on loopback, ``announce`` the port, and relay the one connection
    ``criu lazy-pages`` makes there to ``wire`` (toward the source's page server)."""
    sock = listener()
    announce(int(sock.getsockname()[1]))
    try:
        ranges = read_preamble(wire, timeout)  # sent once the source's dump serves
        relay = Prefetcher(wire, idle=idle, ranges=ranges)
        # A wire that ends now (a migration killed before the restore) ends the wait.
        relay.connected(sock, timeout)
    except (TimeoutError, OSError, Broken) as e:
        sock.close()
        wire.close()
        return Tally(error=f"criu lazy-pages never connected: {e}")
    tally = relay.run()
    log.debug("post-copy: %d pages fetched ahead of %d announced; %d of the target's "
              "requests answered from them", relay.fetched_ahead,
              sum(n for _, _, n in ranges), relay.answered_here)
    return tally


def new_directory(parent: Path | None = None) -> Path:
    """A private directory for a receiver's pages: in ``parent``, else in TMPDIR itself,
    not in the receiver's scratch (host.scratch), since the directory outlives the
    receiver (``ctrmig _pages receive``): the restore merges it, or recover discards it."""
    return Path(tempfile.mkdtemp(prefix="ctrmig-pages-", dir=parent or scratch.base()))


def merge(directory: Path, sent: object, images: Path) -> None:
    """Move the pages a receiver wrote into ``directory`` into the restore's ``images``,
    after checking them against what the source's relay ``sent`` (the archive's
    ``page_stream``); the directory is removed either way."""
    try:
        _check(directory, sent)
        for path in sorted(directory.iterdir()):
            if path.name.startswith(("pagemap-", "pages-")) and path.name.endswith(".img"):
                if (images / path.name).exists():
                    raise RestoreError(f"{path.name} came both in the archive and from the "
                                       "page server")
                shutil.move(str(path), images / path.name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check(directory: Path, sent: object) -> None:
    if not isinstance(sent, dict) or not isinstance(sent.get("sha256"), str):
        raise ChecksumError("the archive does not say which pages its dump sent "
                            f"(no {PAGE_STREAM}): it was not made by the direct route")
    record_path = directory / RECEIVED
    deadline = time.monotonic() + WAIT_RECEIVED
    while not record_path.is_file():
        if not directory.is_dir():
            raise RestoreError(f"no pages were received into {directory}")
        if time.monotonic() > deadline:
            raise RestoreError(f"the page server's stream into {directory} did not end")
        time.sleep(0.02)
    got = json.loads(record_path.read_text())
    if got.get("error"):
        raise RestoreError(f"receiving the pages failed: {got['error']}")
    if (got.get("sha256"), got.get("bytes")) != (sent["sha256"], sent.get("bytes")):
        raise ChecksumError(
            f"the pages received ({got.get('bytes')} bytes, sha256 "
            f"{str(got.get('sha256'))[:12]}) are not what the source sent "
            f"({sent.get('bytes')} bytes, sha256 {str(sent['sha256'])[:12]})",
            hint="the link corrupted or cut the page stream; nothing was restored")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def summary_line(data: dict[str, Any]) -> str:
    """The last stderr line of a remote page helper: what passed through it."""
    return SUMMARY + json.dumps(data)


SUMMARY = "ctrmig-pages: "


def parse_summary(stderr: str) -> dict[str, Any] | None:
    for line in reversed(stderr.splitlines()):
        if line.startswith(SUMMARY):
            try:
                data = json.loads(line[len(SUMMARY):])
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


def remove_directory(directory: str) -> None:
    """Drop a receiver's directory a failed migration left (only ours: by its prefix)."""
    path = Path(directory)
    if path.name.startswith("ctrmig-pages-") and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)

