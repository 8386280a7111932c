"""The docker adapter against a private dockerd (fixture ``dockerd_socket``).

Every container a test creates is recorded and force-removed in teardown. Tests without
the fixture check the error paths that need no daemon (dead socket, retry predicate).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

import ctrmig
from ctrmig.engines.docker import DockerMigrator, rootfs
from ctrmig.engines.docker.config import create_body
from ctrmig.errors import (
    CheckpointError,
    EngineError,
    EngineUnavailableError,
    ImageNotFoundError,
    NameInUseError,
    OptionError,
    PrivilegeError,
    RestoreError,
    ToolMissingError,
)
from ctrmig.host import services
from tests.conftest import COUNTER_CMD, first_count, last_count, unique, wait_for

RACE = ("failed to upload checkpoint to containerd: commit failed: content "
        "sha256:0123abcd: already exists")


class Docker:
    """The migrator under test, a docker-py client, and what the test created."""

    def __init__(self, sock: Path, image: str):
        self.url = f"unix://{sock}"
        self.image = image
        self.m = DockerMigrator(self.url)
        self.api = docker.APIClient(base_url=self.url, timeout=120)
        self.names: list[str] = []
        self.images: list[str] = []

    def track(self, name: str) -> str:
        self.names.append(name)
        return name

    def counter(self, image: str | None = None, **kwargs: Any) -> str:
        """Start the counter workload; return its name once it has counted a bit."""
        name = self.track(unique("ctrmig-dk"))
        c = self.api.create_container(image or self.image, COUNTER_CMD, name=name, **kwargs)
        self.api.start(c["Id"])
        wait_for(lambda: last_count(self.m.logs(name)) >= 5, what=f"{name} counting")
        return name

    def state(self, name: str) -> str:
        return str(self.api.inspect_container(name)["State"]["Status"])

    def read(self, name: str, path: str) -> str:
        exec_id = self.api.exec_create(name, ["cat", path])
        return bytes(self.api.exec_start(exec_id)).decode()

    def assert_continues(self, name: str, before: int) -> None:
        """``name`` runs, holds /state.txt, and counts on from ``before`` (not from 1)."""
        assert self.state(name) == "running"
        wait_for(lambda: first_count(self.m.logs(name)) > 0, what=f"{name} output")
        after = first_count(self.m.logs(name))
        assert after > before, f"restored counter restarted: {after} <= {before}"
        assert self.read(name, "/state.txt") == "written-after-start\n"

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_container(name, force=True)
        for image in self.images:
            with contextlib.suppress(docker.errors.NotFound):
                self.api.remove_image(image)
        self.m.close()
        self.api.close()


@pytest.fixture
def dk(dockerd_socket: Path) -> Iterator[Docker]:
    d = Docker(dockerd_socket, "localhost/ctrmig-busybox:latest")
    yield d
    d.cleanup()


def checkpoint_count(dk: Docker, name: str, archive: Path, **options: Any) -> int:
    """Checkpoint ``name`` (it stops) and return the last count it printed."""
    dk.m.checkpoint(name, archive, **options)
    return last_count(dk.m.logs(name))


# --- the round trip ------------------------------------------------------------------------


def test_restore_right_after_checkpoint_rounds(
    dk: Docker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Provoke moby#42900 (start right after a checkpoint): the retry hides it."""
    caplog.set_level(logging.WARNING, logger="ctrmig.engines.docker")
    name = dk.counter()
    start = time.monotonic()
    for i in range(5):
        archive = tmp_path / f"round-{i}.tar"
        before = checkpoint_count(dk, name, archive, compression="none")
        dk.m.remove(name)
        name = dk.track(dk.m.restore(archive))
        dk.assert_continues(name, before)
    retries = [r for r in caplog.records if "moby#42900" in r.getMessage()]
    print(f"5 rounds in {time.monotonic() - start:.1f} s, {len(retries)} race retries")


def concurrent_restores(dk: Docker, archive: Path, count: int) -> tuple[list[str], float]:
    names = [dk.track(unique("ctrmig-dk-race")) for _ in range(count)]
    errors: list[BaseException] = []

    def restore(name: str) -> None:
        with DockerMigrator(dk.url) as m:
            try:
                m.restore(archive, name=name)
            except BaseException as e:  # reported below
                errors.append(e)

    start = time.monotonic()
    threads = [threading.Thread(target=restore, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return names, time.monotonic() - start


RACE_ROUNDS = 3


@pytest.mark.parametrize("unique_uploads", [False, True])
def test_concurrent_restores_of_one_archive(
    dk: Docker, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, unique_uploads: bool,
) -> None:
    """Starting several containers from identical checkpoint content at once reliably
    makes containerd answer "commit failed: content sha256:...: already exists"
    (moby#42900). With unique uploads off, that provokes the race and the bounded retry
    must absorb it; with them on (the default) the race should not even happen."""
    caplog.set_level(logging.WARNING, logger="ctrmig.engines.docker")
    monkeypatch.setattr(DockerMigrator, "unique_uploads", unique_uploads)
    src = dk.counter()
    archive = tmp_path / "race.tar"
    before = checkpoint_count(dk, src, archive, compression="none")
    # The race needs the restores to reach containerd together: on a loaded machine one
    # round of 4 missed it once in ~20 runs, so a round without it is repeated (bounded).
    for round_ in range(1, RACE_ROUNDS + 1):
        names, took = concurrent_restores(dk, archive, 4)
        retries = [r for r in caplog.records if "moby#42900" in r.getMessage()]
        print(f"unique_uploads={unique_uploads}, round {round_}: 4 concurrent restores "
              f"in {took:.1f} s, {len(retries)} race retries so far")
        for name in names:
            dk.assert_continues(name, before)
        if unique_uploads or retries:
            break
    if not unique_uploads:
        assert retries, (f"the race was not provoked in {RACE_ROUNDS} rounds: this test "
                         "proves nothing on this host")


def test_back_to_back_checkpoints(dk: Docker, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """A stopping checkpoint right after another one: without care, containerd refuses
    the second with "content ... already exists" after stopping the container (state
    lost, 6 times in 12 here). Each round must end with a usable archive."""
    caplog.set_level(logging.WARNING, logger="ctrmig.engines.docker")
    src = dk.counter()
    for i in range(4):
        dk.m.checkpoint(src, tmp_path / f"live-{i}.tar", leave_running=True,
                        compression="none")
        dk.m.checkpoint(src, tmp_path / f"stop-{i}.tar", compression="none")
        assert dk.state(src) == "exited"
        dk.m.resume(src)
    before = last_count(dk.m.logs(src))
    restored = dk.track(dk.m.restore(tmp_path / "stop-3.tar", name=unique("ctrmig-dk-b2b")))
    dk.assert_continues(restored, 1)
    assert before > 1
    print(f"{len([r for r in caplog.records if 'moby#42900' in r.getMessage()])} retries")


def test_back_to_back_running_checkpoints_retry(
    dk: Docker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the wait for containerd's garbage collection, a container left running is
    safe to checkpoint again: the race is retried."""
    caplog.set_level(logging.WARNING, logger="ctrmig.engines.docker")
    monkeypatch.setattr(dk.m.checkpoints, "wait_for_content_gc", lambda: None)
    src = dk.counter()
    for i in range(6):
        dk.m.checkpoint(src, tmp_path / f"live-{i}.tar", leave_running=True,
                        compression="none")
        assert dk.state(src) == "running"
    print(f"{len([r for r in caplog.records if 'moby#42900' in r.getMessage()])} retries")


def test_leave_running_and_keep(dk: Docker, tmp_path: Path) -> None:
    src = dk.counter()
    dk.m.checkpoint(src, tmp_path / "live0.tar", leave_running=True)
    assert dk.state(src) == "running"
    assert dk.m.api.checkpoint_names(src) == []  # a running container needs no checkpoint
    dk.m.checkpoint(src, tmp_path / "live.tar", leave_running=True, keep=True)
    assert dk.state(src) == "running"
    kept = dk.api.get(dk.api._url("/containers/{0}/checkpoints", src)).json()
    assert [c["Name"] for c in kept] and kept[0]["Name"].startswith("ctrmig-")
    with pytest.raises(CheckpointError, match="running"):
        dk.m.resume(src)  # nothing to resume
    restored = dk.track(dk.m.restore(tmp_path / "live.tar", name=unique("ctrmig-dk-live")))
    assert dk.state(restored) == "running"


def test_rootfs_deletion_travels(dk: Docker, tmp_path: Path) -> None:
    name = dk.track(unique("ctrmig-dk-rm"))
    cmd = ["/bin/sh", "-c", "rm /bin/vi; mkdir -p /new/dir; echo x > /new/dir/f; "
           "while true; do sleep 0.1; done"]
    dk.api.start(dk.api.create_container(dk.image, cmd, name=name)["Id"])
    wait_for(lambda: dk.api.diff(name), what="the filesystem change")
    time.sleep(0.5)
    result = dk.m.checkpoint(name, tmp_path / "rm.tar")
    files = result.manifest.files
    assert any(p.startswith("checkpoint/pages-") for p in files)
    assert {"config.dump", "rootfs-diff.tar", "deleted.files", "spec.dump"} <= set(files)
    assert result.manifest.extra["rootfs"]["changed"] >= 1
    # the stopped source keeps docker's checkpoint, for resume
    assert [n for n in dk.m.api.checkpoint_names(name) if n.startswith("ctrmig-")]
    restored = dk.track(dk.m.restore(tmp_path / "rm.tar", name=unique("ctrmig-dk-rm2")))
    assert "No such file" in dk.read(restored, "/bin/vi")
    assert dk.read(restored, "/new/dir/f") == "x\n"


def test_publish_ports_replace_the_recorded_ones(dk: Docker, tmp_path: Path) -> None:
    src = dk.counter()
    dk.m.checkpoint(src, tmp_path / "p.tar")
    restored = dk.track(dk.m.restore(tmp_path / "p.tar", name=unique("ctrmig-dk-port"),
                                     publish_ports=["127.0.0.1:18080:80"]))
    bindings = dk.api.inspect_container(restored)["HostConfig"]["PortBindings"]
    assert bindings == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18080"}]}
    assert dk.state(restored) == "running"


def test_rootfs_through_the_archive_api(dk: Docker, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a local overlay2 layer the changed files come through GET /archive."""
    monkeypatch.setattr(rootfs, "upper_dir", lambda d: None)
    name = dk.track(unique("ctrmig-dk-api"))
    cmd = ["/bin/sh", "-c", "mkdir -p /new/dir; echo x > /new/dir/f; ln -s f /new/dir/l; "
           "echo y > /etc/added; while true; do sleep 0.1; done"]
    dk.api.start(dk.api.create_container(dk.image, cmd, name=name)["Id"])
    wait_for(lambda: len(dk.api.diff(name) or []) >= 5, what="the filesystem changes")
    result = dk.m.checkpoint(name, tmp_path / "api.tar")
    assert result.manifest.extra["rootfs"]["method"] == "archive-api"
    restored = dk.track(dk.m.restore(tmp_path / "api.tar", name=unique("ctrmig-dk-api2")))
    assert dk.read(restored, "/new/dir/l") == "x\n"
    assert dk.read(restored, "/etc/added") == "y\n"


def test_failed_rollback_keeps_dockers_checkpoint(
    dk: Docker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the container cannot be brought back, its checkpoint is the only copy: kept."""
    src = dk.counter()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    def no_start(cid: str, name: str) -> None:
        raise RestoreError("start failed", stderr="criu failed: type NOTIFY errno 0")

    monkeypatch.setattr(rootfs, "write_diff", broken)
    monkeypatch.setattr(dk.m.api, "start_from", no_start)
    with pytest.raises(OSError):
        dk.m.checkpoint(src, tmp_path / "x.tar")
    assert dk.state(src) == "exited"
    kept = dk.api.get(dk.api._url("/containers/{0}/checkpoints", src)).json()
    assert len(kept) == 1
    # and it really is enough to bring the container back
    monkeypatch.undo()
    dk.m.resume(src)
    assert dk.state(src) == "running"
    assert dk.m.api.checkpoint_names(src) == []


# --- errors with a daemon ------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["rootfs", "manifest"])
def test_failed_checkpoint_brings_the_container_back(
    dk: Docker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A failure after dockerd stopped the container restarts it from the checkpoint."""
    src = dk.counter()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if stage == "rootfs":
        monkeypatch.setattr(rootfs, "write_diff", broken)
    else:
        monkeypatch.setattr(dk.m, "criu_version", broken)
    with pytest.raises(OSError):
        dk.m.checkpoint(src, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
    assert not (tmp_path / "x.tar.partial").exists()
    assert dk.state(src) == "running"
    # it came back from the checkpoint, counting on; docker's checkpoint is gone again
    count = last_count(dk.m.logs(src))
    wait_for(lambda: last_count(dk.m.logs(src)) > count, what="counting after rollback")
    assert dk.m.logs(src).splitlines().count("count=1") == 1  # not started afresh
    assert dk.api.get(dk.api._url("/containers/{0}/checkpoints", src)).json() in ([], None)


def test_refuses_stopped_and_auto_removed_containers(dk: Docker, tmp_path: Path) -> None:
    stopped = dk.track(unique("ctrmig-dk-stopped"))
    dk.api.create_container(dk.image, COUNTER_CMD, name=stopped)
    with pytest.raises(CheckpointError, match="not running"):
        dk.m.checkpoint(stopped, tmp_path / "s.tar")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        dk.m.resume(stopped)  # stopped, but not by a checkpoint
    auto = dk.counter(host_config=dk.api.create_host_config(auto_remove=True))
    with pytest.raises(CheckpointError, match="--rm") as err:
        dk.m.checkpoint(auto, tmp_path / "a.tar")
    assert err.value.hint and "leave_running" in err.value.hint
    assert dk.state(auto) == "running"
    assert not (tmp_path / "s.tar").exists() and not (tmp_path / "a.tar").exists()


def test_missing_image_is_named(dk: Docker, tmp_path: Path) -> None:
    tag = f"localhost/{unique('ctrmig-gone')}:latest"
    dk.api.tag(dk.image, tag)
    dk.images.append(tag)
    src = dk.counter(image=tag)
    dk.m.checkpoint(src, tmp_path / "img.tar")
    dk.m.remove(src)
    dk.api.remove_image(tag)
    before = {c.name for c in dk.m.list()}
    with pytest.raises(ImageNotFoundError, match=tag):
        dk.m.restore(tmp_path / "img.tar")
    assert {c.name for c in dk.m.list()} == before  # nothing half-made


def test_privileged_archive_refused(dk: Docker, tmp_path: Path) -> None:
    name = dk.track(unique("ctrmig-dk-cap"))
    dk.api.start(dk.api.create_container(
        dk.image, COUNTER_CMD, name=name,
        host_config=dk.api.create_host_config(cap_add=["SYS_ADMIN"]),
    )["Id"])
    wait_for(lambda: last_count(dk.m.logs(name)) >= 2, what="counting")
    dk.m.checkpoint(name, tmp_path / "cap.tar")
    with pytest.raises(PrivilegeError, match="SYS_ADMIN"):
        dk.m.restore(tmp_path / "cap.tar", name=unique("ctrmig-dk-cap2"))
    restored = dk.track(dk.m.restore(tmp_path / "cap.tar", name=unique("ctrmig-dk-cap3"),
                                     allow_privileged=True))
    assert dk.state(restored) == "running"


def test_version_and_list(dk: Docker) -> None:
    name = dk.counter()
    assert dk.m.version()[0].isdigit()
    assert name in {c.name for c in dk.m.list()}
    via_registry = ctrmig.migrator("docker", base_url=dk.url)
    assert via_registry.exists(name)
    via_registry.close()


@contextlib.contextmanager
def _private_dockerd(run_dir: Path, tag: str, *, experimental: bool = True) -> Iterator[Path]:
    """A private dockerd (own data root, no bridge) on ``run_dir/tag.sock``, removed after."""
    sock = run_dir / f"{tag}.sock"
    data_root = Path(f"/var/lib/ctrmig-test/{tag}")
    svc = services.dockerd_service(sock, data_root=data_root, exec_root=run_dir / f"{tag}-exec",
                                   state_dir=run_dir, bridge="none", experimental=experimental)
    svc.start()
    try:
        yield sock
    finally:
        svc.stop()
        shutil.rmtree(data_root, ignore_errors=True)
        shutil.rmtree(run_dir / f"{tag}-exec", ignore_errors=True)
        sock.unlink(missing_ok=True)
        (run_dir / f"{tag}.daemon.json").unlink(missing_ok=True)


@pytest.fixture
def plain_dockerd(dockerd_socket: Path) -> Iterator[str]:
    """A second private dockerd with experimental features off (a few seconds)."""
    with _private_dockerd(dockerd_socket.parent, f"dockerd-plain-{os.getpid()}",
                          experimental=False) as sock:
        yield f"unix://{sock}"



def _load_test_image(url: str, session_dir: Path) -> None:
    client = docker.APIClient(base_url=url, timeout=300)
    with (session_dir / "test-image.tar").open("rb") as f:
        for _ in client.load_image(f):
            pass
    client.close()


def test_experimental_off_on_a_real_daemon(dk: Docker, plain_dockerd: str,
                                           tmp_path: Path, session_dir: Path) -> None:
    src = dk.counter()
    dk.m.checkpoint(src, tmp_path / "e.tar")
    with DockerMigrator(plain_dockerd) as plain:
        with pytest.raises(EngineError, match="experimental") as err:
            plain.restore(tmp_path / "e.tar")
        assert err.value.hint and "daemon.json" in err.value.hint
        assert plain.list() == []
        # resume asks the daemon's state (/info), not the words of a refused call
        _load_test_image(plain_dockerd, session_dir)
        other = Docker(Path(plain_dockerd.removeprefix("unix://")), dk.image)
        try:
            stopped = other.track(unique("ctrmig-dk-plain"))
            other.api.create_container(dk.image, COUNTER_CMD, name=stopped)
            with pytest.raises(EngineError, match="experimental") as err:
                plain.resume(stopped)
            assert err.value.hint and "daemon.json" in err.value.hint
        finally:
            other.cleanup()


def test_refused_create_is_classified_by_state(dk: Docker) -> None:
    """A name taken now is NameInUseError, an image missing now ImageNotFoundError."""
    taken = dk.track(unique("ctrmig-dk-taken"))
    dk.api.create_container(dk.image, COUNTER_CMD, name=taken)
    with pytest.raises(NameInUseError, match=taken):
        dk.m.api.create({"Image": dk.image, "Cmd": COUNTER_CMD}, taken)
    missing = f"localhost/{unique('ctrmig-none')}:latest"
    fresh = dk.track(unique("ctrmig-dk-noimage"))
    with pytest.raises(ImageNotFoundError, match="create container"):
        dk.m.api.create({"Image": missing, "Cmd": COUNTER_CMD}, fresh)
    assert not dk.m.exists(fresh)


# --- errors without a daemon ---------------------------------------------------------------


def test_daemon_down(tmp_path: Path) -> None:
    m = DockerMigrator(f"unix://{tmp_path}/dead.sock")
    with pytest.raises(EngineUnavailableError) as err:
        m.version()
    assert err.value.hint and "dockerd" in err.value.hint
    with pytest.raises(EngineUnavailableError):
        m.checkpoint("web", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_experimental_off_names_the_fix(tmp_path: Path) -> None:
    m = DockerMigrator(f"unix://{tmp_path}/dead.sock")
    m.api._info = {"ExperimentalBuild": False, "DockerRootDir": str(tmp_path)}
    with pytest.raises(EngineError, match="experimental") as err:
        m.checkpoints.require()
    assert err.value.hint and "daemon.json" in err.value.hint


def test_criu_missing_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "containers").mkdir()
    m = DockerMigrator(f"unix://{tmp_path}/dead.sock")
    m.api._info = {"ExperimentalBuild": True, "DockerRootDir": str(tmp_path)}
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="criu") as err:
        m.checkpoints.require()
    assert err.value.hint and "setup-host" in err.value.hint


class RefusingClient:
    """docker-py's client refusing every create with ``status`` and ``words``; inspects of
    containers and images answer 404 unless the ref is in ``present``."""

    def __init__(self, status: int, words: str, present: set[str]):
        self.status, self.words, self.present = status, words, present

    def _error(self, status: int, words: str) -> docker.errors.APIError:
        response = requests.Response()
        response.status_code = status
        return docker.errors.APIError("refused", response=response, explanation=words)

    def create_container_from_config(self, body: object, name: str) -> Any:
        raise self._error(self.status, self.words)

    def inspect_container(self, ref: str) -> Any:
        if ref not in self.present:
            raise self._error(404, f"No such container: {ref}")
        return {"Id": ref}

    inspect_image = inspect_container

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("status", "words", "present", "expected"), [
    (409, 'Conflict. The container name "/web" is already in use', {"img"}, RestoreError),
    (409, "Conflict: something else", {"img", "web"}, NameInUseError),
    (404, "No such image: img", {"img"}, RestoreError),
    (404, "not found", set(), ImageNotFoundError),
])
def test_create_failure_follows_state_not_words(
    status: int, words: str, present: set[str], expected: type[EngineError]
) -> None:
    m = DockerMigrator("unix:///nonexistent.sock")
    m.api._client = RefusingClient(status, words, present)  # type: ignore[assignment]
    with pytest.raises(EngineError) as err:
        m.api.create({"Image": "img"}, "web")
    assert type(err.value) is expected
    assert words.splitlines()[0] in str(err.value)  # the daemon's words stay the message


@pytest.mark.parametrize("race_failures", [0, 2])
def test_start_retries_only_the_race(race_failures: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    m = DockerMigrator("unix:///nonexistent.sock")
    calls: list[str] = []

    def start(cid: str, name: str) -> None:
        calls.append(name)
        if len(calls) <= race_failures:
            raise RestoreError("start failed", stderr=RACE)

    monkeypatch.setattr(m.api, "start_from", start)
    m.checkpoints.start("cid", "cp")
    assert len(calls) == race_failures + 1


def test_start_other_error_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    m = DockerMigrator("unix:///nonexistent.sock", start_attempts=3)
    calls: list[str] = []

    def start(cid: str, name: str) -> None:
        calls.append(name)
        raise RestoreError("start failed", stderr="criu failed: type NOTIFY errno 0")

    monkeypatch.setattr(m.api, "start_from", start)
    with pytest.raises(RestoreError, match="start failed"):
        m.checkpoints.start("cid", "cp")
    assert len(calls) == 1

    def always_race(cid: str, name: str) -> None:
        calls.append(name)
        raise RestoreError("start failed", stderr=RACE)

    calls.clear()
    monkeypatch.setattr(m.api, "start_from", always_race)
    with pytest.raises(RestoreError):
        m.checkpoints.start("cid", "cp")
    assert len(calls) == 3  # bounded


def test_create_body_keeps_config_and_maps_ports() -> None:
    config = {
        "Config": {"Image": "img", "Cmd": ["sh"], "Env": ["A=1"], "NetworkDisabled": True,
                   "ExposedPorts": {"22/tcp": {}}},
        "HostConfig": {"RestartPolicy": {"Name": "always"}, "ContainerIDFile": "/x",
                       "PortBindings": {"22/tcp": [{"HostIp": "", "HostPort": "2222"}]}},
    }
    body = create_body(config, ("8080:80", "127.0.0.1:53:53/udp"))
    assert body["Image"] == "img" and body["Env"] == ["A=1"]
    assert "NetworkDisabled" not in body and "ContainerIDFile" not in body["HostConfig"]
    assert body["HostConfig"]["RestartPolicy"] == {"Name": "always"}
    assert set(body["ExposedPorts"]) == {"22/tcp", "80/tcp", "53/udp"}
    assert body["HostConfig"]["PortBindings"] == {
        "80/tcp": [{"HostIp": "", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "53"}],
    }
    with pytest.raises(OptionError):
        create_body(config, ("80:90:100:x",))
