"""JSON members of an archive (config.dump, spec.dump, ...): hostile input, read once here."""

from __future__ import annotations

import json
from typing import Any

from ctrmig.errors import ArchiveError


def json_object(name: str, data: bytes, error: type[ArchiveError] = ArchiveError
                ) -> dict[str, Any]:
    """Member ``name``'s bytes as a JSON object; ``error`` if it is not one (deep nesting
    included)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise error(f"the archive's {name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"the archive's {name} is not a JSON object")
    return value


def as_dict(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}
