"""Post-copy (``ctrmig migrate --lazy-pages``): the target runs at once, its memory
fetched from the source's page server afterwards; the source ends with the last page.

The two-host topology (runc over ``runc+ssh://``, the page server's port tunnelled
through an ssh stdio relay) and one host, memory verified by memhog. When the link breaks
mid post-copy, the memory is split between the hosts: the target must be killed and the
container run on, intact, at the source.
"""

# ruff: noqa: F811 - pytest fixtures imported from their test modules, used by name
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrmig.host import criu
from tests.conftest import unique, wait_for
from tests.hosts import TwoHosts
from tests.integration import test_failures as failures
from tests.integration.test_direct import (  # noqa: F401 - fixtures
    MIB,
    cleaned,
    cut_link,
    kill_when,
    memhog_image,
    memhog_pair,
    migrate,
    on_one_host,
    pair,
    runs_once_intact,
    runs_only_on,
    start_memhog,
    verified_on,
)
from tests.integration.test_failures import (  # noqa: F401 - hosts is a fixture
    Pair,
    hosts,
    set_link,
    slow_link,
    wait_exit,
    wait_until,
)

pytestmark = pytest.mark.runc


@pytest.fixture(autouse=True)
def _post_copy_possible() -> None:
    """setup-host sets fs.pipe-max-size; without it ctrmig refuses (tested in unit)."""
    criu.require_post_copy()


def test_post_copy_over_ssh(pair: Pair) -> None:
    name, _ = start_memhog(pair)
    report = migrate(pair, name, "--lazy-pages")
    assert report["route"] == "post-copy"
    assert int(str(report["bytes_moved"])) > MIB << 20  # every page came through the relay
    runs_only_on(pair, name, "B")
    verified_on(pair.target, name)
    assert not pair.source.exists(name)


def test_post_copy_on_one_host(tmp_path: Path, memhog_image: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    report = on_one_host(tmp_path, memhog_image, restore_options={"lazy_pages": True})
    assert report.route == "post-copy"
    # runc said when the restored container ran: the downtime ends there
    assert "did not say when its restore ran" not in caplog.text
    assert 0 < report.downtime_s < report.total_s


@pytest.mark.parametrize("lazy", [True, False], ids=["post-copy", "pre-copy"])
def test_spool_too_small_for_the_memory(pair: Pair, lazy: bool) -> None:
    """Host B's TMPDIR (the spool, where pre-copy's pages land) is a 330 MiB tmpfs: room
    for ctrmig's 256 MiB spare and the small archive, not for memhog's 64 MiB as well.
    Post-copy never writes the memory there: preflight lets it go and it arrives intact.
    Pre-copy would: preflight refuses it before anything froze."""
    name, _ = start_memhog(pair)
    flags = ("--lazy-pages",) if lazy else ("--route", "direct")
    with failures.tiny_tmpfs(Path("/run/ctrmig-tests") / unique("spool"), "330m") as spool:
        remote = f"env TMPDIR={spool} " + pair.env["CTRMIG_REMOTE_COMMAND"]
        res = pair.ctrmig(pair.migrate_argv(name, *flags), CTRMIG_REMOTE_COMMAND=remote)
        left = list(spool.iterdir())
    err = res.stderr.decode()
    assert left == [], f"left in the target's spool: {left}"
    if lazy:
        assert res.returncode == 0, err
        runs_only_on(pair, name, "B")
        verified_on(pair.target, name)
    else:
        assert res.returncode == 1, err
        assert "not enough free space" in err and "before anything was frozen" in err, err
        runs_only_on(pair, name, "A")


def test_link_breaks_mid_post_copy(pair: Pair) -> None:
    """The veth goes down while the target runs on half its memory: the target is killed
    (by the source's ctrmig if it can reach it, else by its own relay's watchdog), the
    source's CRIU lets go and the container runs on there, memory intact."""
    name, _ = start_memhog(pair, 256)  # at 40 Mbit/s its pages take ~50 s to fetch
    code, _ = cut_link(pair, pair.migrate_argv(name, "--lazy-pages"),
                       lambda: ("B", pair.target) in pair.running(name),
                       "the target running on lazy pages")
    assert code == 1
    # The target, cut off, ends itself once its pages stop (the relay's watchdog).
    wait_for(lambda: not pair.target.exists(name), timeout=90,
             what="the cut-off target killed")
    assert runs_once_intact(pair, name) == "A"
    time.sleep(1)
    runs_only_on(pair, name, "A")


def test_killed_mid_post_copy_then_recover(pair: Pair) -> None:
    """SIGKILL of ``ctrmig migrate`` while the target runs on lazy pages: its guard stops
    the source's page server (the container runs on there), the cut-off target ends
    itself, and ``ctrmig recover`` finds it running once, memory intact."""
    name, _ = start_memhog(pair, 256)
    kill_when(pair, pair.migrate_argv(name, "--lazy-pages"),
              lambda: ("B", pair.target) in pair.running(name),
              "the target running on lazy pages")
    res = pair.recover()
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out
    assert name in out, out
    wait_for(lambda: not pair.target.exists(name), timeout=90,
             what="the cut-off target killed")
    assert runs_once_intact(pair, name) == "A"


# --- every failure point of tests/integration/test_failures.py, on post-copy ------------


class PostCopyPair(Pair):
    """test_failures' runc pair, migrating with --lazy-pages."""

    def migrate_argv(self, name: str, *extra: str) -> list[str]:
        return super().migrate_argv(name, "--lazy-pages", *extra)


@pytest.fixture
def lazy_pair(hosts: TwoHosts, test_image: str, tmp_path: Path) -> Iterator[Pair]:
    yield from cleaned(memhog_pair(hosts, test_image, tmp_path, PostCopyPair))


def test_post_copy_dump_fails(lazy_pair: Pair) -> None:
    failures.test_dump_fails(lazy_pair)


def test_post_copy_transfer_breaks(lazy_pair: Pair, tmp_path: Path) -> None:
    failures.test_transfer_breaks(lazy_pair, tmp_path)


def test_post_copy_target_lacks_space(lazy_pair: Pair, tmp_path: Path) -> None:
    failures.test_target_lacks_space(lazy_pair, tmp_path)


def test_post_copy_target_lacks_the_image(lazy_pair: Pair, tmp_path: Path) -> None:
    failures.test_target_lacks_the_image(lazy_pair, tmp_path)


def test_post_copy_name_taken_at_the_last_moment(lazy_pair: Pair, tmp_path: Path) -> None:
    failures.test_target_name_taken_at_the_last_moment(lazy_pair, tmp_path)


@pytest.mark.parametrize("phase", ["started", "transfer"])
def test_post_copy_ctrl_c(lazy_pair: Pair, phase: str) -> None:
    failures.test_ctrl_c(lazy_pair, phase)


@pytest.mark.parametrize("phase", ["started", "dump", "transfer", "restore"])
def test_post_copy_killed_then_recover(lazy_pair: Pair, phase: str) -> None:
    failures.test_killed_then_recover(lazy_pair, phase)
