"""A CRIU cpuinfo.img as another CPU would have written it (for preflight's CPU check).

``python -m tests.cpuinfo PATH`` rewrites the image at PATH (run from a criu shim).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from ctrmig.archive.criu_images import _fields
from tests.data.make_hostile import pb_field


def every_instruction_set(path: str) -> None:
    """Rewrite CRIU's cpuinfo.img (magic, u32 size, CpuinfoEntry) so that every word of
    its x86 entry's capability field (6) has all bits set."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<I", data[8:12])
    body = b""
    for number, _, value in _fields(memoryview(data[12:12 + size])):
        if number == 1 and isinstance(value, memoryview):  # the x86 entry
            value = b"".join(pb_field(n, 0xFFFFFFFF if n == 6 else v if isinstance(v, int)
                                      else bytes(v)) for n, _, v in _fields(value))
        body += pb_field(number, value if isinstance(value, int) else bytes(value))
    Path(path).write_bytes(data[:8] + struct.pack("<I", len(body)) + body)


if __name__ == "__main__":
    every_instruction_set(sys.argv[1])
