"""The direct route's pure logic: relays hash what they carry, a restore refuses pages
that are not what the source sent, post-copy is refused where CRIU would break."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from ctrmig.direct import pages, relay, route
from ctrmig.direct.relay import Relay, SocketEnd
from ctrmig.errors import ChecksumError, FeatureUnavailableError, OptionError
from ctrmig.host import criu


def test_relay_hashes_the_forward_stream_and_carries_answers_back() -> None:
    a_near, a_far = socket.socketpair()  # the dump's socket
    b_near, b_far = socket.socketpair()  # toward the target
    r = Relay(SocketEnd(a_far), SocketEnd(b_near), name="t").start()
    payload = os.urandom(3 << 20)

    def send() -> None:
        a_near.sendall(payload)
        a_near.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = b""
    while chunk := b_far.recv(1 << 16):
        got += chunk
    sender.join()
    b_far.sendall(b"ok")
    b_far.shutdown(socket.SHUT_WR)
    assert a_near.recv(16) == b"ok"
    assert r.wait(10)
    assert got == payload
    assert r.forward.bytes == len(payload)
    assert r.forward.sha256 == hashlib.sha256(payload).hexdigest()
    assert r.error == ""


def test_relay_counts_a_silent_link_as_broken() -> None:
    near, far = socket.socketpair()
    out, _peer = socket.socketpair()
    r = Relay(SocketEnd(far), SocketEnd(out), name="t", idle=0.2).start()
    assert r.wait(5)
    assert "link is down" in r.error
    near.close()


def _received(tmp_path: Path, data: bytes, **record: object) -> Path:
    d = tmp_path / "ctrmig-pages-x"
    d.mkdir()
    (d / "pages-1.img").write_bytes(data)
    (d / "pagemap-1.img").write_bytes(b"map")
    (d / pages.RECEIVED).write_text(json.dumps(
        {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "error": "",
         **record}))
    return d


def test_merge_moves_pages_that_match(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    d = _received(tmp_path, b"pages")
    pages.merge(d, {"bytes": 5, "sha256": hashlib.sha256(b"pages").hexdigest()}, images)
    assert sorted(p.name for p in images.iterdir()) == ["pagemap-1.img", "pages-1.img"]
    assert not d.exists()


def test_merge_refuses_pages_the_source_did_not_send(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    d = _received(tmp_path, b"pages")
    with pytest.raises(ChecksumError, match="not what the source sent"):
        pages.merge(d, {"bytes": 5, "sha256": hashlib.sha256(b"PAGES").hexdigest()}, images)
    assert list(images.iterdir()) == [] and not d.exists()


def test_merge_refuses_an_archive_without_a_page_stream(tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="page_stream"):
        pages.merge(_received(tmp_path, b"x"), None, tmp_path)


def test_post_copy_refused_without_the_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criu, "lazy_pages_supported", lambda: True)
    monkeypatch.setattr(criu, "pipe_max_size", lambda: 1048576)
    monkeypatch.setattr(criu, "has_cap_sys_resource", lambda: False)
    with pytest.raises(FeatureUnavailableError, match=r"fs\.pipe-max-size") as e:
        criu.require_post_copy()
    assert e.value.hint and "4194304" in e.value.hint
    monkeypatch.setattr(criu, "has_cap_sys_resource", lambda: True)
    criu.require_post_copy()
    monkeypatch.setattr(criu, "has_cap_sys_resource", lambda: False)
    monkeypatch.setattr(criu, "pipe_max_size", lambda: 4194304)
    criu.require_post_copy()


class _Fake:
    def __init__(self, engine: str):
        self.engine = engine

    def sending_pages(self) -> None: ...


def test_route_choice() -> None:
    runc, podman = _Fake("runc"), _Fake("podman")
    assert route.choose("auto", runc, runc)  # type: ignore[arg-type]
    assert not route.choose("archive", runc, runc)  # type: ignore[arg-type]
    assert not route.choose("auto", podman, podman)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="direct route"):
        route.choose("direct", podman, podman)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="unknown route"):
        route.choose("fast", runc, runc)  # type: ignore[arg-type]


def test_a_relay_waiting_for_lazy_pages_ends_when_the_link_ends_first() -> None:
    """The target's post-copy relay waits up to 120 s for criu lazy-pages; a migration
    killed before the restore closes the link, and the relay must not wait that out."""
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(ConnectionAbortedError):  # not TimeoutError, 120 s later
        relay.accept(relay.listener(), 120.0, quiet=SocketEnd(ours))
    ours.close()


def test_a_receiver_whose_announcement_fails_leaves_no_pages_dir(tmp_path: Path) -> None:
    """``ctrmig _pages receive`` whose migrate was killed at its start: the announcement
    meets a closed ssh (BrokenPipeError), and no journal names the dir: it goes at once
    (a CI run once kept one, after test_killed_then_recover[runc-started])."""
    ours, theirs = socket.socketpair()

    def announce(info: dict[str, object]) -> None:
        assert Path(str(info["dir"])).is_dir()  # made, with criu page-server on it
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        route.serve_receive(SocketEnd(ours), announce, 10.0, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ctrmig-pages-")]
    theirs.close()
