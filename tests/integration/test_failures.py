"""No loss: at every failure point of a migration the container runs exactly once.

Every failure is injected for real, on two network-namespace hosts joined by a veth
(tests/hosts.py): a container CRIU cannot dump, the link taken down mid-transfer, a
target spool dir on a tiny tmpfs, the image removed from the target, a name taken on the
target at the last moment, Ctrl-C (SIGINT) and SIGKILL of a ``ctrmig migrate`` process
followed by ``ctrmig recover``. After each, the test counts the running instances of the
container on both hosts (exactly one) and checks that its counter still counts.

podman: host A's podman over its unix socket -> host B's podman over TCP on the veth.
runc: host A's runc -> ``runc+ssh://`` ctrmig on host B (sshd on B's veth address).
docker: the session's dockerd (its unix socket, reached from A's netns) -> ``docker+ssh://``
ctrmig on host B, which restores into host B's own dockerd (no image to start with).
Every engine takes every failure point (and runc one of its own: its ssh killed too).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

import ctrmig
from ctrmig import locks
from ctrmig.engines.base import BaseMigrator
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import images, proc, services
from ctrmig.protocol import Migrator
from tests.conftest import COUNTER_CMD, last_count, need, unique, wait_for
from tests.hosts import TwoHosts, wait_tcp

CTRMIG = str(Path(sys.executable).with_name("ctrmig"))
PODMAN_PORT = 8791
SSH_PORT = 2291
# ssh notices a dead link after ~3 missed keep-alives; without them a link that goes
# down without a reset holds the transfer until TCP gives up (many minutes).
SSH_KEEPALIVE = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"]
COUNTER = COUNTER_CMD[2]
# Two ends of an idle loopback TCP connection: CRIU refuses to dump it (without
# --tcp-established; on kernels >= 6.16 CRIU 4.1.1 refuses it even with, criu#2718).
TCP_CMD = ["/bin/sh", "-c", "sleep 100000 | nc -l -p 7000 > /dev/null & sleep 0.3; "
           "sleep 100000 | nc 127.0.0.1 7000 > /dev/null & sleep 0.3; " + COUNTER]


# The counter beside 128 MiB of memory (tail holds its input until an EOF that never
# comes): a CRIU dump that takes a moment, to be hit while it runs.
MEMORY_CMD = ["/bin/sh", "-c", "(head -c 134217728 /dev/urandom; sleep 100000) | "
              f"tail -c 134217728 > /dev/null & sleep 3; {COUNTER}"]


def big_cmd(mib: int, path: str = "/big") -> list[str]:
    """The counter, after writing ``mib`` MiB of random data into its rootfs (the archive's
    rootfs diff): a transfer long enough to break in the middle."""
    return ["/bin/sh", "-c",
            f"dd if=/dev/urandom of={path} bs=1048576 count={mib} 2>/dev/null; {COUNTER}"]


# --- the two hosts, shared by the module --------------------------------------------------


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    for tool in ("ip", "tc", "podman", "runc", "criu", "skopeo", "umoci", "sshd"):
        need(tool)
    base = tmp_path_factory.mktemp("failures")
    with TwoHosts(base / "h") as two:
        two.a.start_podman()
        two.b.start_podman(tcp_port=PODMAN_PORT)
        two.ssh_options = two.b.start_sshd(port=SSH_PORT)  # type: ignore[attr-defined]
        two.load_test_image(two.a, base)
        yield two


def veth(hosts: TwoHosts) -> tuple[str, str]:
    """(netns, device) of host A's end of the link."""
    return hosts.a.netns, f"{hosts._veth}a"


def tx_bytes(hosts: TwoHosts) -> int:
    netns, dev = veth(hosts)
    res = proc.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", dev], timeout=30)
    return int(json.loads(res.stdout)[0]["stats64"]["tx"]["bytes"])


@contextlib.contextmanager
def slow_link(hosts: TwoHosts, rate: str = "80mbit") -> Iterator[None]:
    """Shape A's side of the link, so that a transfer takes seconds and can be hit."""
    netns, dev = veth(hosts)
    proc.run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
              "burst", "256kb", "latency", "400ms"], timeout=30)
    try:
        yield
    finally:
        proc.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], timeout=30,
                 check=False)


def set_link(hosts: TwoHosts, up: bool) -> None:
    netns, dev = veth(hosts)
    proc.run(["ip", "-n", netns, "link", "set", "dev", dev, "up" if up else "down"],
             timeout=30)


# --- one engine on both hosts ------------------------------------------------------------

Engine = Migrator | BaseMigrator


@dataclass
class Pair:
    """An engine on host A (source) and host B (target), as the test sees them."""

    engine: str
    hosts: TwoHosts
    netns: list[str]  # the command prefix that runs ctrmig where it reaches both ends
    source: Engine
    target: Engine
    src_spec: str
    dst_spec: str
    target_url: str  # the target engine's API address, as the test reaches it directly
    env: dict[str, str]
    run: Callable[[list[str]], str]
    journal: Path
    names: list[str] = field(default_factory=list)

    def start(self, cmd: list[str] | None = None) -> tuple[str, int]:
        """Start a counter on A; return its name and a count it has reached."""
        name = self.run(cmd or COUNTER_CMD)
        self.names.append(name)
        return name, self.counting(self.source, name)

    def counting(self, m: Engine, name: str, above: int = 0) -> int:
        wait_for(lambda: last_count(m.logs(name)) > above + 3, timeout=120,
                 what=f"{name} counting past {above + 3} on {m.engine}")
        return last_count(m.logs(name))

    def running(self, name: str) -> list[tuple[str, Engine]]:
        """Where a container ``name`` runs: ("A", source) and/or ("B", target)."""
        return [(side, m) for side, m in (("A", self.source), ("B", self.target))
                if any(c.name == name and c.state.lower() == "running" for c in m.list())]

    def assert_exactly_once(self, name: str, before: int) -> str:
        """The container runs on exactly one host, and counts on from ``before``."""
        where = self.running(name)
        assert len(where) == 1, f"{name} runs on {[s for s, _ in where] or 'no host'}"
        side, m = where[0]
        count = self.counting(m, name, above=before)
        assert count > before
        again = self.running(name)  # nothing came up late on the other side
        assert [s for s, _ in again] == [side], f"{name} runs on {[s for s, _ in again]}"
        return side

    def migrate_argv(self, name: str, *extra: str) -> list[str]:
        insecure = ["--insecure"] if "tcp://" in self.dst_spec else []  # podman's tcp link
        return [*self.netns, CTRMIG, "migrate", name, *insecure,
                "--from", self.src_spec, "--to", self.dst_spec, *extra]

    def full_env(self, **more: str) -> dict[str, str]:
        return {**os.environ, **self.env, "CTRMIG_JOURNAL_DIR": str(self.journal), **more}

    def ctrmig(self, argv: list[str], timeout: float = 300,
               **env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, env=self.full_env(**env), capture_output=True,
                              timeout=timeout, check=False)

    def spawn(self, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=self.full_env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def recover(self) -> subprocess.CompletedProcess[bytes]:
        return self.ctrmig([*self.netns, CTRMIG, "recover"])

    def journals(self) -> list[Path]:
        return sorted(self.journal.glob("*.json")) if self.journal.exists() else []

    def cleanup(self) -> None:
        for m in (self.source, self.target):
            for c in m.list():
                if any(c.name.startswith(n) for n in self.names):
                    m.remove(c.name)
        for name in self.names:  # the lock files a killed ctrmig left (any scope)
            for path in locks.lock_dir().glob(f"{self.engine}-*{name}.lock"):
                path.unlink()


@pytest.fixture(scope="module")
def b_dockerd(hosts: TwoHosts) -> Path:
    """Host B's own dockerd (no image); stopped with the hosts."""
    need("dockerd")
    return hosts.b.start_dockerd()


ALL_ENGINES = ["podman", "runc", "docker"]
LINKED = ["podman", "runc", "docker"]  # the engines that migrate across the veth


@pytest.fixture(params=ALL_ENGINES)
def pair(request: pytest.FixtureRequest, hosts: TwoHosts, test_image: str,
         tmp_path: Path) -> Iterator[Pair]:
    engine: str = request.param
    a, b = hosts.a, hosts.b
    in_a = services.netns_prefix(a.netns)
    if engine == "podman":
        request.applymarker(pytest.mark.podman)
        source = ctrmig.migrator("podman", url=f"unix://{a.podman_socket}")
        target = ctrmig.migrator("podman", url=f"unix://{b.podman_socket}")

        def run(cmd: list[str]) -> str:
            name = unique("ctrmig-f")
            a.podman_cli("run", "-d", "--name", name, "--network", "none",
                         images.TEST_IMAGE, *cmd)
            return name

        p = Pair(engine, hosts, in_a, source, target, f"podman+unix://{a.podman_socket}",
                 f"podman+{b.podman_tcp}", f"unix://{b.podman_socket}", {}, run,
                 tmp_path / "journal")
    elif engine == "docker":
        request.applymarker(pytest.mark.docker)
        first: Path = request.getfixturevalue("dockerd_socket")
        second: Path = request.getfixturevalue("b_dockerd")
        source = ctrmig.migrator("docker", base_url=f"unix://{first}")
        target = ctrmig.migrator("docker", base_url=f"unix://{second}")
        client = docker.APIClient(base_url=f"unix://{first}", timeout=120)
        request.addfinalizer(client.close)

        def run(cmd: list[str]) -> str:
            name = unique("ctrmig-f")
            client.start(client.create_container(images.TEST_IMAGE, cmd, name=name)["Id"])
            return name

        # ctrmig on host B (over ssh on the veth) restores into B's dockerd.
        env = {
            "CTRMIG_SSH_OPTIONS": " ".join([*hosts.ssh_options,  # type: ignore[attr-defined]
                                            *SSH_KEEPALIVE]),
            "CTRMIG_REMOTE_COMMAND": f"env DOCKER_HOST=unix://{second} {CTRMIG}",
        }
        p = Pair(engine, hosts, in_a, source, target, f"docker+unix://{first}",
                 f"docker+ssh://root@{b.address}:{SSH_PORT}", f"unix://{second}", env, run,
                 tmp_path / "journal")
    else:
        request.applymarker(pytest.mark.runc)
        p = runc_pair(hosts, test_image, tmp_path)
    try:
        yield p
    finally:
        set_link(hosts, up=True)
        p.cleanup()
        p.source.close()
        p.target.close()
    assert p.journals() == [], "a journal was left behind"


def runc_pair(hosts: TwoHosts, image: str, tmp_path: Path, prefix: str = "ctrmig-f",
              cls: type[Pair] = Pair) -> Pair:
    """runc on host A -> ``runc+ssh://`` ctrmig on host B (no API), running ``image``."""
    a, b = hosts.a, hosts.b
    src = RuncMigrator(state_dir=a.root / "runc")
    dst = RuncMigrator(state_dir=b.root / "runc")

    def run(cmd: list[str]) -> str:
        return src.run(image, name=unique(prefix), command=cmd)

    ssh_options = [*hosts.ssh_options, *SSH_KEEPALIVE]  # type: ignore[attr-defined]
    env = {
        "CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
        "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
        "CTRMIG_REMOTE_COMMAND": f"env CTRMIG_RUNC_STATE_DIR={dst.state_dir} {CTRMIG}",
    }
    return cls("runc", hosts, services.netns_prefix(a.netns), src, dst, "runc",
               f"runc+ssh://root@{b.address}:{SSH_PORT}", "", env, run, tmp_path / "journal")


def wait_exit(child: subprocess.Popen[bytes], timeout: float = 300) -> tuple[int, str]:
    _, err = child.communicate(timeout=timeout)
    return child.returncode, err.decode(errors="replace")


def wait_until(child: subprocess.Popen[bytes], predicate: Callable[[], object],
               what: str) -> bool:
    """Wait for ``predicate`` while ``child`` runs; False if the child ended first."""
    deadline = time.monotonic() + 120
    while child.poll() is None:
        if predicate():
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return False


def cut_link(pair: Pair, argv: list[str], ready: Callable[[], object], what: str,
             rate: str = "40mbit") -> tuple[int, str]:
    """Run ``argv`` over the slowed link, take the link down once ``ready``; return the
    exit code and stderr (the migration must not have ended before)."""
    with slow_link(pair.hosts, rate):
        child = pair.spawn(argv)
        try:
            assert wait_until(child, ready, what), f"the migration ended before {what}"
            set_link(pair.hosts, up=False)
            code, err = wait_exit(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            set_link(pair.hosts, up=True)
    assert code != 0, err
    assert "Traceback" not in err, err
    return code, err


# --- the failure points ------------------------------------------------------------------


def test_dump_fails(pair: Pair) -> None:
    """CRIU refuses the container (an established TCP socket): it never stopped."""
    name, before = pair.start(TCP_CMD)
    res = pair.ctrmig(pair.migrate_argv(name))
    err = res.stderr.decode()
    assert res.returncode == 1, err
    error = next(line for line in err.splitlines() if line.startswith("ctrmig: error:"))
    # The source's own error (CRIU's), not the target's view of a cut-off archive.
    ids = {name} | {c.id[:12] for c in pair.source.list() if c.name == name}
    assert "checkpoint" in error and any(i in error for i in ids), err
    assert pair.assert_exactly_once(name, before) == "A"


@pytest.mark.parametrize("pair", LINKED, indirect=True)
def test_transfer_breaks(pair: Pair, tmp_path: Path) -> None:
    """The veth goes down mid-transfer: the target gives up, the source runs again."""
    name, before = pair.start(big_cmd(96))
    base = tx_bytes(pair.hosts)
    if pair.engine == "podman":
        # podman's client gives a stalled upload 60 s (send_timeout) before it counts
        # the link as broken; 10 s here, the rest as in `ctrmig migrate`.
        argv = [*services.netns_prefix(pair.hosts.a.netns), sys.executable, "-c",
                TIMEOUT_MIGRATE, pair.src_spec.removeprefix("podman+"),
                pair.dst_spec.removeprefix("podman+"), name, "10"]
    else:
        argv = pair.migrate_argv(name)
    cut_link(pair, argv, lambda: tx_bytes(pair.hosts) - base > 24 << 20,
             "24 MiB on the wire", rate="80mbit")
    assert pair.assert_exactly_once(name, before) == "A"


TIMEOUT_MIGRATE = """
import json, sys, ctrmig
from ctrmig.engines.podman import PodmanMigrator
from ctrmig.errors import CtrmigError
PodmanMigrator.send_timeout = float(sys.argv[4])  # 60 s by default
src = ctrmig.migrator("podman", url=sys.argv[1])
dst = ctrmig.migrator("podman", url=sys.argv[2])
try:
    r = ctrmig.migrate(sys.argv[3], source=src, target=dst, insecure=True,  # tcp://
                       checkpoint_options={"include_image": True})
except CtrmigError as e:
    print(f"ctrmig: error: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"name": r.target_name}))
"""


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    proc.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], timeout=30)
    try:
        yield path
    finally:
        proc.run(["umount", "-l", str(path)], timeout=30, check=False)
        path.rmdir()


@pytest.mark.parametrize("pair", LINKED, indirect=True)
def test_target_lacks_space(pair: Pair, tmp_path: Path) -> None:
    """The target's spool dir is a 4 MiB tmpfs and the archive holds 16 MiB."""
    name, before = pair.start(big_cmd(16))
    with tiny_tmpfs(Path("/run/ctrmig-tests") / unique("tiny")) as tiny:
        if pair.engine == "podman":
            # A second podman service of host B (same storage) with its TMPDIR, where
            # podman saves an uploaded archive before importing it, on the tiny tmpfs.
            b = pair.hosts.b
            port = PODMAN_PORT + 1
            svc = services.podman_service(
                b.root / "podman-tiny", root=b.podman_root, runroot=b.podman_runroot,
                state_dir=b.root, netns=b.netns, uri=f"tcp://{b.address}:{port}")
            svc.env = {**os.environ, "TMPDIR": str(tiny)}
            svc.start(wait=False)
            try:
                wait_tcp(b.netns, b.address, port)
                res = pair.ctrmig([*pair.migrate_argv(name)[:-1],
                                   f"podman+tcp://{b.address}:{port}"])
            finally:
                svc.stop()
        else:
            remote = f"env TMPDIR={tiny} " + pair.env["CTRMIG_REMOTE_COMMAND"]
            res = pair.ctrmig(pair.migrate_argv(name), CTRMIG_REMOTE_COMMAND=remote)
        left = list(tiny.iterdir())
    err = res.stderr.decode()
    assert res.returncode == 1, err
    # ctrmig's reader refuses an archive that would not fit before writing any of it.
    assert "no space left" in err.lower() or "not enough free space" in err, err
    assert left == [], f"spooled files left on the target: {left}"
    assert pair.assert_exactly_once(name, before) == "A"


def test_target_lacks_the_image(pair: Pair, tmp_path: Path) -> None:
    """Without --include-image, to a host without the image: a clear error, no loss."""
    if pair.engine == "podman":
        pair.hosts.b.podman_cli("rmi", "-f", "--ignore", images.TEST_IMAGE)
        name, before = pair.start()
        missing = images.TEST_IMAGE
    elif pair.engine == "docker":
        client = docker.APIClient(base_url=pair.target_url, timeout=120)
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_image(images.TEST_IMAGE, force=True)
        client.close()
        name, before = pair.start()
        missing = images.TEST_IMAGE
    else:
        # The container runs from an OCI layout that is then removed: host B cannot find
        # the image anywhere (host A's container keeps running from its unpacked cache).
        layout = tmp_path / "layout"
        proc.run(["skopeo", "copy", "--quiet", f"containers-storage:{images.TEST_IMAGE}",
                  f"oci:{layout}:v1"], timeout=300)
        missing = f"oci:{layout}:v1"
        assert isinstance(pair.source, RuncMigrator)
        name = pair.source.run(missing, name=unique("ctrmig-f"), command=COUNTER_CMD)
        pair.names.append(name)
        before = pair.counting(pair.source, name)
        proc.run(["rm", "-rf", str(layout)], timeout=60)
    res = pair.ctrmig(pair.migrate_argv(name, "--no-include-image"))
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert missing in err and "not on this" in err, err
    assert "--include-image" in err, err  # the hint says how to carry it
    assert pair.assert_exactly_once(name, before) == "A"
    assert not pair.target.exists(name)


def test_target_name_taken_at_the_last_moment(pair: Pair, tmp_path: Path) -> None:
    """Another container takes the name on the target after ctrmig checked it was free:
    the restore is refused, the other container is left alone, the source runs again."""
    if pair.engine == "podman":
        pair.hosts.load_test_image(pair.hosts.b, tmp_path)
    elif pair.engine == "docker":
        _docker_load_test_image(pair.target_url, tmp_path)
    name, before = pair.start()
    child = pair.spawn(pair.migrate_argv(name))
    try:
        # The journal is written right after the target's name was found free.
        assert wait_until(child, pair.journals, "the migration journal")
        child.send_signal(signal.SIGSTOP)  # hold ctrmig while the name is taken
        try:
            if pair.engine == "podman":
                pair.hosts.b.podman_cli("create", "--name", name, images.TEST_IMAGE,
                                        "sleep", "100000")
            elif pair.engine == "docker":
                client = docker.APIClient(base_url=pair.target_url)
                client.create_container(images.TEST_IMAGE, ["sleep", "100000"], name=name)
                client.close()
            else:
                assert isinstance(pair.target, RuncMigrator)
                # it exits at once: it holds the name, and is not an instance
                pair.target.run(images.TEST_IMAGE, name=name, command=["true"])
        finally:
            child.send_signal(signal.SIGCONT)
        code, err = wait_exit(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 1, err
    assert "already" in err and name in err, err
    assert pair.target.exists(name), "the other container on the target was removed"
    assert "count=" not in pair.target.logs(name)
    assert pair.assert_exactly_once(name, before) == "A"


def _docker_load_test_image(url: str, tmp_path: Path) -> None:
    archive = images.podman_save(images.TEST_IMAGE, tmp_path / "image.tar")
    client = docker.APIClient(base_url=url, timeout=300)
    with archive.open("rb") as f:
        for _ in client.load_image(f):
            pass
    client.close()
    archive.unlink()


def _cases(*phases: str) -> list[tuple[str, str]]:
    """(engine, phase) pairs; "transfer" needs the veth (every engine crosses it now)."""
    return [(engine, phase) for engine in ALL_ENGINES for phase in phases
            if phase != "transfer" or engine in LINKED]


def _workload(pair: Pair, phase: str) -> list[str]:
    if phase == "dump":
        return MEMORY_CMD  # a CRIU dump that takes a moment
    # the veth engines: 64 MiB to move, a transfer that takes seconds at 80 Mbit/s
    return big_cmd(64) if pair.engine in LINKED else COUNTER_CMD


def _phase_reached(pair: Pair, phase: str, base: int) -> Callable[[], object]:
    if phase == "started":
        return pair.journals
    if phase == "dump":
        name = pair.names[-1]
        keys = {name.encode()} | {c.id.encode() for c in pair.source.list() if c.name == name}
        return lambda: _dumping(keys)
    if phase == "transfer":
        return lambda: tx_bytes(pair.hosts) - base > 16 << 20
    if phase == "restore":
        return lambda: any(c.name.startswith(pair.names[-1]) for c in pair.target.list())
    raise AssertionError(phase)


def _signal_at(pair: Pair, name: str, phase: str, sig: int) -> tuple[bool, int, str]:
    """Run ``ctrmig migrate`` of ``name`` over the slowed link and send it ``sig`` once it
    reaches ``phase``; return whether it did (else it ended first), its exit code and
    stderr."""
    base = tx_bytes(pair.hosts)
    with slow_link(pair.hosts):
        child = pair.spawn(pair.migrate_argv(name))
        try:
            hit = wait_until(child, _phase_reached(pair, phase, base), phase)
            if hit:
                child.send_signal(sig)
            code, err = wait_exit(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return hit, code, err


@pytest.mark.parametrize(("pair", "phase"), _cases("started", "transfer"), indirect=["pair"])
def test_ctrl_c(pair: Pair, phase: str) -> None:
    """SIGINT (Ctrl-C) to ``ctrmig migrate``: it rolls back and exits non-zero."""
    name, before = pair.start(_workload(pair, phase))
    hit, code, err = _signal_at(pair, name, phase, signal.SIGINT)
    assert hit, f"the migration ended before {phase}"
    assert code != 0, err
    assert pair.assert_exactly_once(name, before) == "A"


def _dumping(keys: set[bytes]) -> bool:
    """Whether a ``runc checkpoint`` of the container (by name or id) runs right now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"checkpoint" in argv and keys & set(argv):
            return True
    return False


@pytest.mark.parametrize(("pair", "phase"), _cases("started", "dump", "transfer", "restore"),
                         indirect=["pair"])
def test_killed_then_recover(pair: Pair, phase: str) -> None:
    """SIGKILL of ``ctrmig migrate``; ``ctrmig recover`` then finishes or rolls back."""
    name, before = pair.start(_workload(pair, phase))
    hit, code, _ = _signal_at(pair, name, phase, signal.SIGKILL)
    if hit:
        assert code == -signal.SIGKILL
        assert len(pair.journals()) == 1, "the killed migration left its journal"
    res = pair.recover()
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out
    print(f"\n{pair.engine}/{phase}: hit={hit}: {out.strip()}")
    if hit:
        assert name in out, out
    assert pair.journals() == []
    pair.assert_exactly_once(name, before)


def _writes_settled(pid: int, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until process ``pid`` has written nothing (files, sockets) for ``quiet`` s."""
    def written() -> int:
        io = Path(f"/proc/{pid}/io").read_text()
        return int(re.search(r"^wchar: (\d+)", io, re.M)[1])  # type: ignore[index]

    deadline = time.monotonic() + limit
    last, since = written(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"pid {pid} kept writing for {limit:g} s"
        time.sleep(0.05)
        if (now := written()) != last:
            last, since = now, time.monotonic()


def _journal_phase(pair: Pair) -> str:
    for path in pair.journals():
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(path.read_text()).get("phase", ""))
    return ""


SLOW_REMOTE = """#!/bin/sh
# host B's ctrmig, except that a restore first takes in the whole archive, says so, and
# waits before it starts: the moment after the last byte left host A. (ctrmig calls its
# remote self as `ctrmig --json-errors SUBCOMMAND ...`.)
if [ "$1" = --json-errors ] && [ "$2" = restore ]; then
    cat > {spool}
    touch {arrived}
    sleep 4
    exec {command} "$@" < {spool}
fi
exec {command} "$@"
"""


@pytest.mark.parametrize("pair", LINKED, indirect=True)
def test_killed_after_the_archive_arrived(pair: Pair, tmp_path: Path) -> None:
    """SIGKILL of ``ctrmig migrate`` once the target holds the whole archive but has not
    made the container yet; then ``ctrmig recover``. The target goes on alone (host B's
    podman service, or ctrmig on host B behind the ssh session the killed ctrmig left),
    so recover must wait for it and finish, not resume the source beside it."""
    name, before = pair.start(big_cmd(32))
    env: dict[str, str] = {}
    arrived = tmp_path / "arrived"
    if pair.engine != "podman":  # runc and docker: ctrmig on host B over ssh
        script = tmp_path / "slow-ctrmig"
        script.write_text(SLOW_REMOTE.format(spool=tmp_path / "spool.tar", arrived=arrived,
                                             command=pair.env["CTRMIG_REMOTE_COMMAND"]))
        script.chmod(0o755)
        env["CTRMIG_REMOTE_COMMAND"] = str(script)
    # podman: host B's API service (the one on the veth), paused once the upload is out, so
    # that recover asks it while it has yet to import what it got.
    service = pair.hosts.b.started[1].pid() if pair.engine == "podman" else None
    child = pair.spawn(pair.migrate_argv(name), **env)
    recovering = None
    try:
        if service is None:
            reached = wait_until(child, arrived.exists, "the whole archive on host B")
        else:
            reached = wait_until(child, lambda: _journal_phase(pair) == "committed",
                                 "the upload's last piece")
            os.kill(service, signal.SIGSTOP)
            # At most 16 KiB follow the commit (archive.streams.pieces): they fit in the
            # paused service's socket, so host B holds the whole archive when ctrmig dies,
            # once ctrmig wrote them (on a loaded machine that took more than 0.3 s).
            _writes_settled(child.pid)
        assert reached, "the migration ended before the archive arrived"
        child.kill()
        code, _ = wait_exit(child)
        assert code == -signal.SIGKILL
        assert _journal_phase(pair) == "committed"
        recovering = pair.spawn([*pair.netns, CTRMIG, "recover"], **env)
        if service is not None:
            time.sleep(2)  # recover is waiting for host B's answer
    finally:
        if service is not None:
            os.kill(service, signal.SIGCONT)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert recovering is not None
    stdout, stderr = recovering.communicate(timeout=300)
    res_code, out = recovering.returncode, (stdout + stderr).decode(errors="replace")
    print(f"\n{pair.engine}: {out.strip()}")
    assert res_code == 0, out
    assert f"{name}: finished" in out, out
    assert pair.journals() == []
    assert pair.assert_exactly_once(name, before) == "B"


SLOW_RUNC = """#!/bin/sh
# runc, except that a restore says so and waits first: ctrmig on host B holds the whole
# archive and its lock, and the container is not made yet.
for arg in "$@"; do
    if [ "$arg" = restore ]; then touch {arrived}; sleep 4; break; fi
done
exec {runc} "$@"
"""


@pytest.mark.parametrize("pair", ["runc"], indirect=True)
def test_killed_with_its_ssh_while_the_target_restores(pair: Pair, tmp_path: Path) -> None:
    """``ctrmig migrate`` and its ssh session are both killed (as systemd stops a unit's
    cgroup) while ctrmig on host B restores: nothing local is left to wait for, so recover
    must see the restore through host B's lock (``ctrmig ls`` says "restoring")."""
    shims = tmp_path / "bin"
    shims.mkdir()
    arrived = tmp_path / "arrived"
    (shims / "runc").write_text(SLOW_RUNC.format(arrived=arrived, runc=shutil.which("runc")))
    (shims / "runc").chmod(0o755)
    remote = pair.env["CTRMIG_REMOTE_COMMAND"].replace(
        "env ", f"env PATH={shims}:{os.environ['PATH']} ", 1)
    name, before = pair.start()
    child = subprocess.Popen(pair.migrate_argv(name), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True,
                             env=pair.full_env(CTRMIG_REMOTE_COMMAND=remote))
    try:
        assert wait_until(child, arrived.exists, "runc restore on host B")
        journal = json.loads(pair.journals()[0].read_text())
        assert journal["phase"] == "committed"
        for helper in journal["helpers"]:  # the ssh session, in a session of its own
            os.kill(helper["pid"], signal.SIGKILL)
        child.kill()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    res = pair.recover()
    out = res.stdout.decode() + res.stderr.decode()
    print(f"\nrunc: {out.strip()}")
    assert res.returncode == 0, out
    assert f"{name}: finished" in out, out
    assert pair.journals() == []
    assert pair.assert_exactly_once(name, before) == "B"
