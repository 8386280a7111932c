"""An archive arriving as a stream is verified while it is saved (one pass), and the
saved copy is the stream, byte for byte."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from ctrmig.errors import ChecksumError
from tests.support import override_settings
from tests.unit.test_privileges import FileFake, write

HOSTILE = Path(__file__).parents[1] / "data" / "hostile"


class Spying(FileFake):
    """Keeps what the engine would have been given."""

    seen: bytes = b""

    def _restore(self, source: Path, manifest, opts):  # type: ignore[no-untyped-def]
        type(self).seen = source.read_bytes()
        return "restored"


@pytest.fixture(autouse=True)
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    override_settings(monkeypatch, lock_dir=tmp_path / "locks")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_stream_is_saved_whole(tmp_path: Path, compression: str) -> None:
    arc = tmp_path / "d.tar"
    write(arc, "podman", "podman-default", compression)
    data = arc.read_bytes()
    if compression == "none":
        data += bytes(10240)  # zero blocks after the end, as some tar writers pad
    assert Spying().restore(io.BytesIO(data)) == "restored"
    assert Spying.seen == data
    assert not list(tmp_path.glob("**/ctrmig-spool-*"))


def test_a_bad_stream_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    m = Spying()
    with pytest.raises(ChecksumError):
        m.restore(io.BytesIO((HOSTILE / "checksum_mismatch.tar").read_bytes()))
    assert m.calls == []
    assert not list(tmp_path.glob("**/ctrmig-spool-*"))
