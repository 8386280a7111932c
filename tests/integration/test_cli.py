"""The ``ctrmig`` command line against real engines: every command and its exit codes.

Most tests drive the CLI in-process with click's CliRunner; one runs the installed
``ctrmig`` script. Every container a test starts is recorded and removed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner, Result

import ctrmig
from ctrmig import cli
from tests.conftest import COUNTER_CMD, first_count, last_count, unique, wait_for

pytestmark = pytest.mark.cli

CTRMIG = Path(sys.executable).with_name("ctrmig")
DEAD = "unix:///run/ctrmig-test/no-such-daemon.sock"


def ctrmig_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.cli, list(args), env=env)


@pytest.fixture
def podman_env(podman_socket: Path) -> dict[str, str]:
    """The CLI's environment: our podman service, and no docker daemon."""
    return {"CTRMIG_PODMAN_URL": f"unix://{podman_socket}", "DOCKER_HOST": DEAD,
            "CTRMIG_ENGINE": ""}


def test_podman_checkpoint_inspect_restore(podman_counter: Callable[[], str],
                                          podman_env: dict[str, str], tmp_path: Path) -> None:
    name = podman_counter()
    archive = tmp_path / "c.ckpt.tar"

    # The engine is detected: the only reachable engine holding the container.
    res = ctrmig_cli("checkpoint", name, "-o", str(archive), env=podman_env)
    assert res.exit_code == 0, res.output
    assert f"checkpointed podman container {name}" in res.output

    res = ctrmig_cli("inspect", "--json", str(archive))
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["engine"] == "podman"
    assert data["container"]["name"] == name
    assert data["checksums"] == "ok"
    assert 1 in data["pids"]
    assert data["sizes"]["memory_bytes"] > 0
    assert data["criu_version"]
    assert data["privileges"] == []  # an ordinary container, its CRIU images included

    res = ctrmig_cli("inspect", str(archive))
    assert res.exit_code == 0, res.output
    assert name in res.output and "checksums" in res.output
    assert re.search(r"privileges\s+none", res.output)

    # The engine of a restore comes from the archive's manifest.
    new = f"{name}-restored"
    res = ctrmig_cli("restore", str(archive), "--name", new, env=podman_env)
    assert res.exit_code == 0, res.output
    assert f"restored podman container {new}" in res.output
    m = ctrmig.migrator("podman", url=podman_env["CTRMIG_PODMAN_URL"])
    try:
        stopped_at = last_count(m.logs(name))
        wait_for(lambda: last_count(m.logs(new)) > stopped_at + 3, what="restored counter")
        assert first_count(m.logs(new).split(f"count={stopped_at}\n", 1)[-1]) == stopped_at + 1
    finally:
        m.close()

    res = ctrmig_cli("ls", "--engine", "podman", env=podman_env)
    assert res.exit_code == 0, res.output
    assert new in res.output

    # The name is now taken: exit 1, one clear line and a hint.
    res = ctrmig_cli("restore", str(archive), "--name", new, env=podman_env)
    assert res.exit_code == 1
    assert res.output.splitlines()[0].startswith("ctrmig: error: ")
    assert "already exists" in res.output
    assert res.output.splitlines()[1].startswith("hint: ")


def test_missing_container(podman_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "x.tar"
    res = ctrmig_cli("checkpoint", "no-such-container-xyz", "-o", str(out), env=podman_env)
    assert res.exit_code == 1
    assert res.output.startswith("ctrmig: error: no reachable engine holds a container")
    res = ctrmig_cli("checkpoint", "no-such-container-xyz", "-o", str(out),
                     "--engine", "podman", env=podman_env)
    assert res.exit_code == 1
    assert res.output.startswith("ctrmig: error: ")
    assert not out.exists()


def test_restore_refuses_another_engines_archive(podman_counter: Callable[[], str],
                                                 podman_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    name = podman_counter()
    archive = tmp_path / "c.tar"
    assert ctrmig_cli("checkpoint", name, "-o", str(archive), "--engine", "podman",
                      "--compress", "none", env=podman_env).exit_code == 0
    res = ctrmig_cli("restore", str(archive), "--engine", "process")
    assert res.exit_code == 1
    assert "archive was written by 'podman'" in res.output
    assert "hint: restore it with --engine podman" in res.output


def test_ls_reports_unreachable_engines(podman_env: dict[str, str]) -> None:
    res = ctrmig_cli("ls", env=podman_env)
    assert res.exit_code == 0, res.output
    assert "unreachable" in res.output  # docker: DOCKER_HOST points at nothing
    res = ctrmig_cli("ls", "--engine", "docker", "--url", DEAD)
    assert res.exit_code == 1
    assert "unreachable" in res.output


def test_doctor_json_podman(podman_socket: Path) -> None:
    res = ctrmig_cli("doctor", "--json", "--engine", "podman",
                     "--podman-url", f"unix://{podman_socket}")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["ok"] is True
    assert data["engines"] == {"podman": True}
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["criu check"]["status"] == "pass"
    assert checks["podman runtime"]["status"] == "pass"
    assert {c["status"] for c in data["checks"]} <= {"pass", "fail", "unavailable"}
    # This kernel has no soft-dirty tracking: reported, but not an error.
    assert checks["memory tracking (soft-dirty)"]["status"] in ("pass", "unavailable")


def test_doctor_unreachable_docker_fails() -> None:
    res = ctrmig_cli("doctor", "--json", "--engine", "docker", "--docker-url", DEAD)
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["engines"] == {"docker": False}
    failed = [c for c in data["checks"] if c["status"] == "fail"]
    assert failed and failed[0]["name"] == "docker daemon" and failed[0]["fix"]
    res = ctrmig_cli("doctor", "--engine", "docker", "--docker-url", DEAD)
    assert res.exit_code == 1
    assert "docker: not usable" in res.output


def test_doctor_json_docker(dockerd_socket: Path) -> None:
    res = ctrmig_cli("doctor", "--json", "--engine", "docker",
                     "--docker-url", f"unix://{dockerd_socket}")
    assert res.exit_code == 0, res.output
    checks = {c["name"]: c["status"] for c in json.loads(res.output)["checks"]}
    assert checks["docker experimental"] == "pass"


def test_docker_checkpoint_restore(dockerd_socket: Path, test_image: str,
                                   tmp_path: Path) -> None:
    url = f"unix://{dockerd_socket}"
    client = docker.DockerClient(base_url=url, timeout=120)
    name = unique("ctrmig-cli-dk")
    new = f"{name}-restored"
    try:
        client.containers.run(test_image, COUNTER_CMD, name=name, detach=True)
        m = ctrmig.migrator("docker", base_url=url)
        wait_for(lambda: last_count(m.logs(name)) >= 5, what="docker counter")
        archive = tmp_path / "dk.tar"
        res = ctrmig_cli("checkpoint", name, "-o", str(archive), "--engine", "docker",
                         "--url", url)
        assert res.exit_code == 0, res.output
        res = ctrmig_cli("restore", str(archive), "--name", new, "--url", url)
        assert res.exit_code == 0, res.output
        stopped_at = last_count(m.logs(name))
        wait_for(lambda: last_count(m.logs(new)) > stopped_at, what="restored docker counter")
        m.close()
    finally:
        for n in (name, new):
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(n).remove(force=True)
        client.close()


@pytest.mark.runc
def test_runc_checkpoint_restore(test_image: str, tmp_path: Path) -> None:
    # The CLI uses the runc engine's default state dir, so this test does too.
    m = ctrmig.migrator("runc")
    run = m.run  # type: ignore[attr-defined]
    name = unique("ctrmig-cli-runc")
    new = f"{name}-restored"
    try:
        run(test_image, name=name, command=COUNTER_CMD)
        wait_for(lambda: last_count(m.logs(name)) >= 5, what="runc counter")
        archive = tmp_path / "runc.tar"
        res = ctrmig_cli("checkpoint", name, "-o", str(archive), "--engine", "runc")
        assert res.exit_code == 0, res.output
        res = ctrmig_cli("restore", str(archive), "--name", new)
        assert res.exit_code == 0, res.output
        stopped_at = last_count(m.logs(name))
        wait_for(lambda: last_count(m.logs(new)) > stopped_at, what="restored runc counter")
    finally:
        m.remove(name)
        m.remove(new)
        m.close()


def test_service_status() -> None:
    res = ctrmig_cli("service", "status", "podman")
    assert res.exit_code in (0, 1)
    assert res.output.startswith("podman API service: ")


def test_service_start_stop(tmp_path: Path) -> None:
    """start/status/stop of the default podman service, with pidfiles in a private dir.

    If a service already answers on the default socket, ctrmig must leave it alone.
    """
    env = {**_script_env(), "CTRMIG_RUN_DIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CTRMIG), "service", *args, "podman"], capture_output=True,
                              text=True, timeout=120, env=env)

    was_running = run("status").returncode == 0
    start = run("start")
    assert start.returncode == 0, start.stderr
    if was_running:
        assert "already running" in start.stdout
        stop = run("stop")
        assert stop.returncode == 1
        assert "was not started by ctrmig" in stop.stderr
        assert run("status").returncode == 0
        return
    try:
        assert (tmp_path / "podman.pid").exists()
        assert run("status").returncode == 0
    finally:
        stop = run("stop")
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    assert run("status").returncode == 1
    assert not (tmp_path / "podman.pid").exists()


def _script_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def test_installed_script_exit_codes(podman_env: dict[str, str], tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CTRMIG), *args], capture_output=True, text=True,
                              timeout=120, env={**_script_env(), **podman_env})

    ok = run("--version")
    assert ok.returncode == 0 and ctrmig.__version__ in ok.stdout
    usage = run("checkpoint", "x", "-o", str(tmp_path / "x"), "--engine", "bogus")
    assert usage.returncode == 2
    failed = run("checkpoint", "no-such-container-xyz", "-o", str(tmp_path / "x"),
                 "--engine", "podman")
    assert failed.returncode == 1
    assert failed.stderr.startswith("ctrmig: error: ")
    assert len(failed.stderr.splitlines()) <= 2  # the error and its hint, no traceback
    assert failed.stdout == ""
