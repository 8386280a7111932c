"""The neutral description of a checkpointed container and its translations (issue #14):
pure logic on synthesized spec.dump and CRIU images, no engine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, criu_images, portable
from ctrmig.archive.layout import SPEC_DUMP
from ctrmig.archive.portable import Portable
from ctrmig.engines.docker import foreign as docker_foreign
from ctrmig.engines.podman import foreign as podman_foreign
from ctrmig.engines.runc import RuncMigrator
from ctrmig.engines.runc import foreign as runc_foreign
from ctrmig.errors import ArchiveError, CriuImageError, UntranslatableError
from ctrmig.protocol import RestoreOptions

ROOT_ID = 102


def _key(number: int, wire: int) -> bytes:
    return criu_images._encode_varint(number << 3 | wire)


def _str(number: int, text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return _key(number, 2) + criu_images._encode_varint(len(data)) + data


def _int(number: int, value: int) -> bytes:
    return _key(number, 0) + criu_images._encode_varint(value)


def _image(magic: int, entries: list[bytes]) -> bytes:
    out = struct.pack("<II", criu_images.IMG_COMMON_MAGIC, magic)
    return out + b"".join(struct.pack("<I", len(e)) + e for e in entries)


def _mount(mnt_id: int, point: str, *, external: str = "", master: int = 0,
           shared: int = 0) -> bytes:
    entry = _int(1, 5) + _int(2, mnt_id) + _int(4, 1) + _str(6, "/") + _str(7, point)
    entry += _int(10, shared) if shared else b""
    entry += _int(11, master) if master else b""
    return entry + (_str(18, external) if external else b"")


def _mounts(*extra: bytes, root_master: int = 0) -> bytes:
    return _image(criu_images.MNTS_MAGIC,
                  [_mount(ROOT_ID, "/", master=root_master), *extra])


def _reg(name: str, mnt_id: int, mode: int) -> bytes:
    reg = _int(1, 7) + _int(2, 0) + _str(6, name) + _int(7, mnt_id << 1) + _int(10, mode)
    return _int(1, 1) + _int(2, 7) + _str(3, reg)


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "process": {"args": ["/bin/sh", "-c", "sleep 1"], "env": ["PATH=/bin"], "cwd": "/w",
                    "user": {"uid": 1, "gid": 2, "additionalGids": [3]},
                    "apparmorProfile": "docker-default"},
        "hostname": "web",
        "root": {"path": "/var/lib/docker/overlay2/x/merged"},
        "hooks": {"prestart": [{"path": "/usr/bin/dockerd"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/old/hosts",
             "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/old/shm",
             "options": ["rbind"]},
            {"destination": "/data", "type": "bind",
             "source": "/var/lib/containers/storage/volumes/data/_data", "options": ["rbind"]},
            {"destination": "/srv", "type": "bind", "source": "/srv/www",
             "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"},
                                 {"type": "mount"}],
                  "maskedPaths": ["/proc/keys"], "readonlyPaths": ["/proc/sys"],
                  "cgroupsPath": "/docker/abc"},
    }
    spec.update(changes)
    return spec


def _manifest(engine: str = "docker") -> Manifest:
    return Manifest(engine=engine, container=ContainerRecord(name="web", image="busybox"))


def _describe(spec: dict[str, Any] | None = None, engine: str = "docker",
              mounts: bytes | None = None, files: bytes | None = None) -> Portable:
    members = {SPEC_DUMP: json.dumps(spec or _spec()).encode()}
    if mounts is not None:
        members["checkpoint/mountpoints-13.img"] = mounts
    if files is not None:
        members["checkpoint/files.img"] = files
    return portable.describe(_manifest(engine), members)


def test_a_spec_becomes_the_neutral_description() -> None:
    mounts = _mounts(_mount(110, "/etc/hosts", external="/etc/hosts"),
                     _mount(111, "/proc/keys", external="/dev/null"),
                     _mount(112, "/sys/fs/cgroup/cpu", external="/sys/fs/cgroup/cpu"))
    p = _describe(mounts=mounts)
    assert (p.args, p.env, p.cwd, p.user, p.additional_gids, p.hostname) == (
        ["/bin/sh", "-c", "sleep 1"], ["PATH=/bin"], "/w", "1:2", [3], "web")
    kinds = {b.destination: (b.kind, b.source) for b in p.binds}
    assert kinds == {"/etc/hosts": ("engine", ""), "/dev/shm": ("engine", ""),
                     "/data": ("volume", "data"), "/srv": ("host", "/srv/www")}
    assert [m["destination"] for m in p.mounts] == ["/proc", "/sys/fs/cgroup"]
    assert p.external == ["/dev/null", "/etc/hosts", "/sys/fs/cgroup/cpu"]
    provided = portable.provided_by(p.oci_mounts({b.destination: "/x" for b in p.binds}),
                                    p.masked_paths)
    assert all(portable.covers(provided, k) for k in p.external)


@pytest.mark.parametrize(("spec", "engine", "words"), [
    (_spec(), "process", "holds no container"),
    (_spec(process={"args": ["/bin/sh"], "terminal": True}), "podman", "terminal"),
    (_spec(linux={"namespaces": [{"type": "pid", "path": "/proc/9/ns/pid"},
                                 {"type": "ipc", "path": "/proc/9/ns/ipc"}]}), "podman",
     r"shared its pid, ipc namespace\(s\) with a pod"),
])
def test_what_cannot_cross_engines_is_refused(spec: dict[str, Any], engine: str,
                                              words: str) -> None:
    with pytest.raises(UntranslatableError, match=words):
        _describe(spec, engine)


def test_an_archive_without_spec_or_image_is_refused() -> None:
    with pytest.raises(UntranslatableError, match=r"no spec\.dump"):
        portable.describe(_manifest(), {})
    m = Manifest(engine="docker", container=ContainerRecord(name="web"))
    with pytest.raises(UntranslatableError, match="names no image"):
        portable.describe(m, {SPEC_DUMP: b"{}"})
    with pytest.raises(ArchiveError, match=r"process\.args"):
        _describe(_spec(process={"args": "sh"}))


def test_a_mount_no_rule_provides_is_refused_by_each_target() -> None:
    p = _describe(mounts=_mounts(_mount(120, "/opt/plugin", external="/opt/plugin")))
    for check in (runc_foreign.check, podman_foreign.check, docker_foreign.check):
        with pytest.raises(UntranslatableError, match="/opt/plugin"):
            check(p, RestoreOptions())


def test_root_mode_is_read_and_can_be_left_out() -> None:
    mounts = criu_images.read_mountpoints(_mounts())
    files = _image(criu_images.FILES_MAGIC, [_reg("/bin/sh", ROOT_ID, 0o100755),
                                             _reg("/", 200, 0o40700),
                                             _reg("/", ROOT_ID, 0o40555)])
    assert criu_images.root_mode(files, mounts) == 0o40555
    relaxed = criu_images.without_root_mode(files, mounts)
    assert criu_images.root_mode(relaxed, mounts) is None
    assert len(relaxed) == len(files) - 4  # one mode field: its key and a 3-byte varint
    p = _describe(mounts=_mounts(), files=files)
    assert p.root_mode == 0o40555 and p.images["checkpoint/files.img"] == relaxed


def test_sharing_outside_the_dump_is_dropped_and_inside_kept() -> None:
    data = _mounts(_mount(120, "/a", shared=7), _mount(121, "/b", master=7), root_master=5)
    out = criu_images.without_outside_masters(data)
    entries = {m.mountpoint for m in criu_images.read_mountpoints(out)}
    assert entries == {"/", "/a", "/b"}
    assert out == _mounts(_mount(120, "/a", shared=7), _mount(121, "/b", master=7))
    assert criu_images.without_outside_masters(out) == out


def test_malformed_images_are_refused() -> None:
    with pytest.raises(CriuImageError):
        criu_images.read_mountpoints(b"\x00" * 8)
    bad = _image(criu_images.MNTS_MAGIC, [b"\xff"])
    with pytest.raises(CriuImageError, match="malformed"):
        criu_images.read_mountpoints(bad)
    truncated = _mounts()[:-3]
    with pytest.raises(CriuImageError):
        criu_images.read_mountpoints(truncated)


def test_external_netns_is_told_apart() -> None:
    ext = struct.pack("<III", criu_images.IMG_COMMON_MAGIC, criu_images.NETNS_MAGIC, 14)
    ext += _str(8, "extRootNetNS")
    assert criu_images.external_netns(ext)
    own = struct.pack("<III", criu_images.IMG_COMMON_MAGIC, criu_images.NETNS_MAGIC, 2)
    assert not criu_images.external_netns(own + _int(7, 1))
    assert not criu_images.external_netns(b"junk")


def test_podman_dialect_leaves_out_the_source_engines_parts() -> None:
    p = _describe()
    spec = podman_foreign.spec_dump(p, "/store/volumes")
    assert "hooks" not in spec and "apparmorProfile" not in spec["process"]
    assert "cgroupsPath" not in spec["linux"]
    assert {"type": "network"} in spec["linux"]["namespaces"]
    binds = {m["destination"]: m["source"] for m in spec["mounts"] if m["type"] == "bind"}
    assert binds == {"/data": "/store/volumes/data/_data", "/srv": "/srv/www"}
    config = podman_foreign.config_dump(p, "new", "sha256:abc", "/store/volumes")
    assert config["name"] == "new" and config["id"] == ""
    assert config["rootfsImageName"] == "busybox" and config["command"] == p.args
    assert config["namedVolumes"] == [{"volumeName": "data", "dest": "/data", "options": []}]


def test_docker_dialect() -> None:
    p = _describe(_spec(mounts=[*_spec()["mounts"], {"destination": "/run/.containerenv",
                                                      "type": "bind", "source": "/x"}]),
                  mounts=_mounts(_mount(110, "/dev/shm", external="/dev/shm")))
    body = docker_foreign.create_body(p)
    assert body["Entrypoint"] == ["/bin/sh"] and body["Cmd"] == ["-c", "sleep 1"]
    assert body["User"] == "1:2" and body["Hostname"] == "web"
    host = body["HostConfig"]
    assert host["Binds"] == ["data:/data:rw", "/srv/www:/srv:ro",
                             "/dev/null:/run/.containerenv:ro"]
    assert host["IpcMode"] == "shareable" and host["MaskedPaths"] == ["/proc/keys"]


def test_runc_refuses_a_foreign_archive_before_any_runc_call(tmp_path: Path) -> None:
    """A pod container's archive is refused at once: no runc call, nothing made."""
    archive = tmp_path / "pod.tar"
    spec = _spec(linux={"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}]})
    with archive.open("wb") as out:
        writer = ArchiveWriter(out)
        writer.add_bytes(SPEC_DUMP, json.dumps(spec).encode())
        writer.finish(_manifest("podman"))
    m = RuncMigrator(state_dir=tmp_path / "state", workdir=tmp_path)
    with pytest.raises(UntranslatableError, match="pod"):
        m.restore(archive, name="new", allow_privileged=True)
    assert not (tmp_path / "state" / "bundles" / "new").exists()


class _Target:
    engine = "runc"
    imports_from = frozenset({"podman", "docker"})

    def version(self) -> str:
        return "runc 1.1"


def test_preflight_lets_a_translating_target_through_unless_namespaces_are_shared() -> None:
    from ctrmig.preflight.report import Facts
    from ctrmig.preflight.target import _engine_check

    def ask() -> dict[str, Any]:
        return {}

    ok = _engine_check(_Target(), Facts("podman", "web"), ask)  # type: ignore[arg-type]
    assert ok.status == "pass", ok
    refused = _engine_check(_Target(), Facts("process", "42"), ask)  # type: ignore[arg-type]
    assert refused.status == "fail" and "restores only on process" in refused.detail
    shared = _engine_check(_Target(), Facts("podman", "web", joined=["ipc"]),  # type: ignore[arg-type]
                           ask)
    assert shared.status == "fail" and "shares its ipc namespace" in shared.detail


@pytest.mark.parametrize(("mount", "volumes", "words"), [
    ({"destination": "/x:/etc", "type": "bind", "source": "/srv"}, [], "no engine binds"),
    ({"destination": "/x", "type": "bind", "source": "relative"}, [], "not a plain host"),
    ({"destination": "/x", "type": "bind", "source": "/a:/etc:rw"}, [], "not a plain host"),
    ({"destination": "/x", "type": "bind", "source": "/v"},
     [{"kind": "volume", "name": "../../etc", "destination": "/x"}], "invalid volume"),
])
def test_hostile_mounts_are_refused(mount: dict[str, Any], volumes: list[dict[str, Any]],
                                    words: str) -> None:
    manifest = _manifest()
    manifest.extra["volumes"] = volumes
    with pytest.raises(ArchiveError, match=words):
        portable.describe(manifest, {SPEC_DUMP: json.dumps(_spec(mounts=[mount])).encode()})


def test_docker_dialect_publishes_the_ports_asked_for() -> None:
    body = docker_foreign.create_body(_describe(), ("8080:80",))
    assert body["ExposedPorts"] == {"80/tcp": {}}
    assert body["HostConfig"]["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}


def test_mangled_images_raise_only_criu_image_errors() -> None:
    """Every byte of a mount tree and a files image flipped or cut: the readers answer
    with CriuImageError or a result, never another exception."""
    import random

    rng = random.Random(14)
    mounts = _mounts(_mount(120, "/a", shared=7, external="/a"), root_master=5)
    files = _image(criu_images.FILES_MAGIC, [_reg("/", ROOT_ID, 0o40555)])
    tree = criu_images.read_mountpoints(mounts)
    for _ in range(400):
        for data, readers in (
            (mounts, (criu_images.read_mountpoints, criu_images.without_outside_masters)),
            (files, (lambda d: criu_images.root_mode(d, tree),
                     lambda d: criu_images.without_root_mode(d, tree))),
        ):
            bad = bytearray(data)
            bad[rng.randrange(8, len(bad))] = rng.randrange(256)
            for sample in (bytes(bad), bytes(bad[:rng.randrange(len(bad))])):
                for read in readers:
                    with contextlib.suppress(CriuImageError):
                        read(sample)


def _crio(spec: dict[str, Any]) -> Portable:
    manifest = Manifest(engine="cri-o", container=ContainerRecord(name="counter", image="bb"),
                        extra={"foreign": {"layout": "cri-o"}})
    return portable.describe(manifest, {SPEC_DUMP: json.dumps(spec).encode()})


def _pod_namespaces(*extra: dict[str, str]) -> dict[str, Any]:
    return {"namespaces": [{"type": "pid"}, {"type": "mount"},
                           {"type": "ipc", "path": "/var/run/ipcns/pod"},
                           {"type": "uts", "path": "/var/run/utsns/pod"},
                           {"type": "network", "path": "/var/run/netns/pod"}, *extra]}


def test_a_crio_container_leaves_its_pod_behind() -> None:
    spec = _spec(linux=_pod_namespaces())
    spec["mounts"].append({"destination": "/etc/hosts", "type": "bind", "options": ["rbind"],
                           "source": "/var/lib/kubelet/pods/u/etc-hosts"})
    p = _crio(spec)
    assert (p.writer, p.home, p.name) == ("cri-o", "podman", "counter")
    assert not [ns for ns in p.spec["linux"]["namespaces"] if ns.get("path")]
    with pytest.raises(UntranslatableError) as refused:
        dataclasses.replace(p, external=["/x"]).require([], "runc")
    assert refused.value.hint == "restore it with --engine podman"


@pytest.mark.parametrize(("linux", "mount", "words"), [
    (_pod_namespaces(), {"destination": "/dev/termination-log", "type": "bind",
                         "source": "/var/lib/kubelet/pods/u/containers/c/0a"},
     r"mounts only its kubelet provides: /dev/termination-log \(from /var/lib/kubelet"),
    (_pod_namespaces(), {"destination": "/var/run/secrets/kubernetes.io/serviceaccount",
                         "type": "bind", "options": ["rbind", "ro"],
                         "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/t"},
     "serviceaccount"),
    ({"namespaces": [{"type": "pid", "path": "/proc/9/ns/pid"}]}, None,
     "shared its pod's PID namespace"),
])
def test_what_a_crio_container_needs_from_its_pod_is_refused(
        linux: dict[str, Any], mount: dict[str, Any] | None, words: str) -> None:
    spec = _spec(linux=linux)
    if mount:
        spec["mounts"].append(mount)
    with pytest.raises(UntranslatableError, match=words):
        _crio(spec)
