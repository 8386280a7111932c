"""dockerd's Engine API: every call ctrmig makes, each through one error translator.

docker-py has no checkpoint calls, so those (and the filesystem and image transfers, which
need explicit timeouts and streaming) are raw requests through its low-level client. Every
call runs inside :meth:`EngineAPI.errors` (:func:`ctrmig.host.http.api_errors`); idempotent
ones (GETs, a forced DELETE) go through :meth:`EngineAPI.idempotent`, which retries
transient failures. Nothing from docker-py, requests or urllib3 leaks out.

Failures are classified by the daemon's state wherever a check of it exists, not by its
words (which stay the message): container existence is a 404 of its inspect, image
presence a 404 of ``GET /images/REF/json``, and a refused create asks both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import docker
import requests
import tenacity
import urllib3
from docker.errors import APIError, DockerException

from ctrmig.errors import (
    CheckpointError,
    ContainerNotFoundError,
    EngineError,
    ImageNotFoundError,
    NameInUseError,
    RestoreError,
    ToolMissingError,
)
from ctrmig.host import http
from ctrmig.host.files import open_private

log = logging.getLogger(__name__)
T = TypeVar("T")

START_HINT = ("start dockerd (systemctl start docker, or scripts/setup-host), or point "
              "base_url / DOCKER_HOST at its socket")
# urllib3: errors while reading a streamed body (res.raw) are not wrapped by requests.
_CATCH = (DockerException, requests.RequestException, urllib3.exceptions.HTTPError)


class EngineAPI:
    """One dockerd's Engine API, with explicit timeouts: ``api_timeout`` for quick calls
    (inspect, create, lists), ``timeout`` for long ones (checkpoint, start from a
    checkpoint, filesystem and image transfers)."""

    def __init__(self, base_url: str, *, api_timeout: float, timeout: float,
                 retry_attempts: int = http.RETRY_ATTEMPTS,
                 retry_wait: tenacity.wait.wait_base = http.RETRY_WAIT):
        self.base_url = base_url
        self.api_timeout = api_timeout
        self.timeout = timeout
        #: Tries of an idempotent call that failed transiently (5xx, dropped connection),
        #: and the wait between them. Checkpoint, create and start are never retried blindly.
        self.retry_attempts = retry_attempts
        self.retry_wait = retry_wait
        self._client: docker.APIClient | None = None
        self._info: dict[str, Any] | None = None

    # --- the translator ----------------------------------------------------------------------

    def errors(
        self,
        what: str,
        *,
        not_found: type[EngineError] = ContainerNotFoundError,
        error: type[EngineError] = EngineError,
    ) -> contextlib.AbstractContextManager[None]:
        """Translate the failures of the call ``what`` into ctrmig errors."""
        return http.api_errors("docker", what, start_hint=START_HINT, catch=_CATCH,
                               not_found=not_found, error=error)

    def idempotent(self, what: str, call: Callable[[], T], *,
                   not_found: type[EngineError] = ContainerNotFoundError) -> T:
        """Run an idempotent call, retrying transient failures; translate the rest."""
        with self.errors(what, not_found=not_found):
            return http.idempotent("docker", what, call, attempts=self.retry_attempts,
                                   wait=self.retry_wait)

    @property
    def client(self) -> docker.APIClient:
        """docker-py's low-level client, made on first use (asks the daemon's version)."""
        if self._client is None:
            with self.errors(f"connect to {self.base_url}"):
                self._client = docker.APIClient(
                    base_url=self.base_url, timeout=self.api_timeout, version="auto"
                )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- the daemon --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /info``, asked once."""
        if self._info is None:
            self._info = dict(self.idempotent("info", lambda: self.client.info()))
        return self._info

    def version(self) -> str:
        return str(self.idempotent("version", lambda: self.client.version())["Version"])

    # --- containers --------------------------------------------------------------------------

    def containers(self) -> list[dict[str, Any]]:
        return list(self.idempotent("list containers",
                                    lambda: self.client.containers(all=True)))

    def inspect(self, container: str) -> dict[str, Any]:
        """``GET /containers/{id}/json``; a 404 raises ContainerNotFoundError."""
        return dict(self.idempotent(f"inspect {container}",
                                    lambda: self.client.inspect_container(container)))

    def exists(self, container: str) -> bool:
        """Whether dockerd knows ``container``: its inspect answers 404 or not."""
        return self._found(f"inspect {container}",
                           lambda: self.client.inspect_container(container))

    def create(self, body: Mapping[str, Any], name: str) -> str:
        """``POST /containers/create``; returns the new container's id.

        A refused create is classified by state, not by the daemon's words: the name is
        taken if a container holds it now, the image missing if dockerd lacks it now.
        """
        what = f"create container {name}"
        try:
            with self.errors(what, error=RestoreError):
                return str(self.client.create_container_from_config(dict(body), name)["Id"])
        except EngineError as e:
            code = http.status_code(e.__cause__) if e.__cause__ else None
            if code is None:
                raise
            image = str(body.get("Image") or "")
            if code == 409 and self.exists(name):
                cls: type[EngineError] = NameInUseError
                hint = "pick another name or remove that container"
            elif code == 404 and image and not self.has_image(image):
                cls, hint = ImageNotFoundError, "load or pull the image on this host first"
            else:
                cls, hint = RestoreError, ""
            if type(e) is cls:
                raise
            raise cls(e.message, hint=hint or None, stderr=e.stderr) from e.__cause__

    def remove(self, container: str) -> None:
        """Remove ``container`` with its anonymous state (anonymous volumes too, as
        ``docker rm -v``); one already gone is removed too."""
        # A retry after the first DELETE went through finds it gone: that is done too.
        with contextlib.suppress(ContainerNotFoundError):
            self.idempotent(f"remove {container}",
                            lambda: self.client.remove_container(container, force=True,
                                                                 v=True))

    def logs(self, container: str) -> str:
        data: bytes = self.idempotent(
            f"logs of {container}",
            lambda: self.client.logs(container, stdout=True, stderr=True))
        return data.decode(errors="replace")

    # --- checkpoints (experimental) ----------------------------------------------------------

    def checkpoint_create(self, cid: str, name: str, fields: Mapping[str, Any]) -> None:
        """``POST /containers/{id}/checkpoints`` with ``CheckpointID`` ``name``."""
        api = self.client
        with _criu_missing(), self.errors(f"checkpoint {cid[:12]}", error=CheckpointError):
            api._raise_for_status(api._post_json(
                api._url("/containers/{0}/checkpoints", cid),
                data={"CheckpointID": name, **fields}, timeout=self.timeout,
            ))

    def checkpoint_names(self, container: str) -> list[str]:
        api = self.client
        rows = self.idempotent(f"list checkpoints of {container[:12]}", lambda: api._result(
            api._get(api._url("/containers/{0}/checkpoints", container),
                     timeout=self.api_timeout), json=True))
        return [str(row["Name"]) for row in rows or []]

    def checkpoint_delete(self, cid: str, name: str) -> None:
        api = self.client
        with self.errors(f"delete checkpoint {name} of {cid[:12]}"):
            api._raise_for_status(api._delete(
                api._url("/containers/{0}/checkpoints/{1}", cid, name),
                timeout=self.api_timeout,
            ))

    def start_from(self, cid: str, name: str) -> None:
        """``POST /containers/{id}/start?checkpoint=NAME`` (once: see checkpoints.start)."""
        api = self.client
        with _criu_missing(), \
                self.errors(f"start {cid[:12]} from checkpoint {name}", error=RestoreError):
            api._raise_for_status(api._post(
                api._url("/containers/{0}/start", cid), params={"checkpoint": name},
                timeout=self.timeout,
            ))

    # --- filesystem --------------------------------------------------------------------------

    def changes(self, cid: str) -> list[dict[str, Any]]:
        """``GET /containers/{id}/changes`` (docker diff), which walks the whole layer."""
        api = self.client
        changes = self.idempotent(f"diff of {cid[:12]}", lambda: api._result(api._get(
            api._url("/containers/{0}/changes", cid), timeout=self.timeout,
        ), json=True))
        return list(changes or [])

    @contextlib.contextmanager
    def get_archive(self, cid: str, path: str) -> Iterator[tarfile.TarFile]:
        """``GET /containers/{id}/archive?path=PATH`` as a tar stream, read as it arrives."""
        api = self.client
        what = f"read {path} of {cid[:12]}"
        with self.errors(what):
            res: requests.Response = api._get(
                api._url("/containers/{0}/archive", cid), params={"path": path},
                stream=True, timeout=self.timeout,
                headers={"Accept-Encoding": "identity"},  # no gzip over a local socket
            )
            api._raise_for_status(res)
        res.raw.decode_content = True  # should dockerd compress anyway
        try:
            with self.errors(what), tarfile.open(fileobj=res.raw, mode="r|") as tar:
                yield tar
        finally:
            res.close()

    def put_archive(self, cid: str, path: str, data: BinaryIO) -> None:
        """``PUT /containers/{id}/archive?path=PATH``: extract the tar ``data`` there."""
        api = self.client
        with self.errors(f"write files into {cid[:12]}", error=RestoreError):
            api._raise_for_status(api._put(
                api._url("/containers/{0}/archive", cid), params={"path": path},
                data=data, timeout=self.timeout,
            ))

    def pause(self, cid: str) -> None:
        with self.errors(f"pause {cid[:12]}", error=CheckpointError):
            self.client.pause(cid)

    def unpause(self, cid: str) -> None:
        with self.errors(f"unpause {cid[:12]}"):
            self.client.unpause(cid)

    # --- volumes -----------------------------------------------------------------------------

    def volume(self, name: str) -> dict[str, Any] | None:
        """``GET /volumes/NAME``; None if dockerd has no such volume."""
        found: list[dict[str, Any]] = []
        if self._found(f"inspect volume {name}",
                       lambda: found.append(dict(self.client.inspect_volume(name)))):
            return found[-1]
        return None

    def create_volume(self, name: str, driver: str, options: Mapping[str, str],
                      labels: Mapping[str, str]) -> None:
        with self.errors(f"create volume {name}", error=RestoreError):
            self.client.create_volume(name, driver, dict(options) or None,
                                      dict(labels) or None)

    def remove_volume(self, name: str) -> None:
        """``DELETE /volumes/NAME`` (refused while a container uses it)."""
        with contextlib.suppress(ContainerNotFoundError):  # a 404: gone already
            self.idempotent(f"remove volume {name}", lambda: self.client.remove_volume(name))

    def using(self, volume: str) -> list[dict[str, Any]]:
        """The containers (any state) that mount ``volume``."""
        return list(self.idempotent(
            f"list containers using volume {volume}",
            lambda: self.client.containers(all=True, filters={"volume": volume})))

    # --- images ------------------------------------------------------------------------------

    def has_image(self, ref: str) -> bool:
        """Whether dockerd holds ``ref``: ``GET /images/REF/json`` answers 404 or not."""
        return self._found(f"inspect image {ref}", lambda: self.client.inspect_image(ref))

    def save_image(self, ref: str, dest: Path) -> None:
        """``GET /images/REF/get`` (a docker-archive) into the file ``dest``."""
        api = self.client
        with self.errors(f"save image {ref}", not_found=ImageNotFoundError,
                         error=CheckpointError):
            res = api._get(api._url("/images/{0}/get", ref), stream=True,
                           timeout=self.timeout)
            api._raise_for_status(res)
            with open_private(dest) as f:
                for chunk in res.iter_content(1 << 20):
                    f.write(chunk)

    def load_image(self, path: Path) -> None:
        """``POST /images/load`` of the docker-archive at ``path``."""
        api = self.client
        with self.errors("load image", error=RestoreError), path.open("rb") as body:
            res = api._post(api._url("/images/load"), data=body, params={"quiet": "1"},
                            headers={"Content-Type": "application/x-tar"},
                            timeout=self.timeout)
            text = api._result(res)
        # dockerd answers 200 and reports a failed load in the JSON stream.
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and message.get("error"):
                    raise RestoreError(f"docker: load image failed: {message['error']}",
                                       stderr=text)

    # --- helpers -----------------------------------------------------------------------------

    def _found(self, what: str, call: Callable[[], object]) -> bool:
        """Run a lookup; False if it answered 404 (by status, whatever the words)."""
        def lookup() -> bool:
            try:
                call()
            except APIError as e:
                if http.status_code(e) == 404:
                    return False
                raise
            return True

        return self.idempotent(what, lookup)


@contextlib.contextmanager
def _criu_missing() -> Iterator[None]:
    """dockerd (through runc) may not find criu on its own PATH, even when ctrmig does.

    Decided by the words: no API call shows what dockerd's runtime finds on its PATH.
    """
    try:
        yield
    except EngineError as e:
        text = e.stderr or ""
        if re.search(r"criu.*(executable file not found|no such file)", text, re.I):
            raise ToolMissingError(
                "dockerd's runtime cannot find criu", stderr=text,
                hint="install criu where dockerd finds it (scripts/setup-host) and "
                     "restart dockerd",
            ) from e
        raise
