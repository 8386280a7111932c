"""Build small container images offline (no registry is reachable from our hosts).

A rootfs folder is assembled from host files (busybox-static, or a program and the
libraries ``ldd`` names), packed as a tarball, and imported into podman; the other
engines take it from there (``podman save`` to docker, skopeo to runc).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ctrmig.errors import ToolMissingError
from ctrmig.host import proc

BUSYBOX = Path("/bin/busybox")
TEST_IMAGE = "localhost/ctrmig-busybox:latest"
TIMEOUT = 300.0


def _skeleton(root: Path) -> None:
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def busybox_rootfs(root: Path) -> Path:
    """A minimal rootfs: busybox-static and a relative symlink for each applet."""
    if not BUSYBOX.exists():
        raise ToolMissingError("busybox-static is not installed",
                               hint="apt-get install busybox-static")
    _skeleton(root)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = proc.output([str(BUSYBOX), "--list"], timeout=30).split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    return root


def add_program(root: Path, program: Path, extra_files: Iterable[Path] = ()) -> None:
    """Copy ``program`` and every shared library ``ldd`` lists into ``root``."""
    files = [program, *extra_files]
    text = proc.output(["ldd", str(program)], timeout=30)
    files += [Path(m) for m in re.findall(r"(/\S+\.so[^\s]*)", text)]
    for f in files:
        dest = root / str(f).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.is_dir():
            shutil.copytree(f, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(f.resolve(), dest)


def rootfs_tarball(root: Path, out: Path) -> Path:
    """Pack a rootfs folder as a tarball (paths relative to the rootfs)."""
    with tarfile.open(out, "w") as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name)
    return out


def podman_has_image(ref: str) -> bool:
    res = proc.run(["podman", "image", "exists", ref], timeout=60, check=False)
    return res.returncode == 0


def podman_import(tarball: Path, ref: str, *, cmd: Sequence[str] = ("/bin/sh",),
                  env: Sequence[str] = ()) -> None:
    """``podman import`` a rootfs tarball as image ``ref`` with CMD (and ENV) set."""
    changes = ["--change", "CMD " + _json_list(cmd)]
    for e in env:
        changes += ["--change", f"ENV {e}"]
    proc.run(["podman", "import", *changes, str(tarball), ref], timeout=TIMEOUT)


def ensure_test_image(workdir: Path, ref: str = TEST_IMAGE) -> str:
    """Make sure podman's storage holds the busybox test image; return its reference."""
    if not podman_has_image(ref):
        root = busybox_rootfs(workdir / "busybox-rootfs")
        tarball = rootfs_tarball(root, workdir / "busybox-rootfs.tar")
        podman_import(tarball, ref)
        shutil.rmtree(root)
        tarball.unlink()
    return ref


def podman_save(ref: str, out: Path, fmt: str = "docker-archive") -> Path:
    """``podman save`` an image (e.g. to load it into docker or copy it with skopeo)."""
    out.unlink(missing_ok=True)
    proc.run(["podman", "save", "--format", fmt, "-o", str(out), ref], timeout=TIMEOUT)
    return out


def _json_list(items: Sequence[str]) -> str:
    return json.dumps(list(items))


def as_docker_archive(fmt: str, path: Path, ref: str, out: Path) -> Path:
    """The image saved at ``path`` in ``fmt`` (oci-archive or docker-archive, as an engine
    carried it in an archive) re-saved by skopeo as a docker-archive tagged ``ref``: what
    docker's and podman's load both take under the name the container was made from."""
    if fmt not in ("oci-archive", "docker-archive"):
        raise ToolMissingError(f"an image saved as {fmt!r} cannot be converted here")
    proc.run(["skopeo", "copy", "--quiet", f"{fmt}:{path}", f"docker-archive:{out}:{ref}"],
             timeout=TIMEOUT * 2, what=f"skopeo copy the archive's image {ref}")
    return out
