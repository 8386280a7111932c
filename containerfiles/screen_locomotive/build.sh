#!/bin/sh
# Build localhost/screen_locomotive:latest offline: assemble rootfs/ from the host's sl,
# its libraries, xterm's terminfo and busybox-static, then `podman build` this folder.
# (`ctrmig demo` does the same on its own when the image is missing.)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
rm -rf "$here/rootfs"
"$python" -m ctrmig.demo rootfs "$here/rootfs"
podman build --network none -t localhost/screen_locomotive:latest "$here"
rm -rf "$here/rootfs"
