"""The direct route of ``migrate`` (pre-copy): CRIU's pages stream straight to a page
server on the target while the source dumps; no archive of the memory on either side.

On the two network-namespace hosts of tests/hosts.py (runc: host A's runc ->
``runc+ssh://`` ctrmig on host B, the pages through an ssh stdio relay), and on one host
(runc state dir A -> B, in one process). The workload is bench/memhog.c: it fills its
memory with a pattern and keeps verifying all of it, so an intact move shows as full
passes on the target without a CORRUPT line. Failure points: every one of
tests/integration/test_failures.py runs on this route too (its runc pair migrates with
the default route, which is this one); here the ones the direct route adds.
"""

# ruff: noqa: F811 - pytest fixtures imported from their test modules, used by name
from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bench import workload

import ctrmig
from ctrmig.engines.runc import RuncMigrator
from ctrmig.migrate import MigrationReport
from tests.conftest import unique, wait_for
from tests.hosts import TwoHosts
from tests.integration.test_failures import (  # noqa: F401 - hosts is a fixture
    CTRMIG,
    SSH_KEEPALIVE,
    SSH_PORT,
    Pair,
    cut_link,
    hosts,
    runc_pair,
    set_link,
    slow_link,
    tx_bytes,
    wait_exit,
    wait_until,
)
from tests.integration.test_failures import (
    _dumping as dumping,
)

pytestmark = pytest.mark.runc
MIB = 64


@pytest.fixture(scope="module")
def memhog_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return workload.ensure_image(tmp_path_factory.mktemp("memhog"))


def memhog_pair(hosts: TwoHosts, image: str, tmp_path: Path,
                cls: type[Pair] = Pair) -> Pair:
    """runc on host A -> ``runc+ssh://`` ctrmig on host B, running ``image``."""
    return runc_pair(hosts, image, tmp_path, "ctrmig-d", cls)


@pytest.fixture
def pair(hosts: TwoHosts, memhog_image: str,
         tmp_path: Path) -> Iterator[Pair]:
    yield from cleaned(memhog_pair(hosts, memhog_image, tmp_path))


def cleaned(p: Pair) -> Iterator[Pair]:
    """A fixture's body: ``p``, then the link up, its containers gone, no journal left."""
    try:
        yield p
    finally:
        set_link(p.hosts, up=True)
        p.cleanup()
    assert p.journals() == [], "a journal was left behind"


# --- memhog's view ---------------------------------------------------------------------


def start_memhog(pair: Pair, mib: int = MIB) -> tuple[str, workload.Health]:
    name = pair.run(workload.command(mib))
    pair.names.append(name)
    wait_for(lambda: workload.health(pair.source.logs(name)).rounds > 2, timeout=120,
             what=f"memhog {name} filled and verifying")
    return name, workload.health(pair.source.logs(name))


def verified_on(m: RuncMigrator | ctrmig.Migrator, name: str, passes: int = 2) -> None:
    """memhog on ``m`` completes ``passes`` more full verifications, nothing corrupt."""
    first = workload.health(m.logs(name))

    def done() -> bool:
        h = workload.health(m.logs(name))
        assert not h.corrupt, m.logs(name)[-2000:]
        return h.last_pass >= first.last_pass + passes

    wait_for(done, timeout=120, what=f"{name} verifying its memory on {m.engine}")


def runs_only_on(pair: Pair, name: str, side: str) -> None:
    where = [s for s, _ in pair.running(name)]
    assert where == [side], f"{name} runs on {where or 'no host'}"


def migrate(pair: Pair, name: str, *extra: str) -> dict[str, object]:
    res = pair.ctrmig(pair.migrate_argv(name, "--json", *extra))
    err = res.stderr.decode()
    assert res.returncode == 0, err
    # post-copy: the target's relay ended cleanly, so the pages' sha256 were compared
    assert "the target's relay reported" not in err, err
    # post-copy: ctrmig there said when the restored container ran (the downtime's end)
    assert "did not say when its restore ran" not in err, err
    report: dict[str, object] = json.loads(res.stdout)
    return report


# --- the route -------------------------------------------------------------------------


def test_direct_over_ssh_moves_memory_intact(pair: Pair) -> None:
    """runc -> runc+ssh://: the pages through the page server, memory verified after."""
    name, _ = start_memhog(pair)
    report = migrate(pair, name, "--route", "direct")
    assert report["route"] == "direct"
    assert int(str(report["bytes_moved"])) > MIB << 20  # the pages crossed too
    for phase in ("freeze_s", "dump_s", "transfer_s", "restore_s", "downtime_s"):
        assert isinstance(report[phase], float) and report[phase] >= 0, (phase, report)
    runs_only_on(pair, name, "B")
    verified_on(pair.target, name)
    assert not pair.source.exists(name)


def test_auto_takes_the_direct_route_and_prints_its_phases(pair: Pair) -> None:
    name, _ = start_memhog(pair, 16)
    res = pair.ctrmig(pair.migrate_argv(name))
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    for word in ("direct route", "freeze", "dump", "transfer", "restore", "downtime"):
        assert word in out, out
    runs_only_on(pair, name, "B")
    verified_on(pair.target, name)


def test_archive_route_still_there(pair: Pair) -> None:
    name, _ = start_memhog(pair, 16)
    report = migrate(pair, name, "--route", "archive")
    assert report["route"] == "archive"
    runs_only_on(pair, name, "B")
    verified_on(pair.target, name)


def on_one_host(tmp_path: Path, image: str, **migrate_args: object) -> MigrationReport:
    """memhog moved between two runc state dirs of this host through the API (the link a
    socket pair); its memory verified on the target; the report."""
    a = RuncMigrator(state_dir=tmp_path / "a")
    b = RuncMigrator(state_dir=tmp_path / "b")
    name = a.run(image, name=unique("ctrmig-d"), command=workload.command(MIB))
    try:
        wait_for(lambda: workload.health(a.logs(name)).rounds > 2, timeout=120,
                 what="memhog verifying")
        report = ctrmig.migrate(name, source=a, target=b, **migrate_args)  # type: ignore[arg-type]
        assert report.bytes_moved > MIB << 20
        assert not a.exists(name)
        verified_on(b, name)
        return report
    finally:
        for m in (a, b):
            if m.exists(name):
                m.remove(name)


def test_direct_on_one_host(tmp_path: Path, memhog_image: str) -> None:
    report = on_one_host(tmp_path, memhog_image, route="direct")
    assert report.route == "direct" and report.dump_s > 0


# --- failure points the direct route adds ------------------------------------------------


def test_page_stream_breaks_mid_dump(pair: Pair) -> None:
    """The link goes down while the pages stream (the dump itself): the dump fails, the
    source (paused for the dump) runs on, memory intact, nothing on the target."""
    name, _ = start_memhog(pair, 256)
    base = tx_bytes(pair.hosts)
    cut_link(pair, pair.migrate_argv(name, "--route", "direct"),
             lambda: dumping({name.encode()}) and tx_bytes(pair.hosts) - base > 8 << 20,
             "pages on the wire")
    runs_only_on(pair, name, "A")
    verified_on(pair.source, name)


def test_killed_while_paused_then_recover(pair: Pair) -> None:
    """SIGKILL of ``ctrmig migrate`` while the source is paused for the direct route's
    dump: ``ctrmig recover`` resumes (unpauses) it; it runs once, memory intact."""
    name, _ = start_memhog(pair, 128)
    kill_when(pair, pair.migrate_argv(name, "--route", "direct"),
              lambda: _state(pair, name) == "paused", "the source paused")
    res = pair.recover()
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out
    assert name in out, out
    runs_once_intact(pair, name)


def runs_once_intact(pair: Pair, name: str) -> str:
    """The container runs on exactly one host, and its memory verifies there."""
    where = [s for s, _ in pair.running(name)]
    assert len(where) == 1, f"{name} runs on {where or 'no host'}"
    verified_on(pair.source if where == ["A"] else pair.target, name)
    again = [s for s, _ in pair.running(name)]
    assert again == where, f"{name} runs on {again}"
    return where[0]


def kill_when(pair: Pair, argv: list[str], ready: Callable[[], object], what: str) -> None:
    """Run ``argv`` over the slowed link and SIGKILL it once ``ready``."""
    with slow_link(pair.hosts, "40mbit"):
        child = pair.spawn(argv)
        try:
            assert wait_until(child, ready, what), f"the migration ended before {what}"
            child.send_signal(signal.SIGKILL)
            wait_exit(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _state(pair: Pair, name: str) -> str:
    return next((c.state for c in pair.source.list() if c.name == name), "")

