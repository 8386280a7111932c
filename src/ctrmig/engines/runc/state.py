"""The runc engine's state directory: where each collaborator keeps what it owns.

Layout under ``state_dir`` (default /var/lib/ctrmig/runc)::

    runc-root/          runc's own --root                       (commands.Runc)
    images/HEX/         one image, keyed by its manifest digest: layout/ (skopeo's OCI
                        layout), rootfs/ (umoci's pristine unpack), image-config.json,
                        source-refs                             (images.ImageCache)
    bundles/NAME/       config.json, meta.json, rootfs/ (an overlay mount whose lower
                        layer is the pristine image), diff/upper (the container's
                        changes: exactly what goes into rootfs-diff.tar), diff/work,
                        checkpoint/ (images a checkpoint kept) (bundle.Bundles)
    volumes/NAME/_data  a named volume's content, outlives containers (volumes.Volumes)
    logs/NAME.log       what the container wrote on stdout/stderr (supervisor.Stdio)
    logs/failed/        the runc/CRIU logs of failed runs, kept for the user
    tmp/                work directories of checkpoints and restores
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctrmig.errors import OptionError
from ctrmig.host.files import private_dir


class StateDir:
    """The directories of one runc state dir (made on construction)."""

    def __init__(self, root: Path):
        # overlayfs options are comma/colon separated: refuse paths that would break them
        if re.search(r"[,:\s]", str(root)):
            raise OptionError(f"state_dir {root} holds ',', ':' or whitespace",
                              hint="pick a plain path")
        self.root = root
        self.runc_root = root / "runc-root"
        self.images = root / "images"
        self.bundles = root / "bundles"
        self.logs = root / "logs"
        self.tmp = root / "tmp"
        for d in (self.runc_root, self.images, self.bundles, self.logs, self.tmp):
            private_dir(d)  # 0700: images and logs describe, or hold, containers' memory

    def new_workdir(self, what: str) -> Path:
        """A fresh work directory under tmp/; the caller removes it."""
        return Path(tempfile.mkdtemp(prefix=f"{what}-", dir=self.tmp))

    @contextlib.contextmanager
    def workdir(self, what: str) -> Iterator[Path]:
        """A work directory under tmp/ for the duration of the block."""
        work = self.new_workdir(what)
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def to_json(data: Any) -> bytes:
    """How the state dir's JSON files (meta.json, config.json, ...) are written."""
    return json.dumps(data, indent=2).encode() + b"\n"


def read_text(path: Path) -> str:
    """A file's text (a log, source-refs), or "" if there is none."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
