"""A CRIU cpuinfo.img as another CPU would have written it (for preflight's CPU check).

``python tests/cpuinfo.py PATH`` rewrites the image at PATH (stdlib only: it runs from a
criu shim, as fast as it can start).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _enc(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        if key & 7 == 0:
            value, i = _varint(data, i)
            yield key >> 3, 0, value
        else:
            size, i = _varint(data, i)
            yield key >> 3, 2, data[i:i + size]
            i += size


def _message(items: list[tuple[int, int, int | bytes]]) -> bytes:
    out = b""
    for number, wire, value in items:
        body = _enc(value) if isinstance(value, int) else _enc(len(value)) + value
        out += _enc(number << 3 | wire) + body
    return out


def every_instruction_set(path: str) -> None:
    """Rewrite CRIU's cpuinfo.img (magic, u32 size, CpuinfoEntry) so that every word of
    its x86 entry's capability field (6) has all bits set."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<I", data[8:12])
    entries = []
    for number, wire, value in _fields(data[12:12 + size]):
        if number == 1 and isinstance(value, bytes):  # the x86 entry
            value = _message([(n, w, 0xFFFFFFFF if n == 6 else v)
                              for n, w, v in _fields(value)])
        entries.append((number, wire, value))
    body = _message(entries)
    Path(path).write_bytes(data[:8] + struct.pack("<I", len(body)) + body)


if __name__ == "__main__":
    every_instruction_set(sys.argv[1])
