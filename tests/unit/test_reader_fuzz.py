"""Fuzz the safe reader: mutated or truncated archives (none, gzip, zstd) may only ever
raise CtrmigError subclasses, never another exception, and never hang.

Mutations hit the bytes on disk (compressed stream included) and, separately, the tar
inside the compression, so that the tar parser sees damage a checksummed stream would
otherwise stop first. Example counts are bounded so that this runs in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrmig.archive import ArchiveWriter, ContainerRecord, Limits, Manifest, extracted, verify
from ctrmig.archive.reader import read_manifest
from ctrmig.errors import CtrmigError

COMPRESSIONS = ("none", "gzip", "zstd")
# Small caps so that a mutated size field cannot make one example read for long.
LIMITS = Limits(max_members=200, max_total_bytes=8 << 20)
# CTRMIG_FUZZ_EXAMPLES=5000 for a deeper run (and CTRMIG_FUZZ_SEED to vary it).
EXAMPLES = int(os.environ.get("CTRMIG_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10),
                derandomize="CTRMIG_FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow], database=None)


@functools.cache
def plain_tar() -> bytes:
    """A small valid archive, uncompressed: directories, files, a pax long name."""
    out = io.BytesIO()
    w = ArchiveWriter(out, "none")
    w.add_dir("checkpoint")
    w.add_bytes("checkpoint/pages-1.img", bytes(range(256)) * 12)
    w.add_bytes("checkpoint/inventory.img", b"inventory")
    w.add_bytes("spec.dump", b'{"ociVersion": "1.0.2-dev", "linux": {}}')
    w.add_bytes("checkpoint/" + "long-name-" * 12 + ".img", b"a pax path record")
    w.finish(Manifest(engine="podman", container=ContainerRecord(name="fuzz", id="f" * 64),
                      created="2026-01-01T00:00:00Z", source_host="fuzz"))
    return out.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, compresslevel=3, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=False).compress(data)
    return data


@functools.cache
def valid(kind: str) -> bytes:
    return compress(plain_tar(), kind)


def read_all_ways(data: bytes) -> None:
    """verify, read_manifest and extracted on ``data``; only CtrmigError may come out."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-fuzz-") as tmp:
        path = Path(tmp) / "a.tar"
        path.write_bytes(data)
        for read in (lambda: verify(io.BytesIO(data), limits=LIMITS),
                     lambda: read_manifest(path, limits=LIMITS)):
            with contextlib.suppress(CtrmigError):
                read()
        work = Path(tmp) / "work"
        work.mkdir()
        with contextlib.suppress(CtrmigError), extracted(path, workdir=work, limits=LIMITS):
            pass
        assert list(work.iterdir()) == []


mutation = st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255))


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None,
           splice: tuple[int, int, bytes] | None) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    if splice is not None:
        start, length, insert = splice
        start %= len(out)
        out[start:start + length] = insert
    if cut is not None:
        del out[cut % (len(out) + 1):]
    return bytes(out)


edits = dict(
    flips=st.lists(mutation, max_size=8),
    cut=st.none() | st.integers(min_value=0),
    splice=st.none() | st.tuples(st.integers(min_value=0), st.integers(0, 600),
                                 st.binary(max_size=600)),
)


@pytest.mark.timeout(max(120, EXAMPLES // 5))
@pytest.mark.parametrize("kind", COMPRESSIONS)
@FUZZ
@given(**edits)
def test_mutated_archive_raises_only_ctrmig_errors(
    kind: str, flips: list[tuple[int, int]], cut: int | None,
    splice: tuple[int, int, bytes] | None,
) -> None:
    read_all_ways(mutate(valid(kind), flips, cut, splice))


@pytest.mark.timeout(max(120, EXAMPLES // 5))
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@FUZZ
@given(**edits)
def test_mutated_tar_inside_compression_raises_only_ctrmig_errors(
    kind: str, flips: list[tuple[int, int]], cut: int | None,
    splice: tuple[int, int, bytes] | None,
) -> None:
    read_all_ways(compress(mutate(plain_tar(), flips, cut, splice), kind))


@pytest.mark.timeout(max(120, EXAMPLES // 5))
@FUZZ
@given(header=st.binary(min_size=512, max_size=512), tail=st.binary(max_size=2048))
def test_random_headers_raise_only_ctrmig_errors(header: bytes, tail: bytes) -> None:
    """Random header blocks, half of them with a valid checksum so tarfile parses them."""
    block = bytearray(header)
    if header[0] % 2:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    read_all_ways(bytes(block) + tail + plain_tar())


def test_the_unmutated_archives_are_valid() -> None:
    for kind in COMPRESSIONS:
        assert verify(io.BytesIO(valid(kind)), limits=LIMITS).container.name == "fuzz"
