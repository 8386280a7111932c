"""Engine name -> adapter class, imported lazily so that a missing SDK only hurts its engine."""

from __future__ import annotations

import importlib
from typing import Any

from ctrmig.errors import UnknownEngineError
from ctrmig.protocol import Migrator

_registry: dict[str, str | type[Any]] = {
    "podman": "ctrmig.engines.podman:PodmanMigrator",
    "docker": "ctrmig.engines.docker:DockerMigrator",
    "runc": "ctrmig.engines.runc:RuncMigrator",
    "process": "ctrmig.engines.process:ProcessMigrator",
}


def register(name: str, cls: str | type[Any], *, clobber: bool = False) -> None:
    """Register an adapter class (or "module:Class") under ``name``.

    Refuses to replace an existing engine unless ``clobber`` is true.
    """
    if name in _registry and not clobber:
        raise ValueError(f"engine {name!r} is already registered (pass clobber=True)")
    _registry[name] = cls


def engine_names() -> list[str]:
    """Names of every registered engine."""
    return sorted(_registry)


def get_class(name: str) -> type[Any]:
    try:
        entry = _registry[name]
    except KeyError:
        raise UnknownEngineError(
            f"unknown engine {name!r}", hint=f"choose one of: {', '.join(engine_names())}"
        ) from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise UnknownEngineError(
                f"engine {name!r} cannot be loaded: {e}", hint="pip install ctrmig again"
            ) from None
        _registry[name] = entry
    return entry


def migrator(name: str, **options: Any) -> Migrator:
    """Build the adapter for engine ``name``; ``options`` go to its constructor."""
    instance: Migrator = get_class(name)(**options)
    return instance
