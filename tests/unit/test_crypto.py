"""Encryption (the real age tool) and signatures (the real ssh-keygen) of archives.

No container here: archives written by ArchiveWriter itself, so every refusal is the
reader's or the signature check's own.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrmig.archive import (
    ArchiveWriter,
    ContainerRecord,
    FileEntry,
    Manifest,
    atomic_output,
    crypto,
)
from ctrmig.archive.layout import MANIFEST_NAME, SIGNATURE_NAME
from ctrmig.archive.reader import extracted, read_manifest, read_signed, verify
from ctrmig.archive.spool import spooled
from ctrmig.errors import (
    ArchiveCorruptError,
    EncryptedArchiveError,
    OptionError,
    SignatureError,
    UnsafeArchiveError,
)
from ctrmig.host import proc

PAGES = os.urandom(3 << 20)  # several age chunks (64 KiB each) and several CHUNKs


def _keygen(path: Path) -> Path:
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
             timeout=30)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("keys")
    found = {"alice": _keygen(d / "alice"), "mallory": _keygen(d / "mallory")}
    proc.run(["age-keygen", "-o", str(d / "age.key")], timeout=30)
    found["age"] = d / "age.key"
    (d / "trusted").write_text((d / "alice.pub").read_text())  # authorized_keys style
    found["trusted"] = d / "trusted"
    yield found


def write(path: Path, *, encrypt_to: tuple[str, ...] = (), sign: Path | None = None,
          compression: str = "zstd") -> Manifest:
    with atomic_output(path) as out, crypto.encrypting(out, encrypt_to) as sink:
        w = ArchiveWriter(sink, compression,  # type: ignore[arg-type]
                          sign=crypto.signer(str(sign) if sign else None))
        w.add_bytes("checkpoint/pages-1.img", PAGES)
        w.add_bytes("spec.dump", b'{"ociVersion": "1.0"}')
        return w.finish(Manifest(engine="process", container=ContainerRecord(name="w")))


def test_archive_is_0600_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write(tmp_path / "new" / "a.tar")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "a.tar").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("recipient", ["ssh", "age-file"])
def test_encrypted_round_trip(tmp_path: Path, keys: dict[str, Path], recipient: str) -> None:
    archive = tmp_path / "a.tar"
    if recipient == "ssh":
        to, identity = keys["alice"].with_suffix(".pub").read_text().strip(), keys["alice"]
    else:  # a recipients file holding the age public key
        public = proc.output(["age-keygen", "-y", str(keys["age"])], timeout=30)
        (tmp_path / "recipients").write_text(public + "\n")
        to, identity = str(tmp_path / "recipients"), keys["age"]
    write(archive, encrypt_to=(to,))
    data = archive.read_bytes()
    assert data.startswith(crypto.AGE_MAGIC) and PAGES[:4096] not in data
    assert read_manifest(archive, identities=[identity]).container.name == "w"
    assert verify(archive, identities=[identity]).files["checkpoint/pages-1.img"].size \
        == len(PAGES)
    with extracted(archive, identities=[identity]) as (root, _):
        assert (root / "checkpoint/pages-1.img").read_bytes() == PAGES
        assert (root / "checkpoint/pages-1.img").stat().st_mode & 0o777 == 0o600
    # A stream (restore -) is decrypted on the fly too, and spooled as plaintext.
    with archive.open("rb") as f, spooled(f, identities=[identity]) as (path, _):
        assert verify(path).engine == "process"


def test_missing_or_wrong_identity_says_encrypted(tmp_path: Path,
                                                  keys: dict[str, Path]) -> None:
    archive = tmp_path / "a.tar"
    write(archive, encrypt_to=(str(keys["alice"].with_suffix(".pub")),))
    for identities in ([], [keys["mallory"]]):
        with pytest.raises(EncryptedArchiveError, match="encrypted") as info:
            verify(archive, identities=identities)
        assert "--identity" in (info.value.hint or "")


def test_damaged_ciphertext_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    archive = tmp_path / "a.tar"
    write(archive, encrypt_to=(str(keys["alice"].with_suffix(".pub")),), compression="none")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 1
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveCorruptError):
        verify(archive, identities=[keys["alice"]])


def test_bad_recipient_is_refused_before_anything(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="neither a recipient nor a file"):
        crypto.check_recipients(["nobody"])
    with pytest.raises(OptionError, match="cannot encrypt"):
        crypto.check_recipients(["age1notakey"])
    with pytest.raises(OptionError, match="cannot sign"):
        crypto.check_signing_key(str(tmp_path / "missing"))


def test_signed_round_trip_and_fingerprint(tmp_path: Path, keys: dict[str, Path]) -> None:
    archive = tmp_path / "a.tar"
    write(archive, sign=keys["alice"])
    data, sig = read_signed(archive)
    assert sig is not None and data.startswith(b"format")
    expected = proc.output(["ssh-keygen", "-l", "-f", str(keys["alice"].with_suffix(".pub"))],
                           timeout=30).split()[1]
    assert crypto.signer_key(sig).fingerprint == expected
    assert crypto.signature_valid(data, sig)
    assert verify(archive, trusted_keys=keys["trusted"]).engine == "process"
    # allowed_signers style works too, and the zstd (non-seeking) path finds it alike.
    public = keys["alice"].with_suffix(".pub").read_text()
    (tmp_path / "allowed").write_text(f"ops@example.org {public}")
    assert verify(archive, trusted_keys=tmp_path / "allowed").engine == "process"
    plain = tmp_path / "p.tar"  # uncompressed: read_signed seeks instead of scanning
    write(plain, sign=keys["alice"], compression="none")
    with tarfile.open(plain) as tar:
        assert tar.getnames()[-2:] == [MANIFEST_NAME, SIGNATURE_NAME]
    assert crypto.signer_key(read_signed(plain)[1] or b"").fingerprint == expected


def test_signed_and_encrypted(tmp_path: Path, keys: dict[str, Path]) -> None:
    archive = tmp_path / "a.tar"
    write(archive, encrypt_to=(str(keys["alice"].with_suffix(".pub")),), sign=keys["alice"])
    with extracted(archive, identities=[keys["alice"]], trusted_keys=keys["trusted"]) as (r, _):
        assert (r / "spec.dump").exists()


def test_unsigned_and_wrong_key_are_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    unsigned, other = tmp_path / "u.tar", tmp_path / "o.tar"
    write(unsigned)
    write(other, sign=keys["mallory"])
    with pytest.raises(SignatureError, match="not signed"):
        verify(unsigned, trusted_keys=keys["trusted"])
    with pytest.raises(SignatureError, match="a key not in"):
        verify(other, trusted_keys=keys["trusted"])
    assert verify(other).engine == "process"  # no trust asked: checksums only


def _rewrite(archive: Path, out: Path, signature: bytes | None) -> None:
    """Tamper with a member and write a manifest whose checksums match the tampering
    (what anyone who can write an archive can do), keeping ``signature``."""
    import hashlib

    from ctrmig.archive.reader import parse_manifest

    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    manifest = parse_manifest(members.pop(MANIFEST_NAME))
    members.pop(SIGNATURE_NAME, None)
    members["spec.dump"] = b'{"ociVersion": "1.0", "process": {"args": ["evil"]}}'
    manifest.files["spec.dump"] = FileEntry(size=len(members["spec.dump"]),
                                            sha256=hashlib.sha256(members["spec.dump"]).hexdigest())
    with tarfile.open(out, "w") as tar:
        for name, body in [*members.items(), (MANIFEST_NAME, manifest.to_yaml().encode()),
                           *([(SIGNATURE_NAME, signature)] if signature else [])]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def test_tampered_but_consistent_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    signed, forged = tmp_path / "s.tar", tmp_path / "f.tar"
    write(signed, sign=keys["alice"], compression="none")
    _, sig = read_signed(signed)
    _rewrite(signed, forged, sig)
    assert verify(forged).engine == "process"  # consistent: the checksums alone pass
    with pytest.raises(SignatureError, match="differs from what"):
        verify(forged, trusted_keys=keys["trusted"])
    with pytest.raises(SignatureError), extracted(forged, trusted_keys=keys["trusted"]):
        pass


def test_only_one_small_signature_may_follow_the_manifest(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    write(archive, sign=None, compression="none")
    data = archive.read_bytes()
    with tarfile.open(archive, "a") as tar:
        for _ in range(2):
            info = tarfile.TarInfo(SIGNATURE_NAME)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"sig"))
    with pytest.raises(UnsafeArchiveError, match=r"follows manifest\.yaml"):
        verify(archive)
    assert data  # the unsigned original was fine
