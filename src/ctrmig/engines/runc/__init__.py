"""The runc engine: containers from local images, run by runc from OCI bundles.

:class:`RuncMigrator` (in :mod:`.migrator`) is the adapter; the package's other modules
are its collaborators. Imported lazily: the stdio supervisor runs as ``python -m
ctrmig.engines.runc.supervisor``, one per container, and must not load the adapter (nor
find itself imported twice).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctrmig.engines.runc.bundle import TEMPLATE
    from ctrmig.engines.runc.images import transport_ref
    from ctrmig.engines.runc.migrator import RuncMigrator

__all__ = ["TEMPLATE", "RuncMigrator", "transport_ref"]

_WHERE = {"RuncMigrator": "migrator", "TEMPLATE": "bundle", "transport_ref": "images"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
