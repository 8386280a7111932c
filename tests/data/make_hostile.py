"""Generate the corpus of hostile archives in tests/data/hostile/ (deterministically).

Run ``python tests/data/make_hostile.py`` after changing a case; the unit test checks that
the committed files are what this script writes. Each case is a small archive built by
hand (tarfile, or raw header bytes where tarfile cannot write the trick) that the safe
reader must refuse with a specific error class before anything reaches an engine.
``expected.json`` maps each file to its error class, what it tests, and any reader Limits
the case needs (e.g. a low member cap, so that the file stays small).

Cases of ``stage`` "restore" are well-formed tars that the reader accepts: what they hide
is in a CRIU core image (capabilities the spec does not declare, or a malformed image),
and the restore refuses them before any engine call. :func:`core_image` writes such
images (CRIU's file layout and protobuf wire format, just the fields ctrmig reads).

Absolute paths and link targets point into SENTINEL, a directory the test checks is never
created. The decompression bombs are built at test time (see BOMBS), not committed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zstandard

HERE = Path(__file__).resolve().parent
OUT = HERE / "hostile"
SENTINEL = "/tmp/ctrmig-hostile-sentinel"
PAGES = b"\x01\x02\x03\x04" * 256
SPEC = b'{"ociVersion": "1.0.2-dev"}'


@dataclass(frozen=True)
class Case:
    """One hostile archive: its file name, the error it must raise, and why."""

    name: str
    error: str
    what: str
    build: Callable[[], bytes]
    limits: dict[str, int] = field(default_factory=dict)
    stage: str = "read"  # or "restore": the reader accepts it, restore refuses it


# --- building blocks --------------------------------------------------------------------


def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode, ti.mtime = size, kind, 0o644, 0
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def tar(members: list[tuple[tarfile.TarInfo, bytes | None]],
        fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of ``members``; data None for non-files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def manifest_text(listed: dict[str, bytes], **override: Any) -> bytes:
    """A valid manifest.yaml listing ``listed`` (name -> contents), fields overridable."""
    doc: dict[str, Any] = {
        "format": "ctrmig-checkpoint", "format_version": 1, "engine": "podman",
        "engine_version": "5.0.0", "criu_version": "4.0", "kernel": "6.1.0", "arch": "x86_64",
        "source_host": "hostile", "created": "2026-01-01T00:00:00Z",
        "container": {"name": "hostile", "id": "0" * 64, "image": "", "image_id": "",
                      "command": []},
        "options": {}, "extra": {},
        "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for n, d in sorted(listed.items())},
    }
    doc.update(override)
    return yaml.safe_dump(doc, sort_keys=False).encode()


def file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return info(name, len(data)), data


def valid_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of a small valid archive, manifest last."""
    files = {"checkpoint/pages-1.img": PAGES, "spec.dump": SPEC}
    return [(info("checkpoint", kind=tarfile.DIRTYPE), None),
            *(file(n, d) for n, d in files.items()),
            file("manifest.yaml", manifest_text(files))]


def with_manifest(members: list[tuple[tarfile.TarInfo, bytes | None]],
                  listed: dict[str, bytes] | None = None,
                  fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """``members`` followed by a manifest listing ``listed`` (default: the files)."""
    if listed is None:
        listed = {ti.name: d for ti, d in members if d is not None and ti.isfile()}
    return tar([*members, file("manifest.yaml", manifest_text(listed))], fmt)


def checksum(header: bytearray) -> bytearray:
    """Recompute a raw 512-byte tar header's checksum field."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


def retyped(data: bytes, at: int, kind: bytes) -> bytes:
    """``data`` with the header at offset ``at`` given tar type ``kind``."""
    out = bytearray(data)
    header = bytearray(out[at:at + 512])
    header[156:157] = kind
    out[at:at + 512] = checksum(header)
    return bytes(out)


def gz(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as f:
        f.write(data)
    return buf.getvalue()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


# --- the cases --------------------------------------------------------------------------


def absolute() -> bytes:
    return with_manifest([file(f"{SENTINEL}/escaped", b"pwned")])


def dotdot() -> bytes:
    return with_manifest([file("../ctrmig-escaped", b"pwned")])


def dotdot_nested() -> bytes:
    return with_manifest([file("checkpoint/../../ctrmig-escaped", b"pwned")])


def symlink() -> bytes:
    # The classic: a symlink out, then a file written "through" it.
    return with_manifest([(info("checkpoint", kind=tarfile.SYMTYPE, linkname=SENTINEL), None),
                          file("checkpoint/escaped", b"pwned")])


def symlink_relative() -> bytes:
    return with_manifest([(info("up", kind=tarfile.SYMTYPE, linkname="../../.."), None),
                          file("up/escaped", b"pwned")])


def hardlink() -> bytes:
    return with_manifest([(info("passwd", kind=tarfile.LNKTYPE, linkname="/etc/passwd"), None)])


def chardev() -> bytes:
    return with_manifest([(info("mem", kind=tarfile.CHRTYPE, devmajor=1, devminor=1), None)])


def blockdev() -> bytes:
    return with_manifest([(info("disk", kind=tarfile.BLKTYPE, devmajor=8, devminor=0), None)])


def fifo() -> bytes:
    return with_manifest([(info("pipe", kind=tarfile.FIFOTYPE), None)])


def duplicate() -> bytes:
    return with_manifest([file("spec.dump", SPEC), file("spec.dump", b'{"evil": true}')],
                         listed={"spec.dump": SPEC})


def duplicate_normalised() -> bytes:
    # "./spec.dump" and "spec.dump" are one file once normalised.
    return with_manifest([file("spec.dump", SPEC), file("./spec.dump", SPEC)],
                         listed={"spec.dump": SPEC})


def file_below_file() -> bytes:
    return with_manifest([file("checkpoint", b"a file"), file("checkpoint/pages-1.img", PAGES)])


def file_over_dir() -> bytes:
    return with_manifest([file("checkpoint/pages-1.img", PAGES), file("checkpoint", b"a file")])


def bigger_than_manifest() -> bytes:
    # The manifest says 16 bytes; the member holds 1 KiB (which the reader reads, then
    # refuses once the manifest at the end says otherwise).
    return with_manifest([file("checkpoint/pages-1.img", PAGES)],
                         listed={"checkpoint/pages-1.img": PAGES[:16]})


def checksum_mismatch() -> bytes:
    tampered = bytearray(PAGES)
    tampered[100] ^= 0xFF
    return with_manifest([file("checkpoint/pages-1.img", bytes(tampered))],
                         listed={"checkpoint/pages-1.img": PAGES})


def missing_member() -> bytes:
    return with_manifest([file("spec.dump", SPEC)],
                         listed={"spec.dump": SPEC, "checkpoint/pages-1.img": PAGES})


def unlisted_member() -> bytes:
    return with_manifest([file("spec.dump", SPEC), file("extra.bin", b"x")],
                         listed={"spec.dump": SPEC})


def truncated_zstd() -> bytes:
    data = zst(tar(valid_members()))
    return data[: len(data) // 2]


def truncated_at_header() -> bytes:
    # Cut on a 512-byte boundary, just before manifest.yaml's header.
    data = tar(valid_members())
    return data[: data.index(b"manifest.yaml") // 512 * 512]


def truncated_in_member() -> bytes:
    data = tar(valid_members())
    return data[: data.index(PAGES) + 100]


def not_a_tar() -> bytes:
    return b"This is not a tar archive, only text pretending to be one.\n" * 20


def empty() -> bytes:
    return b""


def gzip_garbage() -> bytes:
    return b"\x1f\x8b" + b"not really gzip" * 10


def zstd_garbage() -> bytes:
    return b"\x28\xb5\x2f\xfd" + b"not really zstd" * 10


def manifest_not_yaml() -> bytes:
    return tar([file("spec.dump", SPEC), file("manifest.yaml", b"files: [unclosed\n  - {")])


def manifest_python_object() -> bytes:
    text = (f'!!python/object/apply:os.system ["mkdir -p {SENTINEL}"]\n').encode()
    return tar([file("manifest.yaml", text)])


def manifest_python_object_nested() -> bytes:
    text = manifest_text({}).replace(
        b"options: {}", f'options: !!python/object/apply:os.system ["mkdir {SENTINEL}"]'.encode()
    )
    return tar([file("manifest.yaml", text)])


def manifest_wrong_schema() -> bytes:
    return tar([file("spec.dump", SPEC),
                file("manifest.yaml", manifest_text({"spec.dump": SPEC}, files=["spec.dump"]))])


def manifest_not_ctrmig() -> bytes:
    return tar([file("manifest.yaml", manifest_text({}, format="something-else"))])


def manifest_billion_laughs() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    text = "\n".join(lines).encode() + b"\n" + manifest_text({}).replace(
        b"command: []", b"command: *i")
    return tar([file("manifest.yaml", text)])


def manifest_deeply_nested() -> bytes:
    return tar([file("manifest.yaml", b"extra: " + b"[" * 5000 + b"]" * 5000 + b"\n")])


def manifest_missing() -> bytes:
    return tar([file("spec.dump", SPEC)])


def manifest_is_a_dir() -> bytes:
    return tar([file("spec.dump", SPEC), (info("manifest.yaml", kind=tarfile.DIRTYPE), None)])


def manifest_too_large() -> bytes:
    # The header claims 5 MiB; the reader must refuse before reading it.
    return tar([file("manifest.yaml", b"#" * ((4 << 20) + 1))])[:2048]


def member_after_manifest() -> bytes:
    return tar([*valid_members(), file("checkpoint/late.img", b"smuggled")])


def second_manifest() -> bytes:
    return tar([*valid_members(), file("manifest.yaml", manifest_text({}))])


def data_after_end() -> bytes:
    # A complete archive, then one zero block (where a lenient reader stops), then a
    # member that a reader ignoring zero blocks would see.
    hidden = tar([file("checkpoint/hidden.img", b"smuggled")])
    return tar(valid_members()).rstrip(b"\0") + b"\0" * 512 + hidden


def too_many_members() -> bytes:
    return with_manifest([file(f"checkpoint/f{i}", b"") for i in range(40)])


def pax_path_dotdot() -> bytes:
    ti = info("innocent.img", 5, pax_headers={"path": "../../ctrmig-escaped"})
    return with_manifest([(ti, b"pwned")], listed={})


def pax_path_absolute() -> bytes:
    ti = info("innocent.img", 5, pax_headers={"path": f"{SENTINEL}/escaped"})
    return with_manifest([(ti, b"pwned")], listed={})


def pax_linkpath() -> bytes:
    # A regular-looking header made a symlink by the pax linkpath plus its type.
    ti = info("innocent", kind=tarfile.SYMTYPE, pax_headers={"linkpath": SENTINEL})
    return with_manifest([(ti, None)], listed={})


def pax_global_header() -> bytes:
    # A global header renames every later member in some readers.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"path": "../ctrmig-escaped"}) as t:
        ti, data = file("spec.dump", SPEC)
        t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def pax_size_huge() -> bytes:
    # The pax size field overrides the header's: 1 PiB of data that is not there.
    ti = info("checkpoint/pages-1.img", len(PAGES), pax_headers={"size": str(1 << 50)})
    return tar([(ti, PAGES)])


def pax_header_huge() -> bytes:
    # An extended header claiming 2 GiB: tarfile would read it all into memory.
    ti = info("x", 0)
    header = bytearray(ti.tobuf(format=tarfile.USTAR_FORMAT))
    header[0:100] = b"././@PaxHeader".ljust(100, b"\0")
    header[124:136] = b"%011o\0" % (2 << 30)
    header[156:157] = tarfile.XHDTYPE
    return bytes(checksum(header)) + b"30 path=aaaaaaaaaaaaaaaaaaaaa\n" * 10


def pax_chain() -> bytes:
    # Thousands of chained extended headers: tarfile recurses once per header.
    record = b"27 comment=ctrmig-hostile!\n"
    block = bytearray(info("x").tobuf(format=tarfile.USTAR_FORMAT))
    block[0:100] = b"././@PaxHeader".ljust(100, b"\0")
    block[124:136] = b"%011o\0" % len(record)
    block[156:157] = tarfile.XHDTYPE
    one = bytes(checksum(block)) + record.ljust(512, b"\0")
    return gz(one * 5000 + tar(valid_members()))


def gnu_longname_dotdot() -> bytes:
    name = "checkpoint/" + "a" * 120 + "/../../../ctrmig-escaped"
    return with_manifest([file(name, b"pwned")], listed={}, fmt=tarfile.GNU_FORMAT)


def gnu_longname_absolute() -> bytes:
    name = SENTINEL + "/" + "b" * 120 + "/escaped"
    return with_manifest([file(name, b"pwned")], listed={}, fmt=tarfile.GNU_FORMAT)


def gnu_sparse() -> bytes:
    # An old-GNU sparse member (type 'S'): a small file that expands to its "real size".
    data = tar([file("checkpoint/pages-1.img", PAGES)], fmt=tarfile.GNU_FORMAT)
    return retyped(data, 0, tarfile.GNUTYPE_SPARSE)


def pax_sparse() -> bytes:
    # A GNU 1.0 sparse member in pax headers: 1 TiB of holes around 512 real bytes.
    sparse_map = b"1\n0\n512\n".ljust(512, b"\0")
    ti = info("GNUSparseFile.0/pages-1.img", 1024, pax_headers={
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
        "GNU.sparse.name": "checkpoint/pages-1.img", "GNU.sparse.realsize": str(1 << 40)})
    return tar([(ti, sparse_map + PAGES[:512])])


def negative_size() -> bytes:
    # A base-256 size field holding -1024.
    data = bytearray(with_manifest([file("spec.dump", SPEC)]))
    header = bytearray(data[:512])
    if header[156:157] == tarfile.XHDTYPE:  # skip a leading pax header
        raise AssertionError("expected a plain first header")
    header[124:136] = b"\xff" * 10 + b"\xfc\x00"
    data[:512] = checksum(header)
    return bytes(data)


def dir_with_data() -> bytes:
    # A directory entry carrying data: tarfile parses that data as the next header.
    inner = tar([file("checkpoint/hidden.img", b"smuggled")])[:1024]
    header = bytearray(info("checkpoint", len(inner), kind=tarfile.DIRTYPE)
                       .tobuf(format=tarfile.USTAR_FORMAT))
    return bytes(checksum(header)) + inner + tar(valid_members())


# --- CRIU core images -------------------------------------------------------------------

SPECS = HERE / "specs"
#: podman's default bounding set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID,
#: SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, SETFCAP) as linux/capability.h bits.
PODMAN_CAPS = sum(1 << b for b in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31))
SYS_ADMIN = 1 << 21


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def creds_message(uid: int = 0, caps: int = PODMAN_CAPS, bounding: int | None = None,
                  groups: tuple[int, ...] = ()) -> bytes:
    """creds_entry (images/creds.proto); capability sets as two 32-bit words each."""
    bounding = caps if bounding is None else bounding
    out = b"".join(pb_field(n, uid if n in (1, 3, 5, 7) else 0) for n in range(1, 9))
    for number, mask in ((9, 0), (10, caps), (11, caps), (12, bounding)):
        out += pb_field(number, mask & 0xFFFFFFFF) + pb_field(number, mask >> 32)
    out += pb_field(13, 0)
    return out + b"".join(pb_field(14, g) for g in groups)


def core_image(creds: bytes | None = None, *, magic: int = 0x55053847,
               size: int | None = None) -> bytes:
    """core-<pid>.img: CRIU's two magic words, the entry's length, core_entry with
    thread_core.creds (images/core.proto); creds None for none."""
    thread_core = pb_field(1, 0) + pb_field(2, 0)
    if creds is not None:
        thread_core += pb_field(10, creds)
    entry = pb_field(1, 1) + pb_field(5, thread_core)  # mtype X86_64, thread_core
    return struct.pack("<III", 0x54564319, magic, len(entry) if size is None else size) + entry


def zombie_core_image(exit_code: int = 0) -> bytes:
    """core-<pid>.img of a zombie as CRIU writes it: tc.task_state TASK_DEAD, no creds."""
    tc = pb_field(1, 2) + pb_field(2, exit_code)  # task_state, exit_code
    entry = pb_field(1, 1) + pb_field(3, tc)
    return struct.pack("<III", 0x54564319, 0x55053847, len(entry)) + entry


def podman_archive(core: bytes) -> bytes:
    """An ordinary podman archive (its real default spec and config) with ``core``."""
    files = {"checkpoint/core-1.img": core, "checkpoint/pages-1.img": PAGES,
             "config.dump": (SPECS / "podman-default.config.json").read_bytes(),
             "spec.dump": (SPECS / "podman-default.spec.json").read_bytes()}
    return with_manifest([file(n, d) for n, d in files.items()])


def core_sys_admin() -> bytes:
    return podman_archive(core_image(creds_message(caps=PODMAN_CAPS | SYS_ADMIN)))


def core_bounding_all() -> bytes:
    return podman_archive(core_image(creds_message(bounding=(1 << 41) - 1)))


def core_truncated() -> bytes:
    return podman_archive(core_image(creds_message(caps=PODMAN_CAPS | SYS_ADMIN))[:-3])


def core_without_creds() -> bytes:
    return podman_archive(core_image(None))


def core_huge_length() -> bytes:
    return podman_archive(core_image(creds_message(), size=0x7FFFFFFF))


def core_endless_varint() -> bytes:
    entry = pb_field(1, 1) + varint(5 << 3 | 2) + b"\xff" * 64
    return podman_archive(struct.pack("<III", 0x54564319, 0x55053847, len(entry)) + entry)


def long_name() -> bytes:
    return with_manifest([file("checkpoint/" + "n" * 300, b"x")], listed={})


def backslash_name() -> bytes:
    return with_manifest([file("..\\..\\ctrmig-escaped", b"pwned")], listed={})


CASES: list[Case] = [
    Case("absolute_path.tar", "UnsafeArchiveError", "a member with an absolute path", absolute),
    Case("dotdot.tar", "UnsafeArchiveError", "a member named ../x", dotdot),
    Case("dotdot_nested.tar", "UnsafeArchiveError", "a member named checkpoint/../../x",
         dotdot_nested),
    Case("symlink.tar", "UnsafeArchiveError",
         "a symlink to an absolute path, then a file written through it", symlink),
    Case("symlink_relative.tar", "UnsafeArchiveError",
         "a symlink to ../../.., then a file written through it", symlink_relative),
    Case("hardlink.tar", "UnsafeArchiveError", "a hard link to /etc/passwd", hardlink),
    Case("chardev.tar", "UnsafeArchiveError", "a character device node (/dev/mem's numbers)",
         chardev),
    Case("blockdev.tar", "UnsafeArchiveError", "a block device node", blockdev),
    Case("fifo.tar", "UnsafeArchiveError", "a fifo", fifo),
    Case("duplicate.tar", "UnsafeArchiveError", "the same name twice, second one different",
         duplicate),
    Case("duplicate_normalised.tar", "UnsafeArchiveError",
         "spec.dump and ./spec.dump (one name once normalised)", duplicate_normalised),
    Case("file_below_file.tar", "UnsafeArchiveError", "a file, then a file below it",
         file_below_file),
    Case("file_over_dir.tar", "UnsafeArchiveError",
         "a file below a path, then a file at that path", file_over_dir),
    Case("bigger_than_manifest.tar", "ChecksumError",
         "a member bigger than its manifest entry", bigger_than_manifest),
    Case("checksum_mismatch.tar", "ChecksumError", "one byte changed in a member",
         checksum_mismatch),
    Case("missing_member.tar", "ChecksumError", "a manifest entry without its member",
         missing_member),
    Case("unlisted_member.tar", "UnsafeArchiveError", "a member the manifest does not list",
         unlisted_member),
    Case("truncated.tar.zst", "ArchiveCorruptError", "a zstd archive cut in half",
         truncated_zstd),
    Case("truncated_at_header.tar", "ManifestError",
         "a tar cut on a block boundary before manifest.yaml", truncated_at_header),
    Case("truncated_in_member.tar", "ArchiveCorruptError", "a tar cut inside a member",
         truncated_in_member),
    Case("not_a_tar.bin", "ArchiveCorruptError", "plain text", not_a_tar),
    Case("empty.tar", "ArchiveCorruptError", "an empty file", empty),
    Case("gzip_garbage.tar.gz", "ArchiveCorruptError", "gzip magic, then garbage",
         gzip_garbage),
    Case("zstd_garbage.tar.zst", "ArchiveCorruptError", "zstd magic, then garbage",
         zstd_garbage),
    Case("manifest_not_yaml.tar", "ManifestError", "manifest.yaml that is not YAML",
         manifest_not_yaml),
    Case("manifest_python_object.tar", "ManifestError",
         "manifest.yaml that is a !!python/object/apply tag (runs a command if unsafely loaded)",
         manifest_python_object),
    Case("manifest_python_object_nested.tar", "ManifestError",
         "a valid manifest with a !!python/object/apply tag inside", manifest_python_object_nested),
    Case("manifest_wrong_schema.tar", "ManifestError", "files as a list, not a mapping",
         manifest_wrong_schema),
    Case("manifest_not_ctrmig.tar", "ManifestError", "another format's manifest",
         manifest_not_ctrmig),
    Case("manifest_billion_laughs.tar", "ManifestError",
         "YAML aliases expanding to 9^9 strings", manifest_billion_laughs),
    Case("manifest_deeply_nested.tar", "ManifestError",
         "5000 nested lists (the YAML composer recurses)", manifest_deeply_nested),
    Case("manifest_missing.tar", "ManifestError", "no manifest.yaml", manifest_missing),
    Case("manifest_is_a_dir.tar", "ManifestError", "manifest.yaml as a directory",
         manifest_is_a_dir),
    Case("manifest_too_large.tar", "ManifestError",
         "manifest.yaml whose header claims more than 4 MiB", manifest_too_large),
    Case("member_after_manifest.tar", "UnsafeArchiveError", "a member after manifest.yaml",
         member_after_manifest),
    Case("second_manifest.tar", "UnsafeArchiveError", "a second manifest.yaml",
         second_manifest),
    Case("data_after_end.tar", "UnsafeArchiveError",
         "a member hidden after the zero block that ends the tar", data_after_end),
    Case("too_many_members.tar", "UnsafeArchiveError",
         "more members than Limits.max_members (lowered to 20 for a small file)",
         too_many_members, {"max_members": 20}),
    Case("pax_path_dotdot.tar", "UnsafeArchiveError",
         "a pax 'path' record overriding a harmless name with ../../x", pax_path_dotdot),
    Case("pax_path_absolute.tar", "UnsafeArchiveError",
         "a pax 'path' record with an absolute path", pax_path_absolute),
    Case("pax_linkpath.tar", "UnsafeArchiveError", "a symlink whose target is a pax record",
         pax_linkpath),
    Case("pax_global_header.tar", "UnsafeArchiveError",
         "a pax global header renaming later members to ../x", pax_global_header),
    Case("pax_size_huge.tar", "UnsafeArchiveError",
         "a pax 'size' record claiming 1 PiB (past the total cap)", pax_size_huge),
    Case("pax_header_huge.tar", "UnsafeArchiveError",
         "a pax extended header claiming 2 GiB (would be read into memory)", pax_header_huge),
    Case("pax_chain.tar.gz", "ArchiveCorruptError",
         "5000 chained pax headers (tarfile recurses per header)", pax_chain),
    Case("gnu_longname_dotdot.tar", "UnsafeArchiveError",
         "a GNU long name (././@LongLink) ending in ../../../x", gnu_longname_dotdot),
    Case("gnu_longname_absolute.tar", "UnsafeArchiveError",
         "a GNU long name with an absolute path", gnu_longname_absolute),
    Case("gnu_sparse.tar", "UnsafeArchiveError", "an old-GNU sparse member (type S)",
         gnu_sparse),
    Case("pax_sparse.tar", "UnsafeArchiveError",
         "a GNU 1.0 sparse member in pax records (1 TiB of holes)", pax_sparse),
    Case("negative_size.tar", "ArchiveCorruptError", "a base-256 size field of -1024",
         negative_size),
    Case("dir_with_data.tar", "UnsafeArchiveError",
         "a directory entry carrying a hidden tar header as data", dir_with_data),
    Case("long_name.tar", "UnsafeArchiveError", "a 300-character name component", long_name),
    Case("backslash_name.tar", "UnsafeArchiveError", r"a name with ..\..\ (backslashes)",
         backslash_name),
    Case("core_sys_admin.tar", "PrivilegeError",
         "an ordinary podman spec, but a core image whose task holds CAP_SYS_ADMIN",
         core_sys_admin, stage="restore"),
    Case("core_bounding_all.tar", "PrivilegeError",
         "an ordinary podman spec, but every capability in a core image's bounding set",
         core_bounding_all, stage="restore"),
    Case("core_truncated.tar", "CriuImageError", "a core image cut inside its creds",
         core_truncated, stage="restore"),
    Case("core_without_creds.tar", "CriuImageError",
         "a core image without credentials (CRIU would keep its own, root's)",
         core_without_creds, stage="restore"),
    Case("core_huge_length.tar", "CriuImageError",
         "a core image whose entry claims 2 GiB", core_huge_length, stage="restore"),
    Case("core_endless_varint.tar", "CriuImageError",
         "a core image with a 64-byte varint", core_endless_varint, stage="restore"),
]

#: Built at test time (too big to commit even compressed): name -> (bytes, limits).
BOMB_EXPANDED = 64 << 20


def bombs() -> dict[str, tuple[bytes, dict[str, int]]]:
    """Decompression bombs: 64 MiB of zeros in a member, the guard lowered to 16 MiB."""
    zeros = b"\0" * BOMB_EXPANDED
    files = {"checkpoint/pages-1.img": zeros}
    plain = tar([file("checkpoint/pages-1.img", zeros),
                 file("manifest.yaml", manifest_text(files))])
    limits = {"ratio_after_bytes": 16 << 20, "max_ratio": 200}
    return {"bomb.tar.zst": (zst(plain), limits),
            "bomb.tar.gz": (gz(plain), {"ratio_after_bytes": 16 << 20, "max_ratio": 100})}


def generate(out: Path) -> dict[str, dict[str, Any]]:
    """Write every case into ``out``; return the expectations (also as expected.json)."""
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict[str, Any]] = {}
    for case in CASES:
        (out / case.name).write_bytes(case.build())
        expected[case.name] = {"error": case.error, "what": case.what, "limits": case.limits}
        if case.stage != "read":
            expected[case.name]["stage"] = case.stage
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
