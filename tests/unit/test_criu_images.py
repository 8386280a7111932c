"""The creds decoder of CRIU core images: against real images (tests/data/criu, see its
README), hand-made ones (the hostile corpus's encoder), and fuzzed bytes."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrmig.archive.criu_images import (
    ALL_CAPABILITIES,
    MAX_CORE_IMAGE_BYTES,
    capability_name,
    capability_names,
    core_pid,
    read_core_creds,
    read_lazy_ranges,
)
from ctrmig.errors import ArchiveError, CriuImageError
from tests.unit.test_hostile_archives import make_hostile

CRIU = Path(__file__).resolve().parents[1] / "data" / "criu"
SYS_ADMIN, NET_RAW = 1 << 21, 1 << 13


def test_real_root_task() -> None:
    creds = read_core_creds((CRIU / "core-root.img").read_bytes())
    assert (creds.uid, creds.gid, creds.euid, creds.egid, creds.suid, creds.sgid,
            creds.fsuid, creds.fsgid) == (0,) * 8
    assert creds.cap_prm == creds.cap_eff == creds.cap_bnd == 0x1FFFEFFFFFF
    assert creds.cap_inh == 0
    assert creds.groups == ()
    assert creds.secbits == 0
    assert "SYS_RESOURCE" not in capability_names(creds.cap_eff)
    assert len(capability_names(creds.cap_eff)) == 40


def test_real_task_with_a_narrow_bounding_set_and_groups() -> None:
    creds = read_core_creds((CRIU / "core-netraw-sysadmin.img").read_bytes())
    assert creds.cap_prm == creds.cap_eff == creds.cap_bnd == SYS_ADMIN | NET_RAW == 0x202000
    assert capability_names(creds.cap_bnd) == ["NET_RAW", "SYS_ADMIN"]
    assert creds.groups == (5, 7)
    assert creds.uids == {0}


def test_a_zombie_carries_no_credentials_and_asks_nothing() -> None:
    """A task that had exited but was not reaped when CRIU dumped it (seen: the counter's
    `sleep`): its core image has no creds, which is no reason to refuse the archive."""
    assert read_core_creds(make_hostile.zombie_core_image(), "core-14.img") is None
    with pytest.raises(CriuImageError, match="carries no credentials"):
        read_core_creds(make_hostile.core_image(None))  # a live task without any: refused


def test_hand_made_image_round_trips() -> None:
    image = make_hostile.core_image(make_hostile.creds_message(
        uid=1000, caps=SYS_ADMIN | (1 << 40), bounding=(1 << 41) - 1, groups=(1, 70000)))
    creds = read_core_creds(image)
    assert creds.uid == creds.euid == 1000 and creds.gid == 0
    assert capability_names(creds.cap_eff) == ["SYS_ADMIN", "CHECKPOINT_RESTORE"]
    assert creds.cap_bnd == ALL_CAPABILITIES
    assert creds.groups == (1, 70000)


def test_packed_and_split_fields_are_merged_as_protobuf_does() -> None:
    """A packed repeated field, and thread_core given twice (protobuf merges them: its
    second half must not hide capabilities)."""
    pb, varint = make_hostile.pb_field, make_hostile.varint
    ids = b"".join(pb(n, 0) for n in (1, 2, 3, 4, 5, 6, 7, 8, 13))
    packed = pb(11, varint(SYS_ADMIN) + varint(0))
    first = pb(10, ids)
    second = pb(10, packed)
    entry = pb(1, 1) + pb(5, pb(1, 0) + first) + pb(5, pb(2, 0) + second)
    image = struct.pack("<III", 0x54564319, 0x55053847, len(entry)) + entry
    assert read_core_creds(image).cap_eff == SYS_ADMIN


def test_capability_names() -> None:
    assert capability_name(0) == "CHOWN"
    assert capability_name(21) == "SYS_ADMIN"
    assert capability_name(40) == "CHECKPOINT_RESTORE"
    assert capability_name(41) == "CAP_41"
    assert capability_names((1 << 63) | 1) == ["CHOWN", "CAP_63"]


def test_core_pid() -> None:
    assert core_pid("checkpoint/core-17.img") == 17
    assert core_pid("core-1.img") == 1
    for name in ("checkpoint/core-x.img", "core-1.img.bak", "mm-1.img", "core-.img",
                 "core-12345678901.img"):
        assert core_pid(name) is None


@pytest.mark.parametrize(("data", "match"), [
    (b"", "truncated"),
    (b"\x19\x43\x56\x54" * 2, "truncated"),
    (struct.pack("<III", 0x54564319, 0x58313116, 0), "not a CRIU core image"),
    (struct.pack("<III", 0x54564319, 0x55053847, 5) + b"\x08", "claims 5"),
    (b"\0" * (MAX_CORE_IMAGE_BYTES + 1), "implausibly large"),
])
def test_bad_headers(data: bytes, match: str) -> None:
    with pytest.raises(CriuImageError, match=match):
        read_core_creds(data)


def _image(entry: bytes) -> bytes:
    return struct.pack("<III", 0x54564319, 0x55053847, len(entry)) + entry


@pytest.mark.parametrize(("entry", "match"), [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\xff" * 20, "longer than 10 bytes"),
    (b"\x08" + b"\xff" * 9 + b"\x7f", "past 64 bits"),
    (b"\x2a\x05ab", "runs past"),  # field 5, length 5, 2 bytes
    (b"\x0b", "wire type 3"),  # a group
    (b"\x00\x00", "field number 0"),
    (b"\x09\x00\x00", "runs past"),  # fixed64 cut short
    (b"\x28\x01", "not a message"),  # thread_core as a varint
    (b"\x08\x01", "no credentials"),
    (b"\x2a\x04\x08\x00\x10\x00", "no credentials"),
    (b"\x2a\x04\x52\x02\x08\x00", "without"),  # creds with uid only
])
def test_malformed_entries(entry: bytes, match: str) -> None:
    with pytest.raises(CriuImageError, match=match):
        read_core_creds(_image(entry), "core-1.img")


def test_too_many_capability_words() -> None:
    pb = make_hostile.pb_field
    creds = b"".join(pb(n, 0) for n in (1, 2, 3, 4, 5, 6, 7, 8, 13)) + pb(11, 1) * 9
    with pytest.raises(CriuImageError, match="words"):
        read_core_creds(make_hostile.core_image(creds))


def test_is_an_archive_error() -> None:
    assert issubclass(CriuImageError, ArchiveError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzzed_entries_raise_only_criu_image_errors(entry: bytes) -> None:
    with contextlib.suppress(CriuImageError):
        read_core_creds(_image(entry))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_images_raise_only_criu_image_errors(data: st.DataObject) -> None:
    image = bytearray((CRIU / "core-netraw-sysadmin.img").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(image) - 1))
        image[at] = data.draw(st.integers(0, 255))
    image = image[:data.draw(st.integers(0, len(image)))]
    if len(image) >= 12 and data.draw(st.booleans()):  # past the header, into the message
        image[8:12] = struct.pack("<I", len(image) - 12)
    with contextlib.suppress(CriuImageError):
        read_core_creds(bytes(image))


# --- pagemaps (post-copy's announced ranges) ---------------------------------------------

PE_PRESENT = 1 << 2


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _message(*fields: tuple[int, int]) -> bytes:
    body = b"".join(_varint(number << 3) + _varint(value) for number, value in fields)
    return struct.pack("<I", len(body)) + body


def pagemap_image(entries: list[tuple[int, int, int]], *, wide: bool = False) -> bytes:
    """A pagemap image: the head (pages_id 1), then (vaddr, pages, flags) entries; with
    ``wide`` the page count in nr_pages (field 5) as newer CRIUs write it."""
    count = 5 if wide else 2
    return (struct.pack("<II", 0x54564319, 0x56084025) + _message((1, 1)) + b"".join(
        _message((1, vaddr), (count, pages), (4, flags)) for vaddr, pages, flags in entries))


def test_pagemap_lazy_ranges() -> None:
    image = pagemap_image([(0x400000, 3, PE_PRESENT), (0x7F0000000000, 262144, 2),
                           (0x7F1000000000, 1, 2 | PE_PRESENT)])
    assert read_lazy_ranges(image) == [(0x7F0000000000, 262144), (0x7F1000000000, 1)]
    assert read_lazy_ranges(pagemap_image([(0x1000, 1 << 33, 2)], wide=True)) == [
        (0x1000, 1 << 33)]


@pytest.mark.parametrize(("data", "match"), [
    (b"\x19CVT", "truncated"),
    (struct.pack("<II", 0x54564319, 0x55053847), "not a CRIU pagemap"),
    (struct.pack("<III", 0x54564319, 0x56084025, 9) + b"\x08", "runs past"),
    (struct.pack("<II", 0x54564319, 0x56084025) + _message((1, 1)) + b"\x02\0\0\0\x08\xff",
     "truncated varint"),
])
def test_malformed_pagemaps(data: bytes, match: str) -> None:
    with pytest.raises(CriuImageError, match=match):
        read_lazy_ranges(data)
