"""Secrecy on the real stack (#15): private files, encrypted and signed archives, ssh links.

podman's counter container is the memory-verifying workload: a restored counter that goes
on from the count it was stopped at (not from 1) resumed from its dumped memory.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ctrmig
from ctrmig import cli, locks, settings
from ctrmig.archive.reader import extracted, read_signed
from ctrmig.archive.spool import spooled
from ctrmig.engines.runc import RuncMigrator
from ctrmig.host import images, proc
from ctrmig.recovery import Journal
from tests.conftest import COUNTER_CMD, first_count, last_count, need, unique, wait_for
from tests.hosts import TwoHosts

pytestmark = pytest.mark.podman

CTRMIG = Path(sys.executable).with_name("ctrmig")
SSH_PORT = 2223


def ctrmig_cli(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(cli.cli, list(args), env=env)


@pytest.fixture
def env(podman_socket: Path, tmp_path: Path) -> dict[str, str]:
    return {"CTRMIG_PODMAN_URL": f"unix://{podman_socket}", "CTRMIG_ENGINE": "podman",
            "CTRMIG_JOURNAL_DIR": str(tmp_path / "state" / "migrations"),
            "CTRMIG_LOCK_DIR": str(tmp_path / "run" / "locks")}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "keys"
    d.mkdir()
    for who in ("alice", "mallory"):
        proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / who)],
                 timeout=30)
    (d / "trusted").write_text((d / "alice.pub").read_text())
    return {"alice": d / "alice", "alice.pub": d / "alice.pub", "mallory": d / "mallory",
            "trusted": d / "trusted"}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _resumed(m: ctrmig.Migrator, old: str, new: str) -> None:
    """``new`` counts on from where ``old`` was stopped: its memory came through."""
    stopped_at = last_count(m.logs(old))
    wait_for(lambda: last_count(m.logs(new)) > stopped_at + 2, what=f"{new} counting")
    assert first_count(m.logs(new).split(f"count={stopped_at}\n", 1)[-1]) == stopped_at + 1


def test_encrypted_signed_round_trip(podman_counter: Callable[[], str], env: dict[str, str],
                                     keys: dict[str, Path], tmp_path: Path,
                                     umask_022: None) -> None:
    name = podman_counter()
    archive = tmp_path / "out" / "web.tar"
    res = ctrmig_cli("checkpoint", name, "-o", str(archive), "--encrypt-to",
                     str(keys["alice.pub"]), "--sign", str(keys["alice"]), env=env)
    assert res.exit_code == 0, res.output
    # Private from the start, under umask 022; and no plaintext in it.
    assert _mode(archive) == 0o600 and _mode(archive.parent) == 0o700
    assert archive.read_bytes().startswith(b"age-encryption.org/v1\n")
    assert not list(archive.parent.glob("*.partial"))

    res = ctrmig_cli("inspect", str(archive), env=env)
    assert res.exit_code == 1 and "encrypted" in res.output and "--identity" in res.output
    res = ctrmig_cli("inspect", str(archive), "--identity", str(keys["alice"]), env=env)
    assert res.exit_code == 0, res.output
    fingerprint = proc.output(["ssh-keygen", "-l", "-f", str(keys["alice.pub"])],
                              timeout=30).split()[1]
    assert fingerprint in res.output and "valid" in res.output

    m = ctrmig.migrator("podman", url=env["CTRMIG_PODMAN_URL"])
    try:
        new = f"{name}-r"
        for wrong in ([], ["--identity", str(keys["mallory"])]):
            res = ctrmig_cli("restore", str(archive), "--name", new, *wrong, env=env)
            assert res.exit_code == 1 and "encrypted" in res.output, res.output
            assert not m.exists(new)
        res = ctrmig_cli("restore", str(archive), "--name", new, "--identity",
                         str(keys["alice"]), "--trusted-keys", str(keys["trusted"]), env=env)
        assert res.exit_code == 0, res.output
        _resumed(m, name, new)
        res = ctrmig_cli("verify", str(archive), "--identity", str(keys["alice"]),
                         "--trusted-keys", str(keys["trusted"]), env=env)
        assert res.exit_code == 0 and fingerprint in res.output, res.output
    finally:
        m.close()


def test_untrusted_archives_are_refused_before_podman(
        podman_counter: Callable[[], str], env: dict[str, str], keys: dict[str, Path],
        tmp_path: Path) -> None:
    from tests.unit.test_crypto import _rewrite

    name = podman_counter()
    unsigned, other = tmp_path / "u.tar", tmp_path / "o.tar"
    signed, forged = tmp_path / "s.tar", tmp_path / "f.tar"
    for path, flags in ((unsigned, []), (other, ["--sign", str(keys["mallory"])]),
                        (signed, ["--sign", str(keys["alice"])])):
        res = ctrmig_cli("checkpoint", name, "-o", str(path), "--leave-running",
                         "--compress", "none", *flags, env=env)
        assert res.exit_code == 0, res.output
    _rewrite(signed, forged, read_signed(signed)[1])  # consistent checksums, old signature
    m = ctrmig.migrator("podman", url=env["CTRMIG_PODMAN_URL"])
    try:
        for path, why in ((unsigned, "not signed"), (other, "a key not in"),
                          (forged, "differs from what")):
            new = unique()
            res = ctrmig_cli("restore", str(path), "--name", new, "--trusted-keys",
                             str(keys["trusted"]), env=env)
            assert res.exit_code == 1 and why in res.output, res.output
            assert not m.exists(new), f"{path.name}: something was restored"
        res = ctrmig_cli("verify", str(forged), "--trusted-keys", str(keys["trusted"]), env=env)
        assert res.exit_code == 1 and "differs from what" in res.output
    finally:
        m.close()


def test_tcp_needs_insecure(podman_counter: Callable[[], str], env: dict[str, str]) -> None:
    name = podman_counter()
    res = ctrmig_cli("migrate", name, "--from", "podman", "--to",
                     "podman+tcp://127.0.0.1:9", env=env)
    assert res.exit_code == 1
    assert "--insecure" in res.output and "no authentication" in res.output
    m = ctrmig.migrator("podman", url=env["CTRMIG_PODMAN_URL"])
    try:
        assert any(c.name == name and c.state == "running" for c in m.list())
    finally:
        m.close()


@pytest.fixture
def two_hosts(session_dir: Path) -> Iterator[TwoHosts]:
    need("ip")
    with TwoHosts(session_dir / unique("hosts")) as hosts:
        yield hosts


def test_podman_migrates_over_ssh(two_hosts: TwoHosts, session_dir: Path,
                                  tmp_path: Path) -> None:
    """Host A's podman -> host B's podman through ssh (B's API socket forwarded): B's
    podman listens on no network port at all."""
    a, b = two_hosts.a, two_hosts.b
    a.start_podman()
    b.start_podman()
    ssh_options = b.start_sshd(port=SSH_PORT)
    two_hosts.load_test_image(a, session_dir)
    two_hosts.load_test_image(b, session_dir)
    src = ctrmig.migrator("podman", url=f"unix://{a.podman_socket}")
    dst = ctrmig.migrator("podman", url=f"unix://{b.podman_socket}")
    name = unique()
    a.podman_cli("run", "-d", "--name", name, "--network", "none", images.TEST_IMAGE,
                 *COUNTER_CMD)
    wait_for(lambda: last_count(src.logs(name)) >= 3, what="counter on host A")
    env = {"CTRMIG_SSH_OPTIONS": " ".join(ssh_options),
           "CTRMIG_JOURNAL_DIR": str(tmp_path / "journal"),
           "CTRMIG_LOCK_DIR": str(tmp_path / "locks")}
    try:
        res = a.run([str(CTRMIG), "migrate", name, "--from",
                     f"podman+unix://{a.podman_socket}", "--to",
                     f"podman+ssh://root@{b.address}:{SSH_PORT}{b.podman_socket}"], env=env)
        assert res.returncode == 0, res.stderr.decode()
        logs = dst.logs(name)
        assert any(c.name == name and c.state == "running" for c in dst.list())
        wait_for(lambda: last_count(dst.logs(name)) > last_count(logs), what="counter on B")
        counts = [int(c) for c in logs.split("count=")[1:] if c.strip()]
        assert counts == list(range(counts[0], counts[-1] + 1))  # no restart from 1
        assert not src.exists(name)
        assert not list((tmp_path / "journal").glob("*.json"))
        # The API traffic went through B's sshd (its log), and ctrmig's ssh is gone.
        assert "Accepted publickey for root" in (b.root / "sshd.log").read_text()
        assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                    if str(b.podman_socket).encode() in _read(p) and b"ssh" in _read(p)]
    finally:
        src.close()
        dst.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@pytest.mark.runc
def test_every_file_ctrmig_creates_is_private(runc_state: RuncMigrator, test_image: str,
                                              tmp_path: Path, umask_022: None) -> None:
    """Under umask 022: runc's state, logs and CRIU image dirs, the lock, a journal, a
    spool and an extraction are all owner-only (the bundles' rootfs dirs aside: they are
    the container's own /; CRIU's image files are 0644 inside the 0700 dir)."""
    m = runc_state
    name = m.run(test_image, command=COUNTER_CMD)
    wait_for(lambda: last_count(m.logs(name)) >= 3, what="runc counter")
    archive = tmp_path / "r.tar"
    seen: dict[str, int] = {}
    lock_dir = tmp_path / "run" / "locks"
    previous = settings.use(settings.current().replace(lock_dir=lock_dir))
    try:
        with locks.container_lock("runc", "probe"):
            seen["lock dir"] = _mode(lock_dir)
            seen["lock file"] = _mode(locks.lock_path("runc", "probe"))
    finally:
        settings.use(previous)
    m.checkpoint(name, archive)  # stopped: its images are kept in the bundle
    seen["archive"] = _mode(archive)
    state = m.state_dir
    for sub in ("", "runc-root", "images", "bundles", "logs", "tmp"):
        seen[f"state/{sub}"] = _mode(state / sub)
    for log in (state / "logs").rglob("*"):
        seen[str(log.relative_to(state))] = _mode(log)
    # CRIU writes its images itself, under its own umask: the directory ctrmig made for
    # them (0700 before CRIU starts) is what keeps them private.
    kept = list((state / "bundles").glob("*/checkpoint*"))
    assert kept and all(any(f.name.startswith("pages-") for f in d.iterdir()) for d in kept)
    for images_dir in kept:
        seen[str(images_dir.relative_to(state))] = _mode(images_dir)
    with archive.open("rb") as f, spooled(f) as (spool, _):
        seen["spool"] = _mode(spool)
    with extracted(archive) as (root, _):
        seen["extraction"] = _mode(root)
        for path in root.rglob("*"):
            seen[f"extracted {path.relative_to(root)}"] = _mode(path)
    journal = Journal(tmp_path / "state" / "migrations", {"container": name})
    journal.phase("migrating")
    seen["journal dir"], seen["journal"] = _mode(journal.path.parent), _mode(journal.path)
    journal.close()
    assert len(seen) > 12 and any("logs/" in k for k in seen)
    bad = {k: oct(v) for k, v in seen.items() if v & 0o077}
    assert not bad, f"readable by others: {bad}"
