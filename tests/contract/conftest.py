"""One small harness per engine for the Migrator contract suite (test_migrator.py).

Every test there takes ``harness`` and runs once per engine, with the engine's name as its
id (``-k runc`` selects runc and runc over ssh) and the engine's marker (``-m podman``).
All that differs between engines lives here: how a counter workload is started, where its
output and files are read, how another container takes a name, what "another host" is,
and each engine's quirks. The test bodies use only the Migrator protocol, ctrmig.migrate()
and ctrmig.errors (fsspec's tests/abstract model: one body, a fixture per backend).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest
from podman import PodmanClient

import ctrmig
from ctrmig import options
from ctrmig.archive import ArchiveWriter, extracted
from ctrmig.engines.remote import RemoteMigrator
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import proc
from tests.conftest import (
    COUNTER_CMD,
    cleanup_runc_state,
    need,
    podman_read_file,
    unique,
    wait_for,
)
from tests.hosts import Host, TwoHosts

ENGINES = ["podman", "docker", "runc", "process"]
MARKERS = {"podman": "podman", "docker": "docker", "runc": "runc", "runc-ssh": "runc",
           "process": "process"}
CTRMIG = str(Path(sys.executable).with_name("ctrmig"))
SSH_PORT = 2231
REPO = Path(__file__).resolve().parents[2]

F = TypeVar("F", bound=Callable[..., Any])


def engines(*names: str) -> Callable[[F], F]:
    """Run a contract test on these engines only (default: ENGINES). "runc-ssh" is runc
    on another host, reached by ctrmig over ssh."""
    def mark(test: F) -> F:
        test.contract_engines = list(names)  # type: ignore[attr-defined]
        return test
    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness" in metafunc.fixturenames:
        names = getattr(metafunc.function, "contract_engines", ENGINES)
        metafunc.parametrize("harness", [
            pytest.param(n, id=n, marks=getattr(pytest.mark, MARKERS[n])) for n in names
        ], indirect=True)


def supported_options(m: ctrmig.Migrator, verb: str) -> frozenset[str]:
    """The engine-handled options engine ``m`` honours for ``verb`` ("checkpoint" or
    "restore"): the one place that knows how an adapter declares them."""
    return frozenset(getattr(type(m), f"{verb}_options"))


def engine_options(verb: str) -> set[str]:
    """The options of ``verb`` that engines honour or refuse (the rest, such as
    leave_running or compression, ctrmig handles itself for every engine)."""
    cls = ctrmig.CheckpointOptions if verb == "checkpoint" else ctrmig.RestoreOptions
    return {f.name for f, spec in options.specs(cls) if spec.handled == "engine"}


# --- workloads ------------------------------------------------------------------------------

COUNT = re.compile(r"count[= ](\d+)")  # containers print count=N, simple_loop "count N pid P"
# Both ends of an idle loopback TCP connection, then the counter: CRIU refuses to dump an
# established connection unless asked to (tcp_established).
TCP_CMD = ["/bin/sh", "-c", "sleep 100000 | nc -l -p 7000 > /dev/null & sleep 0.3; "
           "sleep 100000 | nc 127.0.0.1 7000 > /dev/null & sleep 0.3; " + COUNTER_CMD[2]]
TCP_PROCESS = """
import os, socket, time
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
for i in range(1, 10**9):
    print(f"count {i} pid {os.getpid()}", flush=True)
    time.sleep(0.1)
"""


def counts(text: str) -> list[int]:
    return [int(n) for n in COUNT.findall(text)]


def assert_continued(seen: list[int], low: int, high: int | None = None) -> None:
    """A restored counter went on from a count in (low, high] (``high`` None: no upper
    bound), not from 1, and without a gap.

    ``seen`` is all the output read under its name: the restored run is its last unbroken
    run. Before it may come the source's own output (one file for both, as with plain
    processes), or the output up to the checkpoint (podman keeps it: then the whole
    output is one run from 1)."""
    assert seen, "no output"
    runs = [[seen[0]]]
    for n in seen[1:]:
        if n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    restored = runs[-1]
    if len(runs) == 1 and restored[0] == 1:
        assert restored[-1] > (high if high is not None else low) + 1, seen
    else:
        assert low < restored[0], f"restarted at {restored[0]}: {seen}"
        assert high is None or restored[0] <= high + 1, f"counts lost: {seen}"


# --- one engine instance, as a test sees it ---------------------------------------------------


@dataclass
class Side:
    """One engine instance: its migrator, and how a test starts and watches workloads."""

    m: ctrmig.Migrator
    tag: str  # every name this test makes starts with it: teardown removes them all
    #: Start a counter named N (holding a TCP connection if True); return its name.
    spawn: Callable[[str, bool], str]
    output: Callable[[str], str]  # what a workload printed so far
    #: /path in a container's rootfs; None: no rootfs of its own (plain processes).
    read_file: Callable[[str, str], str] | None = None
    #: Make a container (not counting) that takes a name; None: names cannot be chosen.
    occupy: Callable[[str], None] | None = None
    alive: Callable[[str], bool] | None = None  # default: listed as running
    restore_options: dict[str, Any] = field(default_factory=dict)
    #: A name no workload has (default: a fresh one).
    unknown: str | None = None
    names: Iterator[int] = field(default_factory=itertools.count)

    def fresh_name(self) -> str:
        return f"{self.tag}-{next(self.names)}"

    def unknown_name(self) -> str:
        return self.unknown or self.fresh_name()

    def start(self, tcp: bool = False) -> str:
        """Start the counter; return its name once it counts."""
        name = self.spawn(self.fresh_name(), tcp)
        self.wait_counting(name)
        return name

    def counts(self, name: str) -> list[int]:
        return counts(self.output(name))

    def last(self, name: str) -> int:
        seen = self.counts(name)
        return seen[-1] if seen else 0

    def wait_counting(self, name: str, above: int = 0) -> int:
        wait_for(lambda: self.last(name) > above + 2, timeout=60,
                 what=f"{name} counting past {above + 2}")
        return self.last(name)

    def running(self, name: str) -> bool:
        if self.alive is not None:
            return self.alive(name)
        return any(c.name == name and c.state.lower() == "running" for c in self.m.list())

    def assert_stopped(self, name: str) -> int:
        """``name`` no longer counts; return its last count."""
        at = self.last(name)
        time.sleep(0.3)
        assert self.last(name) == at, f"{name} still counts"
        assert not self.running(name)
        return at


@dataclass
class Migration:
    """A source and a target of one engine, for ctrmig.migrate()."""

    source: Side
    target: Side
    target_name: str
    #: Make the target's restore fail for real once the archive flows (called from the
    #: source's progress): take the target name, so the restore is refused after the
    #: archive arrived, when the source has already stopped.
    sabotage: Callable[[], None]


def _migration(source: Side, target: Side) -> Migration:
    name = target.fresh_name()
    assert target.occupy is not None
    occupy = target.occupy
    return Migration(source, target, name, lambda: occupy(name))


@dataclass
class Harness:
    """The engine under test (``side``) and how to get a migration of that engine."""

    engine: str
    side: Side
    tmp: Path
    #: (lacking_image) -> a Migration; lacking_image: the target lacks the source's image
    migration: Callable[[bool], contextlib.AbstractContextManager[Migration]]


Builder = Callable[[pytest.FixtureRequest, Path, contextlib.ExitStack], Harness]


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    build = {
        "podman": _api_engine("podman", "podman_socket", podman_side, _podman_on),
        "docker": _api_engine("docker", "dockerd_socket", docker_side, _dockerd_on),
        "runc": _runc, "runc-ssh": _runc_ssh, "process": _process,
    }[request.param]
    with contextlib.ExitStack() as stack:
        yield build(request, tmp_path, stack)


def _unique_tag() -> str:
    return unique("ctrmig-c")


# --- podman: a podman API service (another host: one with its own empty storage) ---------------


@contextlib.contextmanager
def podman_side(url: str, image: str) -> Iterator[Side]:
    client = PodmanClient(base_url=url)
    m = ctrmig.migrator("podman", url=url)
    tag = _unique_tag()

    def spawn(name: str, tcp: bool) -> str:
        client.containers.run(image, TCP_CMD if tcp else COUNTER_CMD, name=name, detach=True,
                              network_mode="none")
        return name

    def occupy(name: str) -> None:
        client.containers.create(image, ["sleep", "100000"], name=name, network_mode="none")

    try:
        yield Side(m, tag, spawn, m.logs, lambda n, p: podman_read_file(client, n, p), occupy)
    finally:
        for c in client.containers.list(all=True):
            if c.name.startswith(tag):
                c.remove(force=True)
        client.close()
        m.close()


@contextlib.contextmanager
def two_hosts(request: pytest.FixtureRequest) -> Iterator[TwoHosts]:
    need("ip")
    session_dir: Path = request.getfixturevalue("session_dir")
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        yield hosts


# --- docker: a private dockerd (another host: a second one, without the image) -----------------


@contextlib.contextmanager
def docker_side(url: str, image: str) -> Iterator[Side]:
    api = docker.APIClient(base_url=url, timeout=120)
    m = ctrmig.migrator("docker", base_url=url)
    tag = _unique_tag()

    def spawn(name: str, tcp: bool) -> str:
        api.start(api.create_container(image, TCP_CMD if tcp else COUNTER_CMD, name=name)["Id"])
        return name

    def occupy(name: str) -> None:
        api.create_container(image, ["sleep", "100000"], name=name)

    def read_file(name: str, path: str) -> str:
        return bytes(api.exec_start(api.exec_create(name, ["cat", path]))).decode()

    try:
        yield Side(m, tag, spawn, m.logs, read_file, occupy)
    finally:
        for c in api.containers(all=True):
            if any(n.lstrip("/").startswith(tag) for n in c["Names"]):
                api.remove_container(c["Id"], force=True)
        api.close()
        m.close()


def _api_engine(engine: str, socket_fixture: str,
                side_at: Callable[[str, str], contextlib.AbstractContextManager[Side]],
                start_on_b: Callable[[Host], str]) -> Builder:
    """podman and docker: the session's service; another host without the image is host
    B of tests/hosts.py, with a service of its own on empty storage (``start_on_b``
    starts it and returns its URL). A target with the image is the same service."""
    def build(request: pytest.FixtureRequest, tmp: Path, stack: contextlib.ExitStack) -> Harness:
        url = f"unix://{request.getfixturevalue(socket_fixture)}"
        image: str = request.getfixturevalue("test_image")
        side = stack.enter_context(side_at(url, image))

        @contextlib.contextmanager
        def migration(lacking_image: bool) -> Iterator[Migration]:
            with contextlib.ExitStack() as inner:
                url_b = url
                if lacking_image:
                    url_b = start_on_b(inner.enter_context(two_hosts(request)).b)
                yield _migration(side, inner.enter_context(side_at(url_b, image)))

        return Harness(engine, side, tmp, migration)

    return build


def _podman_on(host: Host) -> str:
    host.start_podman()
    return f"unix://{host.podman_socket}"


def _dockerd_on(host: Host) -> str:
    return f"unix://{host.start_dockerd()}"


# --- runc: a private state dir (another host: another state dir; over ssh: ctrmig on host B) ----


def runc_side(m: RuncMigrator, image: str, under_test: ctrmig.Migrator | None = None) -> Side:
    """Workloads of runc state dir ``m``; ``under_test``: the migrator the tests drive
    (default ``m``; ctrmig over ssh for runc-ssh)."""
    def spawn(name: str, tcp: bool) -> str:
        return m.run(image, name=name, command=TCP_CMD if tcp else COUNTER_CMD)

    def read_file(name: str, path: str) -> str:
        return (m.bundles_dir / name / "rootfs" / path.lstrip("/")).read_text()

    def occupy(name: str) -> None:
        m.run(image, name=name, command=["true"])  # exits at once, and holds the name

    return Side(under_test or m, _unique_tag(), spawn, m.logs, read_file, occupy)


def runc_from_gone_image(side: Side, m: RuncMigrator, tmp: Path, image: str) -> Side:
    """``side``, but its workloads run from an OCI layout removed once they started: the
    image exists nowhere else (containers-storage of this machine holds the test image,
    which every runc "host" here would find)."""
    def spawn(name: str, tcp: bool) -> str:
        layout = tmp / f"layout-{name}"
        proc.run(["skopeo", "copy", "--quiet", f"containers-storage:{image}",
                  f"oci:{layout}:v1"], timeout=300)
        try:
            return m.run(f"oci:{layout}:v1", name=name,
                         command=TCP_CMD if tcp else COUNTER_CMD)
        finally:
            shutil.rmtree(layout)

    return replace(side, spawn=spawn)


@contextlib.contextmanager
def other_runc(tmp: Path, name: str) -> Iterator[RuncMigrator]:
    m = RuncMigrator(state_dir=tmp / name, workdir=tmp)
    try:
        yield m
    finally:
        leaks = cleanup_runc_state(m)
        assert not leaks, f"left behind after remove(): {leaks}"


def _runc(request: pytest.FixtureRequest, tmp: Path, stack: contextlib.ExitStack) -> Harness:
    m: RuncMigrator = request.getfixturevalue("runc_state")
    image: str = request.getfixturevalue("test_image")
    side = runc_side(m, image)

    @contextlib.contextmanager
    def migration(lacking_image: bool) -> Iterator[Migration]:
        source = runc_from_gone_image(side, m, tmp, image) if lacking_image else side
        with other_runc(tmp, "other") as target:
            yield _migration(source, runc_side(target, image))

    return Harness("runc", side, tmp, migration)


@pytest.fixture(scope="session")
def ssh_host(session_dir: Path) -> Iterator[tuple[TwoHosts, list[str]]]:
    """Host B with sshd on its veth address, and the ssh options that reach it from here
    (through B's network namespace: ProxyCommand)."""
    for tool in ("ip", "sshd", "busybox"):
        need(tool)
    with TwoHosts(session_dir / unique("ssh-hosts")) as hosts:
        options = hosts.b.start_sshd(port=SSH_PORT)
        proxy = f"ProxyCommand=nsenter --net=/run/netns/{hosts.b.netns} busybox nc %h %p"
        yield hosts, [*options, "-o", proxy]


def _runc_ssh(request: pytest.FixtureRequest, tmp: Path,
              stack: contextlib.ExitStack) -> Harness:
    """runc on host B, driven by ctrmig there over ssh; its workloads are started (and
    watched) through B's state dir directly. A migration goes from local runc to B."""
    local: RuncMigrator = request.getfixturevalue("runc_state")
    image: str = request.getfixturevalue("test_image")
    hosts, ssh_options = request.getfixturevalue("ssh_host")
    b = stack.enter_context(other_runc(tmp, "host-b"))
    remote = RemoteMigrator(
        "runc", f"ssh://root@{hosts.b.address}:{SSH_PORT}", ssh_options=ssh_options,
        remote_command=f"env CTRMIG_RUNC_STATE_DIR={b.state_dir} {CTRMIG}")
    side = runc_side(b, image, under_test=remote)

    @contextlib.contextmanager
    def migration(lacking_image: bool) -> Iterator[Migration]:
        source = runc_side(local, image)
        if lacking_image:
            source = runc_from_gone_image(source, local, tmp, image)
        yield _migration(source, side)

    return Harness("runc-ssh", side, tmp, migration)


# --- process: plain processes and CRIU ----------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def simple_loop(session_dir: Path) -> Path:
    need("gcc")
    out = session_dir / "simple_loop"
    proc.run(["gcc", "-O2", "-Wall", "-o", str(out), str(REPO / "examples" / "simple_loop.c")],
             timeout=60)
    return out


def _process(request: pytest.FixtureRequest, tmp: Path, stack: contextlib.ExitStack) -> Harness:
    """Quirks: a process's name is its PID, and it is restored under that PID, so it
    cannot take another name, and restoring on the same host needs the source gone
    (CRIU: "Can't fork for PID: File exists"); its stdout goes to a file (CRIU carries
    an O_APPEND file on), read directly; it has no rootfs; restoring a host process
    always needs allow_privileged."""
    binary: Path = request.getfixturevalue("simple_loop")
    # Restored processes (CRIU detaches them) become our children: reaped, PIDs freed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stack.callback(libc.prctl, PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    outputs: dict[str, Path] = {}

    def spawn(name: str, tcp: bool) -> str:
        out = tmp / f"{name}.out"
        argv = [sys.executable, "-c", TCP_PROCESS] if tcp else [str(binary), "1", "0.1"]
        with out.open("ab") as f:
            p = proc.spawn(argv, stdout=f)
        threading.Thread(target=p.wait, daemon=True).start()  # reaped once it ends
        outputs[str(p.pid)] = out
        return str(p.pid)

    def side(state: str) -> Side:
        m = ctrmig.migrator("process", state_dir=tmp / state)
        stack.callback(m.close)
        return Side(m, _unique_tag(), spawn, lambda n: outputs[n].read_text(),
                    alive=m.exists, restore_options={"allow_privileged": True},
                    unknown=str(1 << 22))  # above any pid_max

    source = side("state")

    def cleanup() -> None:
        for pid in map(int, outputs):
            proc.stop_pid(pid, timeout=5)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # we are its subreaper: collect it, free its PID

    stack.callback(cleanup)

    @contextlib.contextmanager
    def migration(lacking_image: bool) -> Iterator[Migration]:
        assert not lacking_image, "a plain process has no image to carry"
        # The target refuses any name but the PID, once the archive has arrived: that
        # is the failure (there is no other name to take on the same host).
        target = side("other")
        yield Migration(source, target, target.fresh_name(), lambda: None)

    return Harness("process", source, tmp, migration)


# --- archives with a defect that only the engine can find -----------------------------------


def rewrite_archive(good: Path, out: Path, change: Callable[[Path], None]) -> Path:
    """A copy of ``good`` with ``change`` applied to its extracted members, and a manifest
    whose checksums match again: ctrmig's checks pass, the engine sees the defect."""
    work = out.parent / f"{out.name}.work"
    work.mkdir()
    try:
        with extracted(good, workdir=work) as (root, manifest), out.open("wb") as f:
            change(root)
            writer = ArchiveWriter(f, "none")
            for entry in sorted(root.iterdir()):
                if entry.is_dir():
                    writer.add_tree(entry, entry.name)
                elif entry.name != "manifest.yaml":
                    writer.add_file(entry.name, entry)
            writer.finish(manifest)
    finally:
        shutil.rmtree(work)
    return out
