"""The adapters' one retry policy (host/http.py), against fake HTTP layers (pure logic).

Idempotent calls (GETs, DELETE) are retried on 5xx and dropped connections, a bounded
number of times, each retry logged; 4xx, timeouts and checkpoint/restore POSTs are not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import requests
import tenacity
from podman.api.client import APIResponse
from podman.errors import APIError

from ctrmig.engines.docker import DockerMigrator
from ctrmig.engines.podman import PodmanMigrator
from ctrmig.errors import (
    CheckpointError,
    ContainerNotFoundError,
    EngineError,
    EngineUnavailableError,
)
from ctrmig.host.http import is_transient


def response(status: int, body: Any = None) -> APIResponse:
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(body if body is not None else {"cause": "x", "message": "x"}
                            ).encode()
    r.url = "http://d/v4.0.0/libpod/x"
    return APIResponse(r)


def reset() -> APIError:
    """What podman-py raises when the connection drops: APIError from an OSError."""
    try:
        try:
            raise requests.ConnectionError(ConnectionResetError(104, "Connection reset"))
        except OSError as e:
            raise APIError("http://d/x", explanation="GET operation failed") from e
    except APIError as e:
        return e


class FakeAPI:
    """Answers each call from a script: a response, or an exception to raise."""

    def __init__(self, *script: APIResponse | BaseException):
        self.script = list(script)
        self.calls: list[tuple[str, str]] = []

    def _next(self, method: str, path: str) -> APIResponse:
        self.calls.append((method, path))
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def get(self, path: str, **_: Any) -> APIResponse:
        return self._next("GET", path)

    def delete(self, path: str, **_: Any) -> APIResponse:
        return self._next("DELETE", path)

    def post(self, path: str, **_: Any) -> APIResponse:
        return self._next("POST", path)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[PodmanMigrator, FakeAPI]]:
    def make(*script: APIResponse | BaseException) -> tuple[PodmanMigrator, FakeAPI]:
        m = PodmanMigrator(url="unix:///nonexistent/podman.sock")
        api = FakeAPI(*script)
        monkeypatch.setattr(m.client, "api", api)
        monkeypatch.setattr(PodmanMigrator, "retry_wait", tenacity.wait_none())
        return m, api

    return make


def test_5xx_then_success_is_retried_and_logged(
    fake: Callable[..., tuple[PodmanMigrator, FakeAPI]], caplog: pytest.LogCaptureFixture
) -> None:
    m, api = fake(response(503), response(500), response(200, {"Version": "4.3.1"}))
    with caplog.at_level(logging.WARNING, logger="ctrmig.host.http"):
        assert m.version() == "4.3.1"
    assert len(api.calls) == 3
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2
    assert "podman version failed" in retries[0] and "try 1" in retries[0]
    assert "try 2" in retries[1]


def test_connection_reset_is_retried(fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]) -> None:
    m, api = fake(reset(), reset(), response(200, []))
    assert m.list() == []
    assert len(api.calls) == 3


def test_retries_are_bounded(fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]) -> None:
    m, api = fake(response(500, {"cause": "boom", "message": "database is locked"}))
    with pytest.raises(EngineError) as err:
        m.list()
    assert "database is locked" in str(err.value)
    assert len(api.calls) == PodmanMigrator.retry_attempts == 4


def test_a_dead_daemon_is_unavailable_after_the_retries(
    fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]
) -> None:
    m, api = fake(reset())
    with pytest.raises(EngineUnavailableError):
        m.exists("c")
    assert len(api.calls) == 4


def test_4xx_is_not_retried(fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]) -> None:
    m, api = fake(response(404, {"cause": "no such container", "message": "no such container"}))
    with pytest.raises(ContainerNotFoundError):
        m.logs("c")
    assert len(api.calls) == 1


def test_delete_is_retried_and_a_gone_container_is_fine(
    fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]
) -> None:
    # The first DELETE may have removed it before the connection dropped: 404 then is done.
    m, api = fake(reset(), response(404))
    m.remove("c")
    assert api.calls == [("DELETE", "/containers/c")] * 2


def test_checkpoint_and_restore_posts_are_never_retried(
    fake: Callable[..., tuple[PodmanMigrator, FakeAPI]]
) -> None:
    m, api = fake(response(503))
    with pytest.raises(CheckpointError):
        m.resume("c")  # POST .../restore: it may have half-happened
    assert len(api.calls) == 1


def test_a_timeout_is_not_transient() -> None:
    """The daemon may still be doing what timed out: never retried."""
    try:
        try:
            raise requests.ReadTimeout("read timed out")
        except OSError as e:
            raise APIError("http://d/x", explanation="GET operation failed") from e
    except APIError as e:
        assert not is_transient(e)
    assert is_transient(reset())
    assert not is_transient(ValueError("a bug"))


# --- docker: the same policy through docker-py ----------------------------------------------


class FakeDockerClient:
    """docker-py's APIClient, answering each call from a script (value or exception)."""

    def __init__(self, *script: object):
        self.script = list(script)
        self.calls: list[str] = []

    def _answer(self, call: str) -> Any:
        self.calls.append(call)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def containers(self, all: bool = False) -> Any:
        return self._answer("containers")

    def remove_container(self, container: str, force: bool = False, v: bool = False) -> Any:
        return self._answer("remove")

    def close(self) -> None:
        pass


def docker_error(status: int) -> BaseException:
    import docker.errors

    r = requests.Response()
    r.status_code = status
    return docker.errors.APIError("boom", response=r, explanation="daemon said no")


@pytest.fixture
def fake_docker(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[DockerMigrator,
                                                                        FakeDockerClient]]:
    def make(*script: object) -> tuple[DockerMigrator, FakeDockerClient]:
        monkeypatch.setattr(DockerMigrator, "retry_wait", tenacity.wait_none())
        m = DockerMigrator(base_url="unix:///nonexistent/docker.sock")
        client = FakeDockerClient(*script)
        m.api._client = client  # type: ignore[assignment]
        return m, client

    return make


def test_docker_reset_and_5xx_are_retried_and_logged(
    fake_docker: Callable[..., tuple[DockerMigrator, FakeDockerClient]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reset_error = requests.ConnectionError(ConnectionResetError(104, "Connection reset"))
    m, client = fake_docker(reset_error, docker_error(502), [])
    with caplog.at_level(logging.WARNING, logger="ctrmig.host.http"):
        assert m.list() == []
    assert client.calls == ["containers"] * 3
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2 and "docker API: list containers failed" in retries[0]


def test_docker_retries_are_bounded_and_4xx_is_not_retried(
    fake_docker: Callable[..., tuple[DockerMigrator, FakeDockerClient]],
) -> None:
    m, client = fake_docker(docker_error(500))
    with pytest.raises(EngineError, match="daemon said no"):
        m.list()
    assert len(client.calls) == DockerMigrator.retry_attempts == 4
    m, client = fake_docker(docker_error(409))
    with pytest.raises(EngineError):
        m.list()
    assert len(client.calls) == 1


def test_docker_remove_retried_after_a_reset_finds_it_gone(
    fake_docker: Callable[..., tuple[DockerMigrator, FakeDockerClient]],
) -> None:
    reset_error = requests.ConnectionError(ConnectionResetError(104, "Connection reset"))
    m, client = fake_docker(reset_error, docker_error(404))
    m.remove("c")
    assert client.calls == ["remove", "remove"]
