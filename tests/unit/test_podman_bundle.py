"""The direct route's pure logic: the runtime spec moved to the new container's paths."""

from __future__ import annotations

import json

import pytest

from ctrmig.engines.podman.bundle import runtime_spec
from ctrmig.errors import RestoreError

OLD = {"static_dir": "/s/a/userdata", "run_dir": "/r/a/userdata", "layer_dir": "/l/a"}
NEW = {"static_dir": "/s/b/userdata", "run_dir": "/r/b/userdata", "layer_dir": "/l/b"}


def _moved(spec: dict[str, object]) -> dict[str, object]:
    result: dict[str, object] = json.loads(runtime_spec(json.dumps(spec).encode(), OLD, NEW))
    return result


def test_the_containers_own_paths_move_and_host_paths_stay() -> None:
    spec = _moved({"root": {"path": "/l/a/merged"}, "mounts": [
        {"destination": "/etc/hosts", "source": "/r/a/userdata/hosts"},
        {"destination": "/dev/shm", "source": "/s/a/userdata/shm"},
        {"destination": "/data", "source": "/srv/data"},
        {"destination": "/proc", "source": "proc"},
    ]})
    assert spec["root"] == {"path": "/l/b/merged"}
    assert [m["source"] for m in spec["mounts"]] == [  # type: ignore[attr-defined]
        "/r/b/userdata/hosts", "/s/b/userdata/shm", "/srv/data", "proc"]


@pytest.mark.parametrize("root", ["/etc", "/l/a/../../etc", "/l/ab/merged", None])
def test_a_rootfs_outside_the_source_layer_is_refused(root: str | None) -> None:
    with pytest.raises(RestoreError, match="rootfs path"):
        _moved({"root": {"path": root}})
