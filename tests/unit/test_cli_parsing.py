"""The CLI without engines: help, usage errors (exit 2), failures (exit 1), inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import ctrmig
from ctrmig import cli
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest
from ctrmig.errors import CommandError

COMMANDS = sorted(cli.cli.commands)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small archive the way an engine writes one (no engine involved)."""
    path = tmp_path / "web.ckpt.tar"
    with path.open("wb") as out:
        w = ArchiveWriter(out, "zstd")
        w.add_bytes("checkpoint/core-1.img", b"core")
        w.add_bytes("checkpoint/core-7.img", b"core")
        w.add_bytes("checkpoint/pages-1.img", b"p" * 4096)
        w.add_bytes("rootfs-diff.tar", b"r" * 1024)
        w.finish(Manifest(engine="podman", container=ContainerRecord(
            "web", id="abc123", image="localhost/web:1", command=["/bin/sh"])))
    return path


def test_help_on_every_command(runner: CliRunner) -> None:
    for args in ([], *[[c] for c in COMMANDS]):
        result = runner.invoke(cli.cli, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli.cli, ["--version"])
    assert result.exit_code == 0
    assert ctrmig.__version__ in result.output


@pytest.mark.parametrize("args", [
    ["checkpoint", "web"],  # no -o
    ["checkpoint", "web", "-o", "x.tar", "--engine", "bogus"],
    ["checkpoint", "web", "-o", "x.tar", "--compress", "lzma"],
    ["restore"],
    ["restore", "x.tar", "--no-such-option"],
    ["service", "start", "containerd"],
    ["service", "reload", "podman"],
    ["demo", "--engine", "process"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(runner: CliRunner, args: list[str]) -> None:
    assert runner.invoke(cli.cli, args).exit_code == 2


def test_engine_from_environment_is_checked(runner: CliRunner) -> None:
    result = runner.invoke(cli.cli, ["ls"], env={"CTRMIG_ENGINE": "bogus"})
    assert result.exit_code == 2


def test_missing_archive_is_one_clear_line(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.cli, ["restore", str(tmp_path / "nope.tar")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"ctrmig: error: archive not found: "
                                          f"{tmp_path / 'nope.tar'}"]


def test_garbage_archive(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    result = runner.invoke(cli.cli, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("ctrmig: error: ")


def test_inspect_json(runner: CliRunner, archive: Path) -> None:
    result = runner.invoke(cli.cli, ["inspect", "--json", str(archive)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["engine"] == "podman"
    assert data["container"]["name"] == "web"
    assert data["checksums"] == "ok"
    assert data["pids"] == [1, 7]
    assert data["sizes"]["memory_bytes"] == 4096
    assert data["sizes"]["rootfs_diff_bytes"] == 1024
    assert set(data["files"]) == {"checkpoint/core-1.img", "checkpoint/core-7.img",
                                  "checkpoint/pages-1.img", "rootfs-diff.tar"}


def test_inspect_table(runner: CliRunner, archive: Path) -> None:
    result = runner.invoke(cli.cli, ["inspect", str(archive)])
    assert result.exit_code == 0, result.output
    for text in ("podman", "web (abc123)", "localhost/web:1", "pid 1, pid 7", "checksums",
                 "ok", "checkpoint/pages-1.img", "4.0 KiB"):
        assert text in result.output


def test_inspect_reports_a_checksum_failure(runner: CliRunner, tmp_path: Path,
                                            archive: Path) -> None:
    # Same manifest, different content in one member: an uncompressed copy is easiest.
    import tarfile

    from ctrmig.archive.reader import decompressed

    plain = tmp_path / "plain.tar"
    with archive.open("rb") as raw, plain.open("wb") as out:
        out.write(decompressed(raw)[0].read())
    data = bytearray(plain.read_bytes())
    with tarfile.open(plain) as tar:
        member = tar.getmember("checkpoint/pages-1.img")
        offset = member.offset_data
    data[offset] ^= 0xFF
    plain.write_bytes(bytes(data))
    result = runner.invoke(cli.cli, ["inspect", "--json", str(plain)])
    assert result.exit_code == 1
    assert "sha256" in json.loads(result.output)["checksums"]


def test_error_hint_and_stderr_only_with_verbose(runner: CliRunner, archive: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a: object, **_k: object) -> None:
        raise CommandError("criu restore failed (exit 1)", stderr="Error (criu/cr-restore.c)",
                           hint="see the CRIU log")

    monkeypatch.setattr(ctrmig, "inspect", fail)
    quiet = runner.invoke(cli.cli, ["restore", str(archive)])
    assert quiet.exit_code == 1
    assert quiet.output.splitlines() == ["ctrmig: error: criu restore failed (exit 1)",
                                         "hint: see the CRIU log"]
    loud = runner.invoke(cli.cli, ["-v", "restore", str(archive)])
    assert loud.exit_code == 1
    assert "Error (criu/cr-restore.c)" in loud.output


def test_engine_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.app, "_holders", lambda c, url: ["podman", "docker"])
    with pytest.raises(ctrmig.errors.OptionError, match="podman, docker"):
        cli.pick_engine(None, "web", None)
    monkeypatch.setattr(cli.app, "_holders", lambda c, url: [])
    with pytest.raises(ctrmig.errors.ContainerNotFoundError):
        cli.pick_engine(None, "web", None)
    monkeypatch.setattr(cli.app, "_holders", lambda c, url: ["runc"])
    assert cli.pick_engine(None, "web", None) == "runc"
    assert cli.pick_engine("docker", "web", None) == "docker"


def test_url_only_for_api_engines() -> None:
    with pytest.raises(ctrmig.errors.OptionError, match="--url"):
        cli.connect("runc", "unix:///tmp/x.sock")


def test_stale_pidfile_is_not_our_process() -> None:
    import os
    import sys

    assert cli._runs(os.getpid(), sys.executable)
    assert not cli._runs(os.getpid(), "dockerd")
    assert not cli._runs(2**22 + 1, "dockerd")  # above pid_max: no such process
