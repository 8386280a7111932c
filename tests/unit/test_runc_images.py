"""Whether an image is there is asked of its store (here: paths and OCI indexes on disk)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from ctrmig.engines.runc.images import present, transport_ref
from ctrmig.errors import OptionError

DOCKER = "unix:///nonexistent/docker.sock"
REF_NAME = "org.opencontainers.image.ref.name"


def _index(*tags: str | None) -> bytes:
    manifests = [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "digest": "sha256:" + "0" * 64, "size": 1,
                  **({"annotations": {REF_NAME: t}} if t else {})} for t in tags]
    return json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()


def test_oci_layout_and_its_tags(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    assert present(f"oci:{layout}:v1", docker_url=DOCKER) is False
    layout.mkdir()
    assert present(f"oci:{layout}:v1", docker_url=DOCKER) is None  # no index: unreadable
    (layout / "index.json").write_bytes(_index("v1", None))
    assert present(f"oci:{layout}:v1", docker_url=DOCKER) is True
    assert present(f"oci:{layout}:v2", docker_url=DOCKER) is False
    assert present(f"oci:{layout}", docker_url=DOCKER) is True
    (layout / "index.json").write_bytes(_index())
    assert present(f"oci:{layout}", docker_url=DOCKER) is False


def test_oci_archive_and_its_tags(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    assert present(f"oci-archive:{archive}:v1", docker_url=DOCKER) is False
    with tarfile.open(archive, "w") as tar:
        data = _index("v1")
        info = tarfile.TarInfo("index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert present(f"oci-archive:{archive}:v1", docker_url=DOCKER) is True
    assert present(f"oci-archive:{archive}:v2", docker_url=DOCKER) is False
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    assert present(f"oci-archive:{tmp_path / 'junk.tar'}", docker_url=DOCKER) is None


@pytest.mark.parametrize("transport", ["dir", "docker-archive"])
def test_paths(tmp_path: Path, transport: str) -> None:
    path = tmp_path / "image"
    assert present(f"{transport}:{path}", docker_url=DOCKER) is False
    path.mkdir()
    # There, but whether it holds a readable image is skopeo's to say.
    assert present(f"{transport}:{path}", docker_url=DOCKER) is True


def test_unreachable_daemon_cannot_tell() -> None:
    assert present("docker-daemon:busybox:latest", docker_url=DOCKER) is None
    assert present("docker://busybox", docker_url=DOCKER) is None


def test_transport_ref() -> None:
    assert transport_ref("localhost/x:1") == "containers-storage:localhost/x:1"
    assert transport_ref("oci:/a:b") == "oci:/a:b"
    with pytest.raises(OptionError, match="local transports"):
        transport_ref("docker://busybox")
