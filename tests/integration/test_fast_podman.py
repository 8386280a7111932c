"""podman's direct route (ctrmig.engines.podman.direct) on the real stack: checkpoints read
from podman's bundle, restores into a podman on a local socket without podman's import.

Host B's podman is reached through its unix socket here (the direct route); the failure
suite (test_failures.py) reaches it over TCP (podman's import). Its hosts, pair and
failure helpers are reused as they are.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from podman import PodmanClient

import ctrmig
from ctrmig.engines.podman import bundle
from ctrmig.engines.podman.migrator import PodmanMigrator
from ctrmig.errors import ChecksumError, CtrmigError
from ctrmig.protocol import Migrator
from tests.conftest import podman_read_file
from tests.integration import test_failures as failures
from tests.integration.test_failures import Pair, _signal_at
from tests.support import tampered_pages

# test_failures' fixtures: its two hosts (one set per module) and its engine pair.
hosts = failures.hosts
pair = failures.pair

# The counter, after leaving a file in its rootfs (the archive's rootfs diff).
FILE_CMD = ["/bin/sh", "-c", "echo carried > /carried.txt; "
            "i=0; trap 'exit 0' TERM; while :; do i=$((i+1)); echo count=$i; sleep 0.2; done"]


@pytest.fixture
def podman_pair(pair: Pair) -> Iterator[Pair]:
    """test_failures' podman pair, with host B reached through its local socket: the
    direct route."""
    two = pair
    target = ctrmig.migrator("podman", url=two.target_url)
    yield dataclasses.replace(two, target=target, dst_spec=f"podman+{two.target_url}")
    target.close()


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the direct route's steps; podman's import must not run at all."""
    seen = {"bundle": 0, "place": 0}

    def counting(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen[key] += 1
            return fn(*args, **kwargs)
        return call

    def no_import(*args: object, **kwargs: object) -> str:
        raise AssertionError("podman's import ran on the direct route")

    monkeypatch.setattr(bundle, "write_bundle", counting("bundle", bundle.write_bundle))
    monkeypatch.setattr(bundle, "place", counting("place", bundle.place))
    monkeypatch.setattr(PodmanMigrator, "_import", no_import)
    yield seen


def _m(engine: object) -> Migrator:
    return cast(Migrator, engine)


def _incoming(p: Pair) -> list[Path]:
    store = p.hosts.b.podman_root / "ctrmig-incoming"
    return sorted(store.iterdir()) if store.is_dir() else []


@pytest.mark.parametrize("pair", ["podman"], indirect=True)
def test_direct_migration_carries_memory_and_files(podman_pair: Pair,
                                                  spies: dict[str, int]) -> None:
    p = podman_pair
    name, before = p.start(FILE_CMD)
    report = ctrmig.migrate(name, source=_m(p.source), target=_m(p.target))
    assert report.target_name == name
    assert spies == {"bundle": 1, "place": 1}
    assert report.manifest is not None and bundle.RUNTIME_SPEC in report.manifest.files
    assert p.assert_exactly_once(name, before) == "B"
    client = PodmanClient(base_url=p.target_url)
    try:
        assert podman_read_file(client, name, "/carried.txt") == "carried\n"
    finally:
        client.close()  # type: ignore[no-untyped-call]
    assert _incoming(p) == []


@pytest.mark.parametrize("pair", ["podman"], indirect=True)
def test_direct_restore_refuses_a_tampered_archive_before_podman(
        podman_pair: Pair, spies: dict[str, int], tmp_path: Path) -> None:
    p = podman_pair
    name, before = p.start()
    archive = p.source.checkpoint(name, tmp_path / "c.tar", compression="none",
                                  leave_running=True)
    assert archive.path is not None and spies["bundle"] == 1
    tampered = tampered_pages(archive.path, tmp_path / "tampered.tar")
    with pytest.raises(ChecksumError, match="pages-"):
        p.target.restore(tampered, name=name)
    assert not p.target.exists(name), "podman created a container from a tampered archive"
    assert spies["place"] == 0 and _incoming(p) == []
    assert p.assert_exactly_once(name, before) == "A"
    # The untampered archive restores on B (the source still runs on A: a copy).
    p.hosts.load_test_image(p.hosts.b, tmp_path)
    assert p.target.restore(archive.path, name=f"{name}-copy") == f"{name}-copy"
    p.counting(p.target, f"{name}-copy")


@pytest.mark.parametrize("pair", ["podman"], indirect=True)
def test_failed_restore_in_place_rolls_back(podman_pair: Pair, spies: dict[str, int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """podman's local restore fails after the container was created and the files were
    placed (a rootfs that is not there): nothing is left on B, the source runs again."""
    p = podman_pair
    name, before = p.start()
    runtime_spec = bundle.runtime_spec

    def broken(text: bytes, old: dict[str, str], new: dict[str, str]) -> bytes:
        return runtime_spec(text, old, {**new, "layer_dir": "/nonexistent/ctrmig-layer"})

    monkeypatch.setattr(bundle, "runtime_spec", broken)
    with pytest.raises(CtrmigError):
        ctrmig.migrate(name, source=_m(p.source), target=_m(p.target))
    assert spies["place"] == 1
    assert not p.target.exists(name)
    assert p.assert_exactly_once(name, before) == "A"
    assert _incoming(p) == []


@pytest.mark.parametrize("pair", ["podman"], indirect=True)
@pytest.mark.parametrize("phase", ["dump", "restore"])
def test_killed_on_the_direct_route_then_recover(podman_pair: Pair, phase: str) -> None:
    """SIGKILL of ``ctrmig migrate`` while podman dumps, or once podman created the
    container on B and has yet to restore it; ``ctrmig recover`` leaves it running once."""
    p = podman_pair
    name, before = p.start(["/bin/sh", "-c", "head -c 67108864 /dev/urandom > /big; "
                            + FILE_CMD[2]])
    hit, code, _ = _signal_at(p, name, phase, signal.SIGKILL)
    if hit:
        assert code == -signal.SIGKILL
    res = p.recover()
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, out
    print(f"\npodman direct/{phase}: hit={hit}: {out.strip()}")
    assert p.journals() == []
    p.assert_exactly_once(name, before)
    # Nothing half-made is left on the other host either.
    assert [m.exists(name) for m in (p.source, p.target)].count(True) == 1
