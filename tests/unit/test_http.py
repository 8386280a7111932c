"""The one HTTP error translator: SDK and requests failures -> ctrmig errors."""

from __future__ import annotations

import json

import docker
import pytest
import requests

from ctrmig.errors import (
    ContainerNotFoundError,
    CtrmigError,
    EngineError,
    EngineUnavailableError,
    ImageNotFoundError,
    NameInUseError,
    RestoreError,
)
from ctrmig.host.http import api_errors, translate

HINT = "start the daemon"
CATCH = (docker.errors.DockerException, requests.RequestException)


def api_error(status: int, message: str) -> docker.errors.APIError:
    """An APIError exactly as docker-py builds it from a daemon's JSON answer."""
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"message": message}).encode()
    response.url = "http+docker://localhost/v1.41/containers/x/json"
    try:
        response.raise_for_status()
    except requests.HTTPError as e:
        try:
            docker.errors.create_api_error_from_http_exception(e)
        except docker.errors.APIError as api:
            return api
    raise AssertionError("no error built")


def raised(exc: BaseException, **kwargs: object) -> CtrmigError:
    with pytest.raises(CtrmigError) as info, api_errors(
        "docker", "do it", start_hint=HINT, catch=CATCH, **kwargs  # type: ignore[arg-type]
    ):
        raise exc
    return info.value


def test_connection_refused_is_unavailable_with_hint() -> None:
    err = raised(requests.ConnectionError("Connection refused"))
    assert isinstance(err, EngineUnavailableError) and err.hint == HINT


def test_sdk_wrapped_connection_error_is_unavailable() -> None:
    # docker.APIClient(version="auto") wraps the failure of its first request like this
    try:
        try:
            raise requests.ConnectionError(("Connection aborted.", FileNotFoundError(2, "x")))
        except requests.ConnectionError as inner:
            raise docker.errors.DockerException("Error while fetching server API version") \
                from inner
    except docker.errors.DockerException as outer:
        err = raised(outer)
    assert isinstance(err, EngineUnavailableError)


def test_read_timeout_is_an_engine_error_not_unavailable() -> None:
    err = raised(requests.ReadTimeout("read timed out"), error=RestoreError)
    assert type(err) is RestoreError and "timed out" in err.message


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (404, "No such container: web", ContainerNotFoundError),
        (404, "No such image: localhost/x:latest", ImageNotFoundError),
        (409, 'Conflict. The container name "/web" is already in use by container "1"',
         NameInUseError),
        (409, "Container 1 is not running", EngineError),
        (500, "OCI runtime restore failed: criu failed\nlog file: /x", EngineError),
    ],
)
def test_status_mapping(status: int, message: str, kind: type[EngineError]) -> None:
    err = raised(api_error(status, message))
    assert type(err) is kind
    assert err.stderr == message
    assert message.splitlines()[0] in err.message


def test_caller_classes_for_not_found_and_other() -> None:
    assert type(raised(api_error(404, "no such thing"), not_found=ImageNotFoundError)) \
        is ImageNotFoundError
    assert type(raised(api_error(500, "boom"), error=RestoreError)) is RestoreError


def test_own_errors_and_bugs_pass_through() -> None:
    with pytest.raises(RestoreError), api_errors("docker", "x", start_hint=HINT, catch=CATCH):
        raise RestoreError("ours")
    with pytest.raises(KeyError), api_errors("docker", "x", start_hint=HINT, catch=CATCH):
        raise KeyError("a bug stays a bug")


def test_podman_style_error_without_requests_base() -> None:
    class PodmanAPIError(Exception):
        def __init__(self, status: int, explanation: str):
            super().__init__(explanation)
            self.status_code, self.explanation = status, explanation

    err = translate(PodmanAPIError(404, "no container with name or ID web found"),
                    engine="podman", what="inspect web", start_hint=HINT)
    assert isinstance(err, ContainerNotFoundError) and "podman" in err.message
