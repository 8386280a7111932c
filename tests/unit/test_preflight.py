"""Preflight's judgement (pure logic: fake engines, CRIU's answers stubbed) and the host
facts it reads from this machine's kernel (/proc, statvfs, a real socket)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import pytest

import ctrmig
from ctrmig.engines.remote import RemoteMigrator
from ctrmig.errors import ERROR_LINE, BusyError, OptionError, PreflightError
from ctrmig.host import criu, resources
from ctrmig.options import CheckpointOptions, RestoreOptions
from ctrmig.preflight import (
    Check,
    Facts,
    PreflightReport,
    answer,
    publish_ports,
    run,
    split_options,
    target_side,
)
from ctrmig.preflight import _ask as ask_remote
from ctrmig.protocol import ContainerInfo


class Fake:
    """An engine that answers from fixed sets."""

    engine = "fake"
    checkpoint_options: ClassVar[frozenset[str]] = frozenset()
    restore_options: ClassVar[frozenset[str]] = frozenset({"publish_ports", "lazy_pages"})
    needs_extracted = True

    def __init__(self, workdir: Path, *, images: tuple[str, ...] = ("img",),
                 names: tuple[str, ...] = (), busy: dict[str, str] | None = None):
        self.workdir, self.images, self.names, self.busy = workdir, images, names, busy or {}
        self.checkpointed = False

    def version(self) -> str:
        return "1.0"

    def has_image(self, ref: str) -> bool:
        return ref in self.images

    def exists(self, name: str) -> bool:
        return name in self.names

    def operations(self) -> dict[str, str]:
        return self.busy

    def list(self) -> list[ContainerInfo]:
        return [ContainerInfo(self.engine, n, n, "img", "running") for n in self.names]

    def checkpoint(self, *args: object, **kwargs: object) -> Any:
        self.checkpointed = True
        raise AssertionError("checkpoint must not run after a failed preflight")

    def close(self) -> None:
        pass


@pytest.fixture
def stub_criu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """CRIU's answers, as a test sets them."""
    said: dict[str, Any] = {"version": "4.2.1", "check": (True, "Looks good."),
                            "cpu": (True, ""), "lazy": True}
    monkeypatch.setattr(criu, "version", lambda: said["version"])
    monkeypatch.setattr(criu, "check", lambda: said["check"])
    monkeypatch.setattr(criu, "cpuinfo_check", lambda image: said["cpu"])
    monkeypatch.setattr(criu, "cpuinfo_dump", lambda: b"cpu")
    monkeypatch.setattr(criu, "lazy_pages_supported", lambda: said["lazy"])
    return said


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def good_facts(tmp_path: Path, port: int) -> Facts:
    (tmp_path / "data").mkdir(exist_ok=True)
    return Facts("fake", "web", found=True, name="web", image="img", memory_bytes=1 << 20,
                 rootfs_bytes=1 << 20, mounts=[("bind", str(tmp_path / "data"), "/data")],
                 ports=[(port, "tcp", "")], privileges=[], criu_version="4.2.1",
                 cpuinfo="Y3B1", host="elsewhere")


def judge(m: Fake, facts: Facts, *, local: bool = True, **opts: Any) -> dict[str, Check]:
    ckpt, rest = split_options(None, None, opts)
    checks = target_side(m, facts, ckpt, dataclasses.replace(rest, name=rest.name or "web"),
                         local=local)  # type: ignore[arg-type]
    return {c.name: c for c in checks}


def test_a_good_target_passes_every_check(tmp_path: Path, stub_criu: dict[str, Any],
                                          free_port: int) -> None:
    checks = judge(Fake(tmp_path), good_facts(tmp_path, free_port))
    assert list(checks) == ["engine", "criu", "criu check", "cpu", "kernel features",
                            "options", "image", "mounts", "ports", "name", "space",
                            "privileges"]
    assert {c.status for c in checks.values()} == {"pass"}, checks


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


# Each refusal: how the facts, options or CRIU's answers differ from a good target, the
# check that must fail, and a word its detail must hold.
REFUSALS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str, str]] = [
    ("no image", {}, {"include_image": False}, {}, "image", "not on this fake host"),
    ("name taken", {}, {"name": "taken"}, {}, "name", "already has a container"),
    ("name busy", {}, {"name": "busy"}, {}, "name", "another ctrmig is restoring"),
    ("bind missing", {"mounts": [("bind", "/nonexistent/ctrmig-pf", "/x")]}, {}, {},
     "mounts", "/nonexistent/ctrmig-pf"),
    ("too big", {"memory_bytes": 1 << 60}, {}, {}, "space", "not enough free space"),
    ("privileged", {"privileges": [("host path", "/srv at /srv")]}, {}, {}, "privileges",
     "host path /srv at /srv"),
    ("other engine", {"engine": "other"}, {}, {}, "engine", "restores only on other"),
    ("old criu", {"criu_version": "4.10"}, {}, {}, "criu", "older than the source's 4.10"),
    ("criu check", {}, {}, {"check": (False, "vdso: bad")}, "criu check", "vdso"),
    ("other cpu", {}, {}, {"cpu": (False, "CPU instruction capabilities do not match")},
     "cpu", "SIGILL"),
    ("no uffd", {}, {"lazy_pages": True}, {"lazy": False}, "kernel features", "lazy pages"),
    ("option", {}, {"file_locks": True}, {}, "options", "file_locks"),
]


@pytest.mark.parametrize(("case", "facts_", "opts", "said", "failed", "word"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_each_refusal_fails_its_check_alone(
        tmp_path: Path, stub_criu: dict[str, Any], free_port: int, case: str,
        facts_: dict[str, Any], opts: dict[str, Any], said: dict[str, Any], failed: str,
        word: str) -> None:
    stub_criu.update(said)
    facts = dataclasses.replace(good_facts(tmp_path, free_port), **facts_)
    m = Fake(tmp_path, images=(), names=("taken",), busy={"busy": "restoring"})
    checks = judge(m, facts, include_image=opts.pop("include_image", True), **opts)
    fails = [n for n, c in checks.items() if c.status == "fail"]
    assert fails == [failed], checks
    assert word in checks[failed].detail, checks[failed]
    assert checks[failed].fix


def test_a_port_in_use_is_found_by_binding_it(tmp_path: Path, stub_criu: dict[str, Any],
                                              listener: int) -> None:
    checks = judge(Fake(tmp_path), good_facts(tmp_path, listener))
    assert checks["ports"].status == "fail" and "in use" in checks["ports"].detail
    # --publish replaces the container's own ports (podman's semantics).
    checks = judge(Fake(tmp_path), good_facts(tmp_path, listener), publish_ports=["1:80"])
    assert checks["ports"].status == "pass" and "1/tcp" in checks["ports"].detail


def test_the_sources_own_ports_on_the_same_host_are_freed_by_it(
        tmp_path: Path, stub_criu: dict[str, Any], listener: int) -> None:
    facts = dataclasses.replace(good_facts(tmp_path, listener), host=resources.host_key())
    assert judge(Fake(tmp_path), facts)["ports"].status == "pass"


def test_the_image_is_carried_when_the_target_lacks_it(
        tmp_path: Path, stub_criu: dict[str, Any], free_port: int) -> None:
    facts = dataclasses.replace(good_facts(tmp_path, free_port), carries_images=True)
    check = judge(Fake(tmp_path, images=()), facts)["image"]
    assert check.status == "pass" and "carries it" in check.detail
    facts.carries_images = False  # the default, from an engine that cannot carry it
    check = judge(Fake(tmp_path, images=()), facts)["image"]
    assert check.status == "fail" and "cannot carry it" in check.detail


def test_over_an_api_what_only_the_host_knows_is_unavailable(
        tmp_path: Path, stub_criu: dict[str, Any], free_port: int) -> None:
    checks = judge(Fake(tmp_path), good_facts(tmp_path, free_port), local=False)
    unavailable = {n for n, c in checks.items() if c.status == "unavailable"}
    assert unavailable == {"criu", "criu check", "cpu", "kernel features", "mounts", "ports"}
    assert "fail" not in {c.status for c in checks.values()}


def test_the_report_and_its_error_list_every_failure() -> None:
    report = PreflightReport("web", "podman", "podman+ssh://b", [
        Check("target", "image", "fail", "image x is not on this podman host", "load it"),
        Check("target", "cpu", "unavailable", "not told"),
        Check("target", "name", "fail", "already has a container named 'web'", "rename"),
        Check("source", "criu", "pass", "version 4.2.1"),
    ])
    assert not report.ok and [c.name for c in report.failures] == ["image", "name"]
    err = report.error()
    assert isinstance(err, PreflightError) and err.report is report
    assert "2 check(s) failed before anything was frozen" in err.message
    assert "target image: image x is not on this" in err.message
    assert "target name: already has" in err.message
    assert err.hint == "load it; rename" and len(err.failures) == 2
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False
    assert PreflightReport("web", "a", "b", [report.checks[1]]).ok  # unavailable is no failure


def test_options_split_between_checkpoint_and_restore() -> None:
    ckpt, rest = split_options({"keep": True}, None, {
        "tcp_established": True, "include_image": False, "publish_ports": ["8080:80"]})
    assert ckpt == CheckpointOptions(keep=True, tcp_established=True, include_image=False)
    assert rest == RestoreOptions(tcp_established=True, publish_ports=("8080:80",))
    with pytest.raises(OptionError, match="unknown"):
        split_options(None, None, {"no_such": True})
    with pytest.raises(OptionError, match="unknown"):
        split_options({"no_such": True}, None, {})


def test_publish_specs_name_their_host_ports() -> None:
    assert publish_ports(("8080:80", "127.0.0.1:53:53/udp", "80", "8000-8002:80-82",
                          ":90")) == [
        (8080, "tcp", ""), (53, "udp", "127.0.0.1"), (8000, "tcp", ""), (8001, "tcp", ""),
        (8002, "tcp", "")]


def test_facts_and_checks_cross_ssh_as_json(tmp_path: Path, stub_criu: dict[str, Any],
                                            free_port: int) -> None:
    facts = good_facts(tmp_path, free_port)
    assert Facts.from_dict(json.loads(json.dumps(asdict(facts)))) == facts
    request = {"facts": asdict(facts), "checkpoint_options": {"include_image": True},
               "restore_options": {"name": "web"}}
    got = answer(Fake(tmp_path), "target", None, json.loads(json.dumps(request)))
    assert {Check(**c).status for c in got["checks"]} == {"pass"}


def _answered(monkeypatch: pytest.MonkeyPatch, code: int, out: bytes = b"",
              err: bytes = b"") -> list[Check]:
    m = RemoteMigrator("podman", "ssh://root@host-b")
    monkeypatch.setattr(m, "call", lambda *a, **k: subprocess.CompletedProcess(
        a, code, out, err))
    checks: list[Check] = ask_remote(m, "target", {})["checks"]
    return checks


def test_ssh_and_the_remote_ctrmig_are_checks_of_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ssh = _answered(monkeypatch, 255, err=b"ssh: connect to host host-b: No route to host")
    assert [(c.name, c.status) for c in ssh] == [("ssh", "fail")]
    assert "No route to host" in ssh[0].detail
    missing = _answered(monkeypatch, 127, err=b"sh: 1: ctrmig: not found")
    assert [(c.name, c.status) for c in missing] == [("ssh", "pass"), ("ctrmig", "fail")]
    assert "install ctrmig" in missing[1].fix
    old = _answered(monkeypatch, 2, err=b"Error: No such command 'preflight'.")
    assert old[1].name == "ctrmig" and "update ctrmig there" in old[1].fix
    engine = _answered(monkeypatch, 1, err=ERROR_LINE.encode() + json.dumps(
        {"type": "EngineUnavailableError", "message": "podman is down", "hint": "start it"}
    ).encode())
    assert (engine[1].status, engine[1].fix) == ("fail", "start it")
    assert "podman is down" in engine[1].detail
    with pytest.raises(BusyError, match="busy"):  # as from a local source: no judgement
        _answered(monkeypatch, 1, err=ERROR_LINE.encode() + json.dumps(
            {"type": "BusyError", "message": "web is busy", "hint": "wait"}).encode())
    good = json.dumps({"checks": [asdict(Check("target", "name", "pass", "free"))]})
    assert [c.name for c in _answered(monkeypatch, 0, good.encode())] == ["ssh", "name"]


def test_an_ssh_source_hands_its_facts_to_the_target(
        tmp_path: Path, stub_criu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """ctrmig on the source host answers with its facts; the target judges them here."""
    remote = RemoteMigrator("fake", "ssh://root@host-a")

    def call(*args: str, input: bytes) -> subprocess.CompletedProcess[bytes]:
        assert args == ("preflight", "source", "web")
        out = answer(Fake(tmp_path, names=("web",)), "source", "web", json.loads(input))
        return subprocess.CompletedProcess(args, 0, json.dumps(out).encode(), b"")

    monkeypatch.setattr(remote, "call", call)
    report = run("web", remote, Fake(tmp_path, names=("web",)),  # type: ignore[arg-type]
                 CheckpointOptions(), RestoreOptions(name="web"))
    assert [(c.host, c.name) for c in report.checks[:2]] == [("source", "ssh"),
                                                             ("source", "criu")]
    assert [c.name for c in report.failures] == ["name"]  # judged on the source's facts
    assert report.source == "fake+ssh://root@host-a"


def test_migrate_refuses_before_the_source_is_touched(
        tmp_path: Path, stub_criu: dict[str, Any]) -> None:
    source = Fake(tmp_path, names=("web",))
    target = Fake(tmp_path, names=("web",))  # the name is taken there
    with pytest.raises(PreflightError, match="already has a container named 'web'") as e:
        ctrmig.migrate("web", source=source, target=target)  # type: ignore[arg-type]
    assert "pick another name" in (e.value.hint or "")
    assert not source.checkpointed


# --- what this host tells -------------------------------------------------------------------


def test_host_facts_from_this_machine(tmp_path: Path, listener: int) -> None:
    assert resources.port_taken(listener) == "in use"
    where, free = resources.free_bytes(tmp_path / "not" / "yet")
    assert where == tmp_path and free > 0
    assert resources.memory_bytes([os.getpid()]) > 1 << 20
    assert resources.creds(os.getpid()).uid == os.getuid()
    assert resources.sharing_mounts(os.getpid()) == [os.getpid()]  # the host's namespace
    assert resources.host_key() == resources.host_key()
    (tmp_path / "f").write_bytes(b"x" * 10000)
    assert resources.dir_bytes(tmp_path) >= 10000


def test_criu_versions_compare_as_numbers() -> None:
    assert criu.version_key("4.2.1") < criu.version_key("4.10")
    assert criu.version_key("3.17.1 (gitid 0)") == (3, 17, 1)
    assert criu.version_key("") == ()
