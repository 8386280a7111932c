"""Read the credentials CRIU restores each task with, from its core-<pid>.img images.

CRIU restores every thread's uids, gids, capability sets and groups from
``core_entry.thread_core.creds`` (images/core.proto, images/creds.proto), whatever the
archive's spec says; so the privilege check must judge them. There is no ``crit`` here:
this is a minimal protobuf wire-format decoder for just those fields.

An image file is two little-endian magic words (CRIU's common magic, then the image's),
then one entry: a 4-byte little-endian length and that many bytes of protobuf message.
Everything is bounded (the image size, varint length, the number of capability words
and groups) and anything malformed raises :class:`CriuImageError`, never another error.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ctrmig.errors import CriuImageError

IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847
#: A real core image is 2 KiB or so; anything past this is refused unread.
MAX_CORE_IMAGE_BYTES = 1 << 20
#: Capability sets are written as 32-bit words (two today).
MAX_CAP_WORDS = 8
MAX_GROUPS = 65536  # NGROUPS_MAX
CORE_NAME = re.compile(r"core-(\d{1,10})\.img")

# Field numbers, from CRIU's images/core.proto and images/creds.proto.
_CORE_TC = 3  # core_entry.tc (task_core_entry)
_TC_TASK_STATE = 1  # task_core_entry.task_state
TASK_DEAD = 2  # compel's task-state.h: a zombie
_CORE_THREAD_CORE = 5  # core_entry.thread_core
_THREAD_CORE_CREDS = 10  # thread_core_entry.creds
_CREDS_IDS = {1: "uid", 2: "gid", 3: "euid", 4: "egid", 5: "suid", 6: "sgid", 7: "fsuid",
              8: "fsgid", 13: "secbits"}
_CREDS_CAPS = {9: "cap_inh", 10: "cap_prm", 11: "cap_eff", 12: "cap_bnd"}
_CREDS_GROUPS = 14

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_U32 = 0xFFFFFFFF

#: linux/capability.h, in bit order.
CAPABILITY_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
#: Every capability the names above cover.
ALL_CAPABILITIES = (1 << len(CAPABILITY_NAMES)) - 1


def capability_name(bit: int) -> str:
    """``SYS_ADMIN`` for bit 21; ``CAP_<n>`` for a bit this table does not know."""
    return CAPABILITY_NAMES[bit] if 0 <= bit < len(CAPABILITY_NAMES) else f"CAP_{bit}"


def capability_names(mask: int) -> list[str]:
    """The names of the bits set in ``mask``, in bit order."""
    return [capability_name(bit) for bit in range(mask.bit_length()) if mask >> bit & 1]


@dataclass(frozen=True)
class Creds:
    """One thread's credentials as CRIU will restore them; capability sets as bit masks."""

    uid: int
    gid: int
    euid: int
    egid: int
    suid: int
    sgid: int
    fsuid: int
    fsgid: int
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    secbits: int
    groups: tuple[int, ...]

    @property
    def uids(self) -> set[int]:
        return {self.uid, self.euid, self.suid, self.fsuid}


def core_pid(name: str) -> int | None:
    """The PID in a ``core-<pid>.img`` member name (any directory), else None."""
    match = CORE_NAME.fullmatch(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def read_core_creds(data: bytes, name: str = "core image") -> Creds | None:
    """The credentials in the core image ``data`` (the file's bytes); None for a zombie
    (CRIU writes a dead task's core without credentials and restores it only to exit);
    CriuImageError if it is not a well-formed core image or a live task carries none (CRIU
    would then restore the task with its own, root's, credentials)."""
    if len(data) > MAX_CORE_IMAGE_BYTES:
        raise CriuImageError(f"{name} is implausibly large ({len(data)} bytes)")
    if len(data) < 12:
        raise CriuImageError(f"{name} is truncated ({len(data)} bytes)")
    common, magic, size = struct.unpack_from("<III", data)
    if common != IMG_COMMON_MAGIC or magic != CORE_MAGIC:
        raise CriuImageError(f"{name} is not a CRIU core image (magic {common:#x} {magic:#x})")
    if size != len(data) - 12:
        raise CriuImageError(f"{name} holds {len(data) - 12} bytes after its header, "
                             f"which claims {size}")
    try:
        thread_core = _submessage(memoryview(data)[12:], _CORE_THREAD_CORE)
        creds = _submessage(thread_core, _THREAD_CORE_CREDS) if thread_core is not None else None
        if creds is None and _task_state(memoryview(data)[12:]) == TASK_DEAD:
            # Seen: a container's exited `sleep` not yet reaped at the dump. CRIU restores
            # a zombie by forking a task that exits at once: it runs no code to privilege.
            return None
        if creds is None:
            raise CriuImageError(f"{name} carries no credentials",
                                 hint="it was not written by a CRIU this ctrmig reads")
        return _creds(creds, name)
    except _Malformed as e:
        raise CriuImageError(f"{name} is malformed: {e}") from None


def _task_state(core: memoryview) -> int | None:
    tc = _submessage(core, _CORE_TC)
    if tc is None:
        return None
    for number, _wire, value in _fields(tc):
        if number == _TC_TASK_STATE and isinstance(value, int):
            return value
    return None


class _Malformed(Exception):
    """Internal: the wire format is broken (turned into CriuImageError with the name)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if value >> 64:
                raise _Malformed("varint past 64 bits")
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message; skips fixed ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > len(buf) - pos:
                raise _Malformed(f"field {number} runs past its message")
            yield number, wire, buf[pos:pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > len(buf):
                raise _Malformed(f"field {number} runs past its message")
        else:
            raise _Malformed(f"field {number} has wire type {wire}")


def _submessage(buf: memoryview, number: int) -> memoryview | None:
    """Field ``number`` of ``buf`` as a message; protobuf merges repeated occurrences of
    an embedded message, which is the same as parsing their concatenation."""
    parts: list[memoryview] = []
    for num, wire, value in _fields(buf):
        if num == number:
            if not isinstance(value, memoryview):
                raise _Malformed(f"field {number} is not a message (wire type {wire})")
            parts.append(value)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


def _uint32s(value: int | memoryview) -> Iterator[int]:
    """A repeated uint32's values: one varint, or a packed run of them."""
    if isinstance(value, int):
        yield value & _U32
        return
    pos = 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        yield item & _U32


def _creds(buf: memoryview, name: str) -> Creds:
    ids: dict[str, int] = {}
    caps: dict[str, list[int]] = {v: [] for v in _CREDS_CAPS.values()}
    groups: list[int] = []
    for number, _wire, value in _fields(buf):
        if number in _CREDS_IDS:
            if not isinstance(value, int):
                raise _Malformed(f"creds field {number} is not a number")
            ids[_CREDS_IDS[number]] = value & _U32  # uint32: the low bits, as protobuf-c
        elif number in _CREDS_CAPS:
            words = caps[_CREDS_CAPS[number]]
            for word in _uint32s(value):
                words.append(word)
                if len(words) > MAX_CAP_WORDS:
                    raise _Malformed(f"more than {MAX_CAP_WORDS} words in a capability set")
        elif number == _CREDS_GROUPS:
            for group in _uint32s(value):
                groups.append(group)
                if len(groups) > MAX_GROUPS:
                    raise _Malformed(f"more than {MAX_GROUPS} groups")
    missing = sorted(set(_CREDS_IDS.values()) - set(ids))
    if missing:
        raise CriuImageError(f"{name} has credentials without {', '.join(missing)}")
    masks = {key: sum(w << (32 * i) for i, w in enumerate(words)) for key, words in caps.items()}
    return Creds(**ids, **masks, groups=tuple(groups))


# --- mountpoints-<id>.img: the mount tree CRIU will rebuild ------------------------------

MNTS_MAGIC = 0x55563928
#: A container's mount table is a few KiB; a hostile image is refused past this.
MAX_MOUNTPOINTS_BYTES = 4 << 20
MOUNTPOINTS_NAME = re.compile(r"mountpoints-(\d{1,10})\.img")
# images/mnt.proto: mnt_entry.
_MNT_FSTYPE, _MNT_ID, _MNT_ROOT, _MNT_MOUNTPOINT = 1, 2, 6, 7
_MNT_SHARED_ID, _MNT_MASTER_ID, _MNT_EXT_MOUNT, _MNT_EXT_KEY = 10, 11, 13, 18


@dataclass(frozen=True)
class MountPoint:
    """One mount of the dumped mount namespace; ``external`` is the key CRIU's restore
    must be given a mount for (``--ext-mount-map KEY:PATH``), else empty."""

    mountpoint: str
    fstype: int
    root: str
    external: str
    mnt_id: int = 0


def read_mountpoints(data: bytes, name: str = "mountpoints image") -> list[MountPoint]:
    """The mounts in a ``mountpoints-<id>.img`` (bytes of the file); CriuImageError if
    it is not a well-formed one."""
    _check_header(data, name, MNTS_MAGIC, "mountpoints", MAX_MOUNTPOINTS_BYTES)
    try:
        return [_mount_point(entry) for entry in _entries(data, 8)]
    except (_Malformed, UnicodeDecodeError) as e:
        raise CriuImageError(f"{name} is malformed: {e}") from None


def _check_header(data: bytes, name: str, magic: int, kind: str, limit: int) -> None:
    """An image of many entries: bounded in size, starting with its two magic words."""
    if len(data) > limit:
        raise CriuImageError(f"{name} is implausibly large ({len(data)} bytes)")
    if len(data) < 8:
        raise CriuImageError(f"{name} is truncated ({len(data)} bytes)")
    common, found = struct.unpack_from("<II", data)
    if common != IMG_COMMON_MAGIC or found != magic:
        raise CriuImageError(f"{name} is not a CRIU {kind} image "
                             f"(magic {common:#x} {found:#x})")


def _entries(data: bytes, pos: int) -> Iterator[memoryview]:
    """The entries of an image from offset ``pos``: each a 4-byte length, then that many
    bytes of one message."""
    while pos < len(data):
        if pos + 4 > len(data):
            raise _Malformed("truncated entry length")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size > len(data) - pos:
            raise _Malformed("entry runs past the image")
        yield memoryview(data)[pos:pos + size]
        pos += size


PAGEMAP_MAGIC = 0x56084025
PAGEMAP_NAME = re.compile(r"pagemap-(\d{1,10})\.img")
PE_LAZY = 1 << 1  # criu/include/pagemap.h
#: images/pagemap.proto: pagemap_entry's vaddr, compat_nr_pages, flags, nr_pages.
_PE_VADDR, _PE_COMPAT_NR_PAGES, _PE_FLAGS, _PE_NR_PAGES = 1, 2, 4, 5
MAX_PAGEMAP_BYTES = 64 << 20


def read_lazy_ranges(data: bytes, name: str = "pagemap image") -> list[tuple[int, int]]:
    """(vaddr, pages) of each range a ``pagemap-<id>.img`` marks lazy: the pages a
    ``--lazy-pages`` dump serves (one entry per run of its page pipes, criu/page-xfer.c);
    CriuImageError if it is not a well-formed pagemap."""
    _check_header(data, name, PAGEMAP_MAGIC, "pagemap", MAX_PAGEMAP_BYTES)
    ranges = []
    try:
        for i, entry in enumerate(_entries(data, 8)):
            if i == 0:
                continue  # pagemap_head
            fields = {n: v for n, _w, v in _fields(entry) if isinstance(v, int)}
            pages = fields.get(_PE_NR_PAGES, fields.get(_PE_COMPAT_NR_PAGES, 0))
            if fields.get(_PE_FLAGS, 0) & PE_LAZY and pages and _PE_VADDR in fields:
                ranges.append((fields[_PE_VADDR], pages))
    except _Malformed as e:
        raise CriuImageError(f"{name} is malformed: {e}") from None
    return ranges


def _mount_point(entry: memoryview) -> MountPoint:
    text: dict[int, str] = {}
    ints: dict[int, int] = {}
    for number, _wire, value in _fields(entry):
        if isinstance(value, memoryview):
            text[number] = bytes(value).decode()
        else:
            ints[number] = value
    if _MNT_MOUNTPOINT not in text:
        raise _Malformed("a mount without a mountpoint")
    # Older CRIUs mark an external mount with ext_mount and keep the key in root.
    key = text.get(_MNT_EXT_KEY) or (text.get(_MNT_ROOT, "") if ints.get(_MNT_EXT_MOUNT)
                                     else "")
    return MountPoint(mountpoint=text[_MNT_MOUNTPOINT], fstype=ints.get(_MNT_FSTYPE, 0),
                      root=text.get(_MNT_ROOT, ""), external=key,
                      mnt_id=ints.get(_MNT_ID, 0))


FILES_MAGIC = 0x56303138
FILES_IMAGE = "files.img"
MAX_FILES_BYTES = 64 << 20
# images/fdinfo.proto file_entry, images/regfile.proto reg_file_entry.
_FILE_REG, _REG_NAME, _REG_MNT_ID, _REG_MODE = 3, 6, 7, 10


def root_mode(files: bytes, mountpoints: list[MountPoint]) -> int | None:
    """The mode CRIU expects of the container's root directory (it refuses to restore
    into a root of another mode: "File . has bad mode"), from files.img; None if no
    open file refers to it."""
    roots = {m.mnt_id for m in mountpoints if m.mountpoint == "/"}
    if len(files) > MAX_FILES_BYTES or len(files) < 8 or len(roots) != 1:
        return None
    common, magic = struct.unpack_from("<II", files)
    if common != IMG_COMMON_MAGIC or magic != FILES_MAGIC:
        raise CriuImageError(f"{FILES_IMAGE} is not a CRIU files image")
    pos = 8
    try:
        while pos + 4 <= len(files):
            (size,) = struct.unpack_from("<I", files, pos)
            pos += 4
            if size > len(files) - pos:
                raise _Malformed("entry runs past the image")
            reg = _submessage(memoryview(files)[pos:pos + size], _FILE_REG)
            pos += size
            if reg is None:
                continue
            fields = {n: v for n, _w, v in _fields(reg)}
            name, mnt, mode = (fields.get(_REG_NAME), fields.get(_REG_MNT_ID),
                               fields.get(_REG_MODE))
            if (isinstance(name, memoryview) and bytes(name) == b"/" and isinstance(mnt, int)
                    and _zigzag(mnt) in roots and isinstance(mode, int)):
                return mode
    except _Malformed as e:
        raise CriuImageError(f"{FILES_IMAGE} is malformed: {e}") from None
    return None


def _zigzag(value: int) -> int:
    """A sint32's value from its varint."""
    return (value >> 1) ^ -(value & 1)


def without_root_mode(files: bytes, mountpoints: list[MountPoint]) -> bytes:
    """files.img with the recorded mode left out of the root directory's entries, so
    that CRIU restores into a root of another mode (it checks a mode only where one is
    recorded). For a target that cannot set its root's mode (podman's import applies no
    mode to the root of its layer)."""
    roots = {m.mnt_id for m in mountpoints if m.mountpoint == "/"}
    out, pos = bytearray(files[:8]), 8
    try:
        while pos + 4 <= len(files):
            (size,) = struct.unpack_from("<I", files, pos)
            entry = memoryview(files)[pos + 4:pos + 4 + size]
            if len(entry) != size:
                raise _Malformed("entry runs past the image")
            pos += 4 + size
            kept = bytearray()
            for number, wire, raw, value in _spans(entry):
                if number == _FILE_REG and isinstance(value, memoryview) and _is_root(value,
                                                                                      roots):
                    reg = b"".join(r for n, _w, r, _v in _spans(value) if n != _REG_MODE)
                    kept += _key(number, wire) + _encode_varint(len(reg)) + reg
                else:
                    kept += raw
            out += struct.pack("<I", len(kept)) + kept
    except _Malformed as e:
        raise CriuImageError(f"{FILES_IMAGE} is malformed: {e}") from None
    return bytes(out)


def _is_root(reg: memoryview, roots: set[int]) -> bool:
    fields = {n: v for n, _w, v in _fields(reg)}
    name, mnt = fields.get(_REG_NAME), fields.get(_REG_MNT_ID)
    return (isinstance(name, memoryview) and bytes(name) == b"/" and isinstance(mnt, int)
            and _zigzag(mnt) in roots)


def _spans(buf: memoryview) -> Iterator[tuple[int, int, bytes, int | memoryview | None]]:
    """(number, wire type, the field's raw bytes, its value) of each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview | None = None
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > len(buf) - pos:
                raise _Malformed(f"field {number} runs past its message")
            value = buf[pos:pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _Malformed(f"field {number} has wire type {wire}")
        if pos > len(buf):
            raise _Malformed(f"field {number} runs past its message")
        yield number, wire, bytes(buf[start:pos]), value


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def without_outside_masters(data: bytes, name: str = "mountpoints image") -> bytes:
    """A mountpoints image whose mounts are no longer slaves of a peer group outside the
    dump. docker's root mount is a slave of the host's (runc makes the root rslave, and
    dockerd's data root is shared); restored by another engine, whose root is private,
    CRIU cannot copy that sharing ("Failed to copy sharing from ... criu-root"): the
    mount is restored private instead, as every other engine's root is."""
    read_mountpoints(data, name)  # well-formed, or refused
    entries, pos = [], 8
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        entries.append(memoryview(data)[pos + 4:pos + 4 + size])
        pos += 4 + size
    try:
        spans = [list(_spans(e)) for e in entries]
    except _Malformed as e:
        raise CriuImageError(f"{name} is malformed: {e}") from None
    shared = {v for fields in spans for n, _w, _r, v in fields if n == _MNT_SHARED_ID and v}
    out = bytearray(data[:8])
    for fields in spans:
        body = b"".join(raw for n, _w, raw, v in fields
                        if not (n == _MNT_MASTER_ID and v and v not in shared))
        out += struct.pack("<I", len(body)) + body
    return bytes(out)


NETNS_MAGIC = 0x55933752
NETNS_NAME = re.compile(r"netns-(\d{1,10})\.img")
_NETNS_EXT_KEY = 8  # images/netdev.proto netns_entry.ext_key


def external_netns(data: bytes) -> bool:
    """Whether a netns-<id>.img records a network namespace CRIU left alone as external
    (podman's and ctrmig's runc: a namespace with a path), which a restore must be given;
    docker dumps with the network namespace empty (``--empty-ns network``), writing none."""
    if len(data) < 12 or len(data) > MAX_CORE_IMAGE_BYTES:
        return False
    common, magic, size = struct.unpack_from("<III", data)
    if common != IMG_COMMON_MAGIC or magic != NETNS_MAGIC or size > len(data) - 12:
        return False
    try:
        return any(n == _NETNS_EXT_KEY for n, _w, _v in _fields(memoryview(data)[12:12 + size]))
    except _Malformed:
        return False
