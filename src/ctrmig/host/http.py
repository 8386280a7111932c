"""The one translator from an engine's REST API failures to ctrmig errors.

docker-py and podman-py both talk HTTP through ``requests`` and raise their own SDK
errors; an adapter wraps every API call in :func:`api_errors` so that nothing from
``requests`` or the SDKs leaks out. The mapping is generic:

- the daemon cannot be reached (connection refused, socket missing) -> EngineUnavailableError,
  with a hint how to start it;
- a call ran past its timeout -> EngineError (the daemon may still be working on it);
- 404 -> ImageNotFoundError when the daemon talks about an image, else the caller's
  ``not_found`` class (ContainerNotFoundError by default);
- 409 about a name -> NameInUseError;
- anything else the API refused -> the caller's ``error`` class (EngineError by default),
  the daemon's own message as ``stderr``.

Idempotent calls (GETs, a forced DELETE) go through :func:`idempotent`, which retries
transient failures (5xx, a dropped connection) a bounded number of times, each logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
import tenacity

from ctrmig.errors import (
    ContainerNotFoundError,
    CtrmigError,
    EngineError,
    EngineUnavailableError,
    ImageNotFoundError,
    NameInUseError,
)

# What daemons say in a 404 about a missing image (docker-py's own list, lower case).
_IMAGE_404 = (
    "no such image",
    "not found: does not exist or no pull access",
    "repository does not exist",
    "was found but does not match the specified platform",
    "image not known",  # podman
)
_NAME_409 = ("already in use", "name is reserved")
_UNREACHABLE = (requests.ConnectionError, ConnectionRefusedError, FileNotFoundError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason``, exception args."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [current.__cause__, current.__context__, getattr(current, "reason", None),
                 *current.args]
        todo.extend(e for e in inner if isinstance(e, BaseException))


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an SDK or requests error, if it carries a response."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if code is None:
        code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def explanation(exc: BaseException) -> str:
    """The daemon's own message for a failed call (its JSON "message", or the body)."""
    text = getattr(exc, "explanation", None)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if isinstance(text, str) and text.strip():
        return text.strip()
    response = getattr(exc, "response", None)
    body = getattr(response, "text", None)
    if isinstance(body, str) and body.strip():
        try:
            data: Any = json.loads(body)
        except ValueError:
            return body.strip()
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"]).strip()
        return body.strip()
    return str(exc)


def translate(
    exc: BaseException,
    *,
    engine: str,
    what: str,
    start_hint: str,
    not_found: type[EngineError] = ContainerNotFoundError,
    error: type[EngineError] = EngineError,
) -> CtrmigError:
    """The ctrmig error for ``exc``, raised while doing ``what`` against ``engine``."""
    code = status_code(exc)
    if code is None:
        chain = list(_chain(exc))
        if any(isinstance(e, requests.Timeout) for e in chain) and not any(
            isinstance(e, requests.ConnectTimeout) for e in chain
        ):
            return error(
                f"{engine}: {what} timed out",
                hint="the daemon may still be working on it; raise the timeout for big "
                     "containers",
                stderr=str(exc),
            )
        if any(isinstance(e, _UNREACHABLE) for e in chain):
            return EngineUnavailableError(
                f"{engine} is not reachable ({what})", hint=start_hint, stderr=str(exc)
            )
        return error(f"{engine}: {what} failed: {exc}", stderr=str(exc))
    message = explanation(exc)
    lowered = message.lower()
    first = message.splitlines()[0] if message else f"HTTP {code}"
    if code == 404:
        if any(fragment in lowered for fragment in _IMAGE_404):
            return ImageNotFoundError(
                f"{engine}: {what}: {first}",
                hint="load or pull the image on this host first",
                stderr=message,
            )
        return not_found(f"{engine}: {what}: {first}", stderr=message)
    # docker answers 409; podman's restore of a taken name answers 500 with the same words.
    if any(fragment in lowered for fragment in _NAME_409):
        return NameInUseError(
            f"{engine}: {what}: {first}",
            hint="pick another name or remove that container",
            stderr=message,
        )
    return error(f"{engine}: {what} failed (HTTP {code}): {first}", stderr=message)


@contextlib.contextmanager
def api_errors(
    engine: str,
    what: str,
    *,
    start_hint: str,
    catch: tuple[type[BaseException], ...] = (requests.RequestException,),
    not_found: type[EngineError] = ContainerNotFoundError,
    error: type[EngineError] = EngineError,
) -> Iterator[None]:
    """Run one API call; turn ``catch`` (the SDK's errors) into ctrmig errors.

    ctrmig's own errors pass through unchanged; anything else (a bug) is not caught.
    """
    try:
        yield
    except CtrmigError:
        raise
    except catch as e:
        raise translate(
            e, engine=engine, what=what, start_hint=start_hint, not_found=not_found,
            error=error,
        ) from e


log = logging.getLogger(__name__)
T = TypeVar("T")

#: Tries of an idempotent call that failed transiently, and the wait between them.
RETRY_ATTEMPTS = 4
RETRY_WAIT: tenacity.wait.wait_base = tenacity.wait_exponential(multiplier=0.25, max=2)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed API call is worth another try: the daemon answered 5xx, or the
    connection dropped (reset, refused while the service restarts). Not 4xx, not timeouts
    (the daemon may still be doing it), not ctrmig's own errors."""
    code = status_code(exc)
    if code is not None:
        return code >= 500
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, requests.Timeout) for e in chain):
        return False
    return any(isinstance(e, (requests.ConnectionError, ConnectionError)) for e in chain)


def idempotent(engine: str, what: str, call: Callable[[], T], *,
               attempts: int = RETRY_ATTEMPTS,
               wait: tenacity.wait.wait_base | None = None) -> T:
    """Run ``call``, an idempotent API call, retrying transient failures (bounded,
    logged); the last failure is raised as it came (wrap this in :func:`api_errors`).
    Never use it for a call that may have half-happened (a checkpoint, a restore)."""
    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        pause = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s API: %s failed (%s: %s), try %d; retrying in %.2f s", engine, what,
                    type(error).__name__, error, state.attempt_number, pause)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=wait if wait is not None else RETRY_WAIT,
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(call)
