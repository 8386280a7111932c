"""Secrecy and provenance of archives: age encryption and SSH signatures.

A checkpoint holds the whole memory of a container (its keys, tokens, passwords), and
an archive that verifies against its own manifest says nothing about who made it. So:

* Encryption is the age format (age-encryption.org/v1), made and opened by the ``age``
  tool (Debian's ``age``), streaming through pipes: the archive is never held in memory,
  and the tool runs beside ctrmig on another core. Recipients are age X25519 recipients
  (``age1...``) or ssh public keys, or files of them (``age -R``); identities are age
  identity files or ssh private keys (``age -i``). No cryptography is done here.
* Signatures are SSH signatures (``ssh-keygen -Y sign``, namespace ``ctrmig``) over the
  manifest's bytes exactly as stored; the manifest holds the sha256 of every other
  member, which the reader checks, so one signature covers the whole archive. It is
  stored as the member after the manifest (:data:`~ctrmig.archive.layout.SIGNATURE_NAME`).
  Trusted keys are an allowed-signers file or an authorized-keys style file of public
  keys (``ssh-keygen -Y find-principals`` / ``verify``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from ctrmig.archive.streams import CHUNK, read_into
from ctrmig.errors import (
    ArchiveCorruptError,
    CommandError,
    EncryptedArchiveError,
    OptionError,
    SignatureError,
)
from ctrmig.host import proc
from ctrmig.host.files import private_dir, write_private

AGE_MAGIC = b"age-encryption.org/v1\n"
AGE_ARMOR = b"-----BEGIN AGE ENCRYPTED FILE-----"
#: Bytes of an archive's start that tell whether it is encrypted.
HEAD_BYTES = len(AGE_ARMOR)
#: The SSH signature namespace: a signature made for git or for files is not one of ours.
NAMESPACE = "ctrmig"
MAX_SIGNATURE_BYTES = 64 << 10
TOOL_TIMEOUT = 60.0
_KEY_PREFIXES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-")
IDENTITY_HINT = ("it is encrypted (age): pass --identity FILE, an age identity or ssh "
                 "private key it was encrypted to")


def is_encrypted(head: bytes) -> bool:
    """Whether an archive starting with ``head`` is in the age format (binary or armored)."""
    return head.startswith(AGE_MAGIC) or head.startswith(AGE_ARMOR)


# --- encryption ------------------------------------------------------------------------------


def recipient_args(recipients: Sequence[str]) -> list[str]:
    """age's flags for ``recipients``: a file of recipients (``-R``) or one (``-r``)."""
    args: list[str] = []
    for recipient in recipients:
        if Path(recipient).is_file():
            args += ["-R", recipient]
        elif recipient.startswith(("age1", *_KEY_PREFIXES)):
            args += ["-r", recipient]
        else:
            raise OptionError(
                f"--encrypt-to {recipient!r} is neither a recipient nor a file",
                hint="give an age recipient (age1...), an ssh public key "
                     "('ssh-ed25519 AAAA...') or a file of them",
            )
    return args


def check_recipients(recipients: Sequence[str]) -> None:
    """Refuse unusable recipients now, before a container is stopped for nothing."""
    if not recipients:
        return
    try:
        proc.run(["age", "--encrypt", *recipient_args(recipients)], input=b"",
                 stdout=subprocess.DEVNULL, timeout=TOOL_TIMEOUT, what="age --encrypt")
    except CommandError as e:
        raise OptionError(f"cannot encrypt to {', '.join(recipients)}: {_age_error(e.stderr)}",
                          hint="check the recipients (age1... or ssh public keys)") from None


@contextlib.contextmanager
def encrypting(out: BinaryIO, recipients: Sequence[str],
               timeout: float = TOOL_TIMEOUT) -> Iterator[BinaryIO]:
    """A stream whose bytes reach ``out`` encrypted to ``recipients`` (none: ``out``)."""
    if not recipients:
        yield out
        return
    fd = _fileno(out)
    with tempfile.TemporaryFile() as err:
        if fd is not None:
            out.flush()  # age writes to the same file from now on
        child = proc.spawn(["age", "--encrypt", *recipient_args(recipients)],
                           stdin=subprocess.PIPE, stdout=fd if fd is not None else subprocess.PIPE,
                           stderr=err)
        pump = None if fd is not None else _Pump(child.stdout, out.write)
        assert child.stdin is not None
        try:
            yield cast(BinaryIO, child.stdin)
            child.stdin.close()
        except BrokenPipeError:
            pass  # age stopped reading: its error below says why
        except BaseException:
            proc.kill_group(child)
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()
        _finish(child, pump, timeout)
        if child.returncode != 0:
            raise CommandError(f"age --encrypt failed: {_age_error(_read(err))}",
                               argv=["age", "--encrypt"], returncode=child.returncode,
                               stderr=_read(err))


@contextlib.contextmanager
def decrypting(source: Path | BinaryIO, identities: Sequence[str | Path],
               timeout: float = TOOL_TIMEOUT) -> Iterator[BinaryIO]:
    """The plaintext of the age-encrypted ``source``, decrypted while it is read.

    No identity that matches raises :class:`EncryptedArchiveError` before anything is
    read; damage found later (age authenticates every 64 KiB) :class:`ArchiveCorruptError`.
    """
    if not identities:
        raise EncryptedArchiveError("the archive is encrypted and no identity was given",
                                    hint=IDENTITY_HINT)
    argv = ["age", "--decrypt", *[a for i in identities for a in ("-i", str(i))]]
    feed = isinstance(source, Path)
    if feed:
        argv.append(str(source))
    with tempfile.TemporaryFile() as err:
        child = proc.spawn(argv, stdin=None if feed else subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=err)
        feeder = None
        if not feed:
            assert child.stdin is not None
            feeder = _Pump(source, child.stdin.write, child.stdin.close)
        assert child.stdout is not None
        try:
            if not child.stdout.peek(1):  # type: ignore[attr-defined]
                _finish(child, feeder, timeout)
                raise EncryptedArchiveError(
                    f"cannot decrypt the archive: {_age_error(_read(err))}", hint=IDENTITY_HINT)
            plain = _Plaintext(child.stdout)
            try:
                yield cast(BinaryIO, plain)
            except BaseException as e:
                child.stdout.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
                message = _age_error(_read(err))
                if child.returncode not in (None, 0) and "pipe" not in message:
                    raise ArchiveCorruptError(f"the encrypted archive is damaged: {message}") \
                        from e
                raise
            if plain.eof:
                _finish(child, feeder, timeout)
                if child.returncode != 0:
                    raise ArchiveCorruptError(
                        f"the encrypted archive is damaged: {_age_error(_read(err))}")
        finally:
            proc.kill_group(child)  # read only in part (one member wanted), or failed
            if feeder is not None:
                feeder.join(timeout)


class _Plaintext:
    """age's output, noting whether it was read to its end."""

    def __init__(self, src: IO[bytes]):
        self.src, self.eof = src, False

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        if not data and size != 0:
            self.eof = True
        return data

    def readinto(self, buf: Any) -> int:
        n = read_into(self.src, buf)  # type: ignore[arg-type]
        if n == 0 and len(buf):
            self.eof = True
        return n


class _Pump(threading.Thread):
    """Copies ``src`` into ``sink`` on a thread, then calls ``done``; an error is kept
    for :meth:`result`."""

    def __init__(self, src: Any, sink: Callable[[bytes], object],
                 done: Callable[[], None] | None = None):
        super().__init__(daemon=True)
        self.src, self.sink, self.done = src, sink, done
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            while chunk := self.src.read(CHUNK):
                self.sink(chunk)
        except BrokenPipeError:
            pass  # the reader stopped: its side reports why
        except BaseException as e:  # reported by result()
            self.error = e
        finally:
            if self.done is not None:
                with contextlib.suppress(OSError):
                    self.done()

    def result(self, timeout: float) -> None:
        self.join(timeout)
        if self.error is not None:
            raise self.error


def _finish(child: subprocess.Popen[bytes], pump: _Pump | None, timeout: float) -> None:
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill_group(child)
    if pump is not None:
        pump.result(timeout)


def _fileno(out: BinaryIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _age_error(stderr: str | None) -> str:
    """age's own error line, without its "report unexpected errors" footer."""
    for line in (stderr or "").splitlines():
        if line.startswith("age: error:"):
            return line.removeprefix("age: error:").strip()
    lines = (stderr or "").strip().splitlines()
    return lines[0] if lines else "no output"


# --- signatures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignerKey:
    """The public key a signature names: its type and SHA256 fingerprint."""

    key_type: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.key_type} {self.fingerprint}"


def check_signing_key(key: str | None) -> None:
    """Refuse an unusable signing key now, before a container is stopped for nothing."""
    if key is None:
        return
    try:
        proc.run(["ssh-keygen", "-y", "-f", key], timeout=TOOL_TIMEOUT,
                 what=f"ssh-keygen -y -f {key}")
    except CommandError as e:
        raise OptionError(f"cannot sign with {key}: {(e.stderr or e.message).strip()}",
                          hint="--sign takes an ssh private key without a passphrase") from None


def signer(key: str | None) -> Callable[[bytes], bytes] | None:
    """A function signing manifest bytes with the ssh private key ``key`` (None: none)."""
    if key is None:
        return None

    def sign(data: bytes) -> bytes:
        return proc.run(["ssh-keygen", "-q", "-Y", "sign", "-n", NAMESPACE, "-f", key],
                        input=data, timeout=TOOL_TIMEOUT, what="ssh-keygen -Y sign").stdout

    return sign


def signer_key(signature: bytes) -> SignerKey:
    """The public key inside an armored SSH signature (PROTOCOL.sshsig), unverified."""
    try:
        text = signature.decode("ascii")
        body = "".join(ln for ln in text.splitlines() if not ln.startswith("-----"))
        blob = base64.b64decode(body, validate=True)
        if not blob.startswith(b"SSHSIG"):
            raise ValueError("no SSHSIG magic")
        (length,) = struct.unpack(">I", blob[10:14])  # after magic and uint32 version
        key = blob[14:14 + length]
        (type_len,) = struct.unpack(">I", key[:4])
        key_type = key[4:4 + type_len].decode("ascii")
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise SignatureError(f"the archive's signature is malformed: {e}") from None
    digest = base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")
    return SignerKey(key_type, f"SHA256:{digest}")


def signature_valid(data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a good ctrmig signature of ``data`` by the key it names
    (who that key belongs to is not checked: see :func:`verify_signature`)."""
    with _signature_file(signature) as sig:
        res = proc.run(["ssh-keygen", "-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)],
                       input=data, timeout=TOOL_TIMEOUT, check=False)
    return res.returncode == 0


def verify_signature(data: bytes, signature: bytes | None, trusted_keys: str | Path) -> SignerKey:
    """Check that ``signature`` signs ``data`` (the manifest's bytes) with a key listed in
    ``trusted_keys``; return that key. Raise :class:`SignatureError` otherwise."""
    if signature is None:
        raise SignatureError("the archive is not signed",
                             hint=f"restore only archives signed by a key in {trusted_keys} "
                                  "(ctrmig checkpoint --sign KEY), or drop --trusted-keys")
    key = signer_key(signature)
    with _signature_file(signature) as sig:
        allowed = sig.parent / "allowed_signers"
        write_private(allowed, allowed_signers(Path(trusted_keys)))
        found = proc.run(["ssh-keygen", "-Y", "find-principals", "-s", str(sig), "-f",
                          str(allowed)],
                         timeout=TOOL_TIMEOUT, check=False)
        principal = found.stdout.decode(errors="replace").strip().splitlines()
        if found.returncode != 0 or not principal:
            raise SignatureError(f"the archive is signed by {key}, a key not in {trusted_keys}",
                                 hint="add the signer's public key to the trusted keys if "
                                      "you trust it")
        res = proc.run(["ssh-keygen", "-Y", "verify", "-n", NAMESPACE, "-f", str(allowed),
                        "-I", principal[0].split(",")[0], "-s", str(sig)],
                       input=data, timeout=TOOL_TIMEOUT, check=False)
    if res.returncode != 0:
        raise SignatureError(
            f"the archive's manifest differs from what {key} signed: tampered or corrupt",
            stderr=res.stderr.decode(errors="replace"))
    return key


def allowed_signers(trusted_keys: Path) -> str:
    """``trusted_keys`` as an allowed-signers file: lines that start with a key type
    (authorized-keys style) get a principal and the ctrmig namespace; the others are
    allowed-signers lines already."""
    try:
        text = trusted_keys.read_text()
    except OSError as e:
        raise OptionError(f"cannot read the trusted keys {trusted_keys}: {e.strerror}") \
            from None
    lines = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].startswith(_KEY_PREFIXES) and len(words) >= 2:
            lines.append(f'trusted namespaces="{NAMESPACE}" {words[0]} {words[1]}')
        else:
            lines.append(line.strip())
    if not lines:
        raise OptionError(f"{trusted_keys} lists no keys",
                          hint="one public key a line (authorized_keys or allowed_signers "
                               "style)")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _signature_file(signature: bytes) -> Iterator[Path]:
    """``signature`` in a private temp file (ssh-keygen reads signatures from files)."""
    with tempfile.TemporaryDirectory(prefix="ctrmig-sig-") as tmp:
        path = private_dir(Path(tmp)) / "manifest.sig"
        write_private(path, signature)
        yield path
