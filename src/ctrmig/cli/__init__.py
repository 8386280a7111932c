"""The ``ctrmig`` command line: a thin shell over the public Python API.

Exit codes: 0 success, 1 the operation failed (any :class:`~ctrmig.errors.CtrmigError`,
reported as one ``ctrmig: error:`` line and a hint), 2 usage error. One module per
concern: :mod:`.app` (the group, errors, shared flags), :mod:`.archives`,
:mod:`.containers`, :mod:`.moves` and :mod:`.host` (the commands).
"""

from __future__ import annotations

from ctrmig.cli import app, archives, containers, host, moves  # noqa: F401 (registers commands)
from ctrmig.cli.app import built, cli, connect, main, option_flags, pick_engine
from ctrmig.cli.archives import checkpoint, inspect, restore, verify
from ctrmig.cli.host import _runs
from ctrmig.cli.moves import migrate

__all__ = [
           "_runs",
           "built",
           "checkpoint",
           "cli",
           "connect",
           "inspect",
           "main",
           "migrate",
           "option_flags",
           "pick_engine",
           "restore",
           "verify",
]
