"""Preflight on two hosts: every refusal found before anything is frozen.

Host A runs one memhog container for the whole module (bench/memhog.c: it fills 16 MiB
with a pattern and keeps re-verifying it, printing the longest gap between its rounds),
with a bind mount and a published port. Host B is the target, reached over ssh (ctrmig
there runs its side of the checks: host B's own CRIU, paths, ports, disk) and over its
podman API. Each test breaks host B in one way, for real: no image and none carried,
the name taken, a 4 MiB spool, the bind mount's source missing, the port taken, a
cpuinfo image from a CPU with every instruction set. ``ctrmig migrate --check`` must
report that check failed (exit 1) and ``ctrmig migrate`` must refuse with it, while the
container on A was never checkpointed (podman's CheckpointedAt), memhog saw no stall
and it keeps verifying. A good target passes every check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import pytest
from bench import workload

import ctrmig
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import images, proc, services
from tests.conftest import cleanup_runc_state, need, unique, wait_for
from tests.hosts import Host, TwoHosts

CTRMIG = str(Path(sys.executable).with_name("ctrmig"))
PODMAN_PORT = 8795
SSH_PORT = 2295
PUBLISHED = 18795  # the port the source container publishes
MIB = 16
#: memhog's longest gap between two rounds (normally ~100 ms): a checkpoint of the
#: container (stopped, dumped, resumed) shows as seconds.
STALL_MS = 1500
NEVER = "0001-01-01T00:00:00Z"  # podman's CheckpointedAt/RestoredAt of a container never so


@dataclass
class Topology:
    """Host A's source container and how to reach host B; one per source engine."""

    hosts: TwoHosts
    source: str  # --from
    ssh: str  # host B over ssh
    api: str  # host B's API ("" for runc)
    container: str
    bind_dir: Path
    env: dict[str, str]  # ctrmig's on host A (CTRMIG_REMOTE_COMMAND: on host B)
    logs: Callable[[], str]
    pid: Callable[[], int]  # the container's memhog, as host A numbers it

    def ctrmig(self, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        """``ctrmig ARGS`` on host A (in its network namespace)."""
        argv = [*services.netns_prefix(self.hosts.a.netns), CTRMIG, *args]
        return subprocess.run(argv, env={**os.environ, **self.env, **env},
                              capture_output=True, timeout=300, check=False)


def api_podman(host: Host, *args: str) -> str:
    """podman through ``host``'s API service: its containers live in its network namespace
    (the podman CLI's own would be made in this one)."""
    return proc.output(["podman", "--remote", "--url", f"unix://{host.podman_socket}",
                        *args], timeout=300)


def podman_logs(host: Host, name: str) -> str:
    with contextlib.closing(ctrmig.migrator("podman", url=f"unix://{host.podman_socket}")) as m:
        return m.logs(name)


def podman_state(host: Host, name: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(host.podman_cli("inspect", name))[0]["State"]
    return state


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    for tool in ("ip", "podman", "criu", "sshd", "gcc", "unshare"):
        need(tool)
    base = tmp_path_factory.mktemp("preflight")
    with TwoHosts(base / "h") as two:
        two.a.start_podman()
        two.b.start_podman(tcp_port=PODMAN_PORT)
        ssh_options = two.b.start_sshd(port=SSH_PORT)
        ref = workload.ensure_image(base)
        archive = images.podman_save(ref, base / "memhog.tar", fmt="oci-archive")
        two.a.podman_cli("load", "-q", "-i", str(archive))
        archive.unlink()
        two.load_test_image(two.b, base)  # B has busybox (for its own containers), no memhog
        bind_dir = base / "shared" / "data"
        bind_dir.mkdir(parents=True)
        name = unique("ctrmig-pf")
        api_podman(two.a, "run", "-d", "--name", name, "-v", f"{bind_dir}:/data",
                   "-p", f"{PUBLISHED}:80", ref, *workload.command(MIB))
        topo = Topology(
            two, f"podman+unix://{two.a.podman_socket}",
            # podman's API through ssh (B's own socket): ctrmig on B answers the rest.
            f"podman+ssh://root@{two.b.address}:{SSH_PORT}{two.b.podman_socket}",
            f"podman+{two.b.podman_tcp}",
            name, bind_dir, {
                "CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
                "CTRMIG_REMOTE_COMMAND": f"env CTRMIG_PODMAN_URL=unix://"
                                         f"{two.b.podman_socket} {CTRMIG}",
                "CTRMIG_JOURNAL_DIR": str(base / "journal"),
            }, lambda: podman_logs(two.a, name),
            lambda: int(podman_state(two.a, name)["Pid"]))
        filled(topo)
        yield topo
        assert workload.health(topo.logs()).intact


def filled(topo: Topology) -> None:
    wait_for(lambda: workload.health(topo.logs()).last_pass >= 1, timeout=120,
             what="memhog filled and verified")


@contextlib.contextmanager
def never_frozen(topo: Topology) -> Iterator[None]:
    """The source as it was found after the block: the same process (no checkpoint and
    restore made a new one), no stall in memhog's rounds, verifying on, memory intact."""
    before = workload.health(topo.logs())
    pid = topo.pid()
    start = proc.start_time(pid)
    yield
    assert proc.running(pid, start), "the source's process was replaced"
    wait_for(lambda: workload.health(topo.logs()).last_round > before.last_round + 2,
             timeout=30, what="memhog verifying on")
    text = topo.logs()
    assert "CORRUPT" not in text
    gap = workload.gap_after(text, before.last_round)
    assert gap < STALL_MS, f"memhog stalled {gap} ms: the source was frozen"


@pytest.fixture
def untouched(topo: Topology) -> Iterator[None]:
    """podman's source, untouched by the test; podman never checkpointed or restored it."""
    with never_frozen(topo):
        yield
    state = podman_state(topo.hosts.a, topo.container)
    assert state["Running"], state
    assert state["CheckpointedAt"] == NEVER and state["RestoredAt"] == NEVER, state


def _insecure(target: str) -> list[str]:
    """The opt-in a tcp:// API target needs (the test hosts' link is ours alone)."""
    return ["--insecure"] if "tcp://" in target else []


def check_report(topo: Topology, target: str, *flags: str, **env: str) -> dict[str, dict]:
    """``migrate --check --json``: the checks by "host name"; exit 0 exactly when ok."""
    res = topo.ctrmig("migrate", topo.container, "--from", topo.source, "--to", target,
                      "--check", "--json", *flags, *_insecure(target), **env)
    report = json.loads(res.stdout)
    assert res.returncode == (0 if report["ok"] else 1), res.stderr.decode()
    return {f"{c['host']} {c['name']}": c for c in report["checks"]}


def assert_refused(topo: Topology, target: str, failed: str, words: list[str],
                   *flags: str, **env: str) -> None:
    """--check reports exactly ``failed`` ("target image") failing with ``words`` in its
    detail; a real migrate refuses with the same, before the source is touched."""
    checks = check_report(topo, target, "--allow-privileged", *flags, **env)
    fails = [k for k, c in checks.items() if c["status"] == "fail"]
    assert fails == [failed], checks
    assert all(w in checks[failed]["detail"] for w in words), checks[failed]
    assert checks[failed]["fix"], checks[failed]
    res = topo.ctrmig("migrate", topo.container, "--from", topo.source, "--to", target,
                      "--allow-privileged", *flags, *_insecure(target), **env)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "before anything was frozen" in err and failed in err, err
    assert all(w in err for w in words), err


@pytest.mark.podman
@pytest.mark.parametrize("via", ["ssh", "api"])
def test_good_target_passes_every_check(topo: Topology, untouched: None, via: str) -> None:
    target = getattr(topo, via)
    checks = check_report(topo, target, "--allow-privileged")
    assert f"memory {MIB}." in checks["source container"]["detail"]  # the estimate's part
    statuses = {k: c["status"] for k, c in checks.items()}
    if via == "ssh":
        assert set(statuses.values()) == {"pass"}, checks
        for name in ("ssh", "criu", "criu check", "cpu", "kernel features", "engine",
                     "image", "mounts", "ports", "name", "space", "privileges"):
            assert f"target {name}" in statuses, name
    else:  # what only host B itself can tell is unavailable over its API; nothing fails
        assert "fail" not in statuses.values(), checks
        assert statuses["target cpu"] == statuses["target mounts"] == "unavailable"
        assert statuses["target name"] == statuses["target image"] == "pass"
    # As a table; the bind mount is a host path: the target's policy refuses it unless
    # --allow-privileged.
    res = topo.ctrmig("migrate", topo.container, "--from", topo.source, "--to", target,
                      "--check", *_insecure(target))
    out = res.stdout.decode()
    print(out)
    assert res.returncode == 1, out
    failed = [ln for ln in out.splitlines() if re.search(r"│\s+fail\s+│", ln)]
    assert len(failed) == 1 and "privileges" in failed[0], out
    assert "more than an ordinary container" in failed[0], out
    assert "1 check(s) failed" in out


@pytest.mark.podman
@pytest.mark.parametrize("via", ["ssh", "api"])
def test_no_image_and_none_carried(topo: Topology, untouched: None, via: str) -> None:
    assert_refused(topo, getattr(topo, via), "target image",
                   [workload.IMAGE, "not on this", "--no-include-image"],
                   "--no-include-image")


@pytest.mark.podman
@pytest.mark.parametrize("via", ["ssh", "api"])
def test_name_taken(topo: Topology, untouched: None, via: str) -> None:
    b = topo.hosts.b
    b.podman_cli("create", "--name", topo.container, images.TEST_IMAGE, "true")
    try:
        assert_refused(topo, getattr(topo, via), "target name",
                       ["already has a container", topo.container])
    finally:
        b.podman_cli("rm", "-f", topo.container)


@pytest.mark.podman
def test_spool_of_4_mib(topo: Topology, untouched: None) -> None:
    """ctrmig on host B spools the archive in its TMPDIR, a 4 MiB tmpfs."""
    tiny = Path("/run/ctrmig-tests") / unique("tiny")
    tiny.mkdir(parents=True)
    proc.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tiny)], timeout=30)
    try:
        remote = f"env TMPDIR={tiny} {topo.env['CTRMIG_REMOTE_COMMAND']}"
        assert_refused(topo, topo.ssh, "target space", ["not enough free space", str(tiny)],
                       CTRMIG_REMOTE_COMMAND=remote)
        assert list(tiny.iterdir()) == []
    finally:
        proc.run(["umount", "-l", str(tiny)], timeout=30, check=False)
        tiny.rmdir()


@pytest.mark.podman
def test_bind_mount_source_missing(topo: Topology, untouched: None) -> None:
    """On host B the bind mount's source is not there: ctrmig there runs in a mount
    namespace of its own whose view of the source's parent is an empty tmpfs."""
    assert_refused(topo, topo.ssh, "target mounts", ["missing", str(topo.bind_dir)],
                   CTRMIG_REMOTE_COMMAND=hiding_the_bind_source(topo))
    assert topo.bind_dir.is_dir()  # hidden from ctrmig on B only


def hiding_the_bind_source(topo: Topology) -> str:
    """Host B's ctrmig, in a mount namespace where an empty tmpfs covers the bind
    mount's parent directory."""
    hide = f"mount -t tmpfs -o size=1m tmpfs {topo.bind_dir.parent} && exec \"$0\" \"$@\""
    return f"unshare -m sh -c {shlex.quote(hide)} {topo.env['CTRMIG_REMOTE_COMMAND']}"


LISTEN = ("import socket,sys,time; s=socket.socket(); s.bind(('0.0.0.0',int(sys.argv[1]))); "
          "s.listen(); print('up',flush=True); time.sleep(600)")


@pytest.mark.podman
@pytest.mark.parametrize("via", ["ssh", "api"])
def test_port_taken(topo: Topology, untouched: None, via: str) -> None:
    """ssh: a process on host B listens on the published port (ctrmig there cannot bind
    it); api: a container on host B publishes it (its API lists that)."""
    b = topo.hosts.b
    if via == "ssh":
        holder = proc.spawn([*services.netns_prefix(b.netns), sys.executable, "-c", LISTEN,
                             str(PUBLISHED)], stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        words = [f"{PUBLISHED}/tcp", "in use"]
    else:
        other = unique("ctrmig-pf-port")
        api_podman(b, "run", "-d", "--name", other, "-p", f"{PUBLISHED}:80",
                   images.TEST_IMAGE, "sleep", "1000")
        words = [f"{PUBLISHED}/tcp", "published by a container"]
    try:
        assert_refused(topo, getattr(topo, via), "target ports", words)
    finally:
        if via == "ssh":
            proc.kill_group(holder)
        else:
            api_podman(b, "rm", "-f", "-t", "0", other)


CRIU_SHIM = """#!/bin/sh
# criu, except that the CPU a dump records claims every instruction set there is.
if [ "$1" = cpuinfo ] && [ "$2" = dump ] && [ "$3" = -D ]; then
    {criu} "$@" || exit $?
    PYTHONPATH={root} exec {python} -m tests.cpuinfo "$4/cpuinfo.img"
fi
exec {criu} "$@"
"""


@pytest.mark.podman
def test_cpu_incompatible(topo: Topology, untouched: None, tmp_path: Path) -> None:
    """Host A's `criu cpuinfo dump` (through a shim on ctrmig's PATH there) records a
    CPU with every capability bit set: host B's `criu cpuinfo check` rejects it."""
    shims = tmp_path / "bin"
    shims.mkdir()
    real = proc.which("criu")
    (shims / "criu").write_text(CRIU_SHIM.format(criu=real, python=sys.executable,
                                                 root=Path(__file__).parents[2]))
    (shims / "criu").chmod(0o755)
    assert_refused(topo, topo.ssh, "target cpu", ["CPU", "SIGILL"],
                   PATH=f"{shims}:{os.environ['PATH']}")


# --- runc and docker sources, to host B over ssh -------------------------------------------


@pytest.fixture(scope="module")
def runc_topo(topo: Topology) -> Iterator[Topology]:
    """memhog in runc on host A; host B's ctrmig restores into a runc state dir of its own."""
    for tool in ("runc", "skopeo", "umoci"):
        need(tool)
    a, b = topo.hosts.a, topo.hosts.b
    src, dst = RuncMigrator(state_dir=a.root / "runc"), RuncMigrator(state_dir=b.root / "runc")
    try:
        name = src.run(workload.IMAGE, name=unique("ctrmig-pf-runc"),
                       command=workload.command(MIB))
        runc = replace(
            topo, source="runc", ssh=f"runc+ssh://root@{b.address}:{SSH_PORT}", api="",
            container=name, env={
                **topo.env, "CTRMIG_RUNC_STATE_DIR": str(src.state_dir),
                "CTRMIG_REMOTE_COMMAND": f"env CTRMIG_RUNC_STATE_DIR={dst.state_dir} {CTRMIG}"},
            logs=lambda: src.logs(name), pid=lambda: int(src.runc.state(name)["pid"]))
        filled(runc)
        yield runc
    finally:
        leaks = cleanup_runc_state(src) + cleanup_runc_state(dst)
        assert not leaks, leaks


@pytest.mark.runc
def test_runc_good_target_and_name_taken(runc_topo: Topology) -> None:
    topo = runc_topo
    with never_frozen(topo):
        checks = check_report(topo, topo.ssh)
        assert {c["status"] for c in checks.values()} == {"pass"}, checks
        assert f"memory {MIB}." in checks["source container"]["detail"]
        assert {"target ssh", "target cpu", "target space", "target privileges"} <= set(checks)
        dst = RuncMigrator(state_dir=topo.hosts.b.root / "runc")
        dst.run(images.TEST_IMAGE, name=topo.container, command=["true"])  # holds the name
        try:
            assert_refused(topo, topo.ssh, "target name",
                           ["already has a container", topo.container])
        finally:
            dst.remove(topo.container)


@pytest.fixture(scope="module")
def docker_topo(topo: Topology) -> Iterator[Topology]:
    """memhog in host A's own dockerd, with the bind mount; host B's dockerd is empty."""
    need("dockerd")
    a, b = topo.hosts.a, topo.hosts.b
    a_sock, b_sock = a.start_dockerd(), b.start_dockerd()
    archive = images.podman_save(workload.IMAGE, a.root / "memhog-docker.tar")
    client = docker.APIClient(base_url=f"unix://{a_sock}", timeout=300)
    try:
        with archive.open("rb") as f:
            for _ in client.load_image(f):
                pass
        name = unique("ctrmig-pf-docker")
        client.start(client.create_container(
            workload.IMAGE, workload.command(MIB), name=name, host_config=(
                client.create_host_config(binds=[f"{topo.bind_dir}:/data"],
                                          network_mode="none")))["Id"])
        dk = replace(
            topo, source=f"docker+unix://{a_sock}",
            ssh=f"docker+ssh://root@{b.address}:{SSH_PORT}", api="", container=name,
            env={**topo.env, "CTRMIG_REMOTE_COMMAND": f"env DOCKER_HOST=unix://{b_sock} "
                                                      f"{CTRMIG}"},
            logs=lambda: client.logs(name).decode(errors="replace"),
            pid=lambda: int(client.inspect_container(name)["State"]["Pid"]))
        filled(dk)
        yield dk
        client.remove_container(name, force=True)
    finally:
        client.close()


@pytest.mark.docker
def test_docker_good_target_and_bind_source_missing(docker_topo: Topology) -> None:
    topo = docker_topo
    with never_frozen(topo):
        checks = check_report(topo, topo.ssh, "--allow-privileged")
        assert {c["status"] for c in checks.values()} == {"pass"}, checks
        assert str(topo.bind_dir) in checks["target mounts"]["detail"]
        assert f"memory {MIB}." in checks["source container"]["detail"]
        assert_refused(topo, topo.ssh, "target mounts", ["missing", str(topo.bind_dir)],
                       CTRMIG_REMOTE_COMMAND=hiding_the_bind_source(topo))
