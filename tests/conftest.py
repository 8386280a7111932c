"""Shared fixtures: real engine services started per test session, and test images.

Fixtures never skip: if an engine or tool is missing, the test errors, so a green run
proves the engines really ran (set CTRMIG_ALLOW_SKIP=1 to skip instead, locally).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import shutil
import signal
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from podman import PodmanClient

import ctrmig
from ctrmig import locks
from ctrmig.direct import pages
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import images, mounts, proc, services
from tests.registry import registry, registry_service  # noqa: F401  (fixtures)

# A workload that keeps state in memory (the shell's counter) and in its filesystem (a
# file written after start): what every engine's checkpoint/restore test checks.
COUNTER_CMD = [
    "/bin/sh",
    "-c",
    # As PID 1 the shell ignores an untrapped SIGTERM: podman's rm -f would wait 10 s.
    "trap 'exit 0' TERM; echo written-after-start > /state.txt; i=0; "
    "while true; do i=$((i+1)); echo count=$i; sleep 0.1; done",
]

_FIXTURE_MARKERS = {
    "podman_socket": "podman",
    "dockerd_socket": "docker",
    "runc_state": "runc",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the engines its fixtures start (python-on-whales style)."""
    for item in items:
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        msg = f"{tool} is not installed: run scripts/setup-host"
        if os.environ.get("CTRMIG_ALLOW_SKIP") == "1":
            pytest.skip(msg)
        raise RuntimeError(msg)


def unique(prefix: str = "ctrmig-t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def last_count(text: str) -> int:
    """The last ``count=N`` the counter workload printed (0 if none)."""
    counts = re.findall(r"count=(\d+)", text)
    return int(counts[-1]) if counts else 0


def first_count(text: str) -> int:
    counts = re.findall(r"count=(\d+)", text)
    return int(counts[0]) if counts else 0


def resumed_count(logs: Callable[[], str], what: str = "the restored counter") -> int:
    """The first count a restored counter printed, once it printed one.

    A restored container's log can still be empty when restore returns (docker starts
    a fresh log for it), so reading it at once races the workload's next line.
    """
    wait_for(lambda: first_count(logs()) > 0, what=f"{what} to print")
    return first_count(logs())


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ctrmig-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def test_image(session_dir: Path) -> str:
    """The busybox test image, in podman's default storage (built offline once)."""
    need("podman")
    return images.ensure_test_image(session_dir)


@pytest.fixture(scope="session")
def podman_socket(session_dir: Path) -> Iterator[Path]:
    """A podman API service of our own on a private socket (default storage)."""
    need("podman")
    svc = services.podman_service(session_dir / "podman.sock", state_dir=session_dir)
    svc.start()
    yield svc.socket
    svc.stop()


@pytest.fixture(scope="session")
def dockerd_socket(test_image: str, session_dir: Path) -> Iterator[Path]:
    """A private dockerd (own data root, socket and network namespace, no bridge) holding
    the test image."""
    need("dockerd")
    sock = session_dir / "dockerd.sock"
    data_root = session_dir / "docker-data"
    svc = services.dockerd_service(
        sock, data_root=data_root, exec_root=session_dir / "docker-exec",
        state_dir=session_dir, bridge="none",
    )
    svc.start()
    try:
        archive = images.podman_save(test_image, session_dir / "test-image.tar")
        client = docker.DockerClient(base_url=f"unix://{sock}", timeout=300)
        with archive.open("rb") as f:
            client.images.load(f)
        client.close()
        yield sock
    finally:
        svc.stop()  # the session dir, data root included, is removed after this


@pytest.fixture
def podman_counter(podman_socket: Path, test_image: str) -> Iterator[Callable[[], str]]:
    """Start counter containers in podman; remove every container the test named."""
    client = PodmanClient(base_url=f"unix://{podman_socket}")
    names: list[str] = []

    def start() -> str:
        name = unique()
        names.append(name)
        client.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
        m = ctrmig.migrator("podman", url=f"unix://{podman_socket}")
        wait_for(lambda: last_count(m.logs(name)) >= 5, what=f"{name} counting")
        m.close()
        return name

    yield start
    for c in client.containers.list(all=True):
        if any(c.name.startswith(n) for n in names):
            c.remove(force=True)
    client.close()


def podman_read_file(client: PodmanClient, container: str, path: str) -> str:
    """A file's content inside a podman container, through the archive endpoint.

    Not exec: podman 4.3 leaves an exec session's conmon processes running after the
    container is gone.
    """
    stream, _ = client.containers.get(container).get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None
        return member.read().decode()


# --- runc: a private state dir per test ------------------------------------------------


def processes_naming(marker: str) -> list[int]:
    """PIDs (not ours) whose command line mentions ``marker``, e.g. a state dir; only in
    our PID namespace: scripts/test-debian's suite, run beside this one, names the very
    same /tmp/pytest-of-root/... paths in its own root (it made the soak test count 3)."""
    pids = []
    ours = os.readlink("/proc/self/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if marker.encode() not in cmdline or os.readlink(entry / "ns" / "pid") != ours:
                continue
        except OSError:
            continue
        pids.append(int(entry.name))
    return pids


def cleanup_runc_state(m: RuncMigrator) -> list[str]:
    """Remove everything ``m`` made, and the lock files a killed ctrmig may have left;
    return what had leaked past remove() (and was then cleared)."""
    for c in m.list():
        m.remove(c.name)
        locks.lock_path("runc", c.name, m.lock_scope).unlink(missing_ok=True)
    leaks = []
    for name in (e["id"] for e in m.runc.containers()):
        leaks.append(f"runc container {name}")
        proc.run(m.runc.argv("delete", "--force", name), timeout=60, check=False)
    for pid in processes_naming(str(m.state_dir)):
        leaks.append(f"process {pid}")
        os.kill(pid, signal.SIGKILL)
    for mp in mounts.mounts_under(m.state_dir):  # deepest first
        leaks.append(f"mount {mp}")
        proc.run(["umount", "-l", str(mp)], timeout=60, check=False)
    shutil.rmtree(m.state_dir, ignore_errors=True)
    return leaks


@pytest.fixture
def runc_state(tmp_path: Path) -> Iterator[RuncMigrator]:
    """A RuncMigrator on a private state dir; teardown removes all it made, checks leaks."""
    for tool in ("runc", "criu", "skopeo", "umoci"):
        need(tool)
    m = RuncMigrator(state_dir=tmp_path / "state", workdir=tmp_path)
    yield m
    leaks = cleanup_runc_state(m)
    assert not leaks, f"left behind after remove(): {leaks}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ctrmig-")], \
        "temporary files left in the workdir"


# --- host footprint (issue #16): the suite leaves the host's network as it found it -----
# The session moves into a network namespace of its own before its first test, so that
# whatever the engines do to networking lands there and dies with the session: a dockerd
# without a bridge deletes docker0, CNI and netavark add bridges, veths and nft tables
# (trixie's `table inet netavark` stays after its last container), and set ip_forward,
# whichever process triggers them (our services, the podman CLI, CNI plugins). The host's
# own namespace is snapshotted before the move and compared after the last teardown.

CLONE_NEWNET = 0x40000000


def _net_footprint(netns: str) -> set[str]:
    """Links, addresses, routes and nft tables of the namespace at ``netns``, as lines.

    Ignored as transient, nothing else: counters, carrier, operstate, MTU and a bridge's
    MAC (they follow the bridge's ports), address lifetimes and route expiry, and the host
    end of a veth whose peer lives in another namespace: it exists exactly as long as that
    namespace's container or test host, and the machine's own engines and other test runs
    on it start and stop those while we run.
    """

    def dump(*argv: str) -> Any:
        out = proc.output(["nsenter", f"--net={netns}", *argv], timeout=30)
        return json.loads(out) if out.strip() else []

    links = dump("ip", "-j", "-d", "link", "show")
    kind = {ln["ifname"]: ln.get("linkinfo", {}).get("info_kind", "") for ln in links}
    transient = {ln["ifname"] for ln in links
                 if kind[ln["ifname"]] == "veth" and "link_netnsid" in ln}
    lines = {f"link {ln['ifname']} kind={kind[ln['ifname']]} master={ln.get('master', '-')} "
             f"{'up' if 'UP' in ln.get('flags', []) else 'down'}"
             for ln in links if ln["ifname"] not in transient}
    lines |= {f"addr {a['ifname']} {i.get('local')}/{i.get('prefixlen')}"
              for a in dump("ip", "-j", "addr", "show") if a["ifname"] not in transient
              for i in a.get("addr_info", [])}
    lines |= {"route " + " ".join(f"{k}={r.get(k, '-')}" for k in
                                  ("dst", "gateway", "dev", "protocol", "scope", "metric"))
              for family in ("-4", "-6") for r in dump("ip", "-j", family, "route", "show")
              if r.get("dev") not in transient}
    if shutil.which("nft"):
        lines |= {f"nft table {t['table']['family']} {t['table']['name']}"
                  for t in (dump("nft", "-j", "list", "tables") or {}).get("nftables", [])
                  if "table" in t}
    return lines


@pytest.fixture(scope="session", autouse=True)
def host_network_untouched() -> Iterator[None]:
    """Run the session in its own network namespace; fail it if the host's changed."""
    if os.geteuid() != 0:  # unprivileged: unit tests only, nothing touches the network
        yield
        return
    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    host = f"/proc/{os.getpid()}/fd/{host_fd}"
    before = _net_footprint(host)
    # unshare() moves the calling thread only: pytest has no other thread yet.
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    proc.run(["ip", "link", "set", "lo", "up"], timeout=30)
    yield
    after = _net_footprint(host)
    os.close(host_fd)
    changed = [f"+ {line}" for line in sorted(after - before)]
    changed += [f"- {line}" for line in sorted(before - after)]
    assert not changed, "the host's network changed during the session:\n" + "\n".join(changed)


# --- temporary files: ctrmig processes the tests start leave none behind -----------------


#: A leftover of the session's TMPDIR -> the test after which it was first seen.
FIRST_SEEN_AFTER: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _note_temporary_files(request: pytest.FixtureRequest,
                          no_temporary_files_left: None) -> Iterator[None]:
    """Which test each of ctrmig's temporary files appeared after, for the session's
    error (one CI run left a pre-copy receiver's pages that no test run alone leaves)."""
    yield
    tmp = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    with contextlib.suppress(OSError):
        for entry in tmp.iterdir():
            if entry.name.startswith("ctrmig"):
                FIRST_SEEN_AFTER.setdefault(entry.name, request.node.nodeid)


@pytest.fixture(scope="session", autouse=True)
def no_temporary_files_left() -> Iterator[None]:
    """Give every process the session starts a TMPDIR of its own; fail the session if
    ctrmig left anything there (a spool or a copy of pages holds a container's memory).

    A ctrmig killed by a test leaves its scratch directory until ``ctrmig recover``, which
    the tests that kill it run. Engines' own temporary files (podman's) are not ours.
    ctrmig on the other end of an ssh link (tests/hosts.py's sshd gives it this TMPDIR)
    may still hold a pre-copy receiver's pages after a cut link: its guarantee is to drop
    them once nothing arrived for RECEIVE_IDLE, which is waited for here.
    """
    directory = Path(tempfile.mkdtemp(prefix="ctrmig-tests-tmp-"))
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(directory)

    def left() -> list[str]:
        return sorted(p.name for p in directory.iterdir() if p.name.startswith("ctrmig"))

    try:
        yield
        if left() and all(name.startswith("ctrmig-pages-") for name in left()):
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not left(), timeout=pages.RECEIVE_IDLE + 30,
                         what="a cut-off page receiver dropping its pages")
        found = {name: FIRST_SEEN_AFTER.get(name, "?") for name in left()}
        assert not found, (f"ctrmig left temporary files in {directory} "
                           f"(name: the test after which it was first seen): {found}")
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)
