"""What an archive's container asks of the host, from real podman spec.dump/config.dump
files (tests/data/specs, see its README) and hand-made hostile ones; and the restore
hook that refuses it before any engine call."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest, atomic_output
from ctrmig.archive.criu_images import MAX_CORE_IMAGE_BYTES
from ctrmig.archive.manifest import FileEntry
from ctrmig.archive.privileges import (
    DEFAULT_CAPABILITIES,
    PrivilegeRequest,
    archive_privileges,
    archive_requests,
    check,
    requests,
)
from ctrmig.engines.base import BaseMigrator, Dump
from ctrmig.errors import ArchiveError, CriuImageError, OptionError, PrivilegeError
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions
from tests.support import override_settings

SPECS = Path(__file__).resolve().parents[1] / "data" / "specs"
ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = json.loads((SPECS / f"{name}.spec.json").read_text())
    config = json.loads((SPECS / f"{name}.config.json").read_text())
    return spec, config


def kinds(found: list[PrivilegeRequest]) -> set[tuple[str, str]]:
    return {(r.kind, r.detail) for r in found}


# --- real podman containers ----------------------------------------------------------------


def test_default_podman_container_asks_for_nothing() -> None:
    assert requests(*load("podman-default")) == []


def test_named_volume_and_tmpfs_are_not_host_paths() -> None:
    assert requests(*load("podman-volume-tmpfs")) == []


def test_privileged_podman_container() -> None:
    """podman run --privileged --net=host -v /etc:/host-etc --cap-add SYS_ADMIN."""
    found = requests(*load("podman-privileged"))
    got = kinds(found)
    assert ("privileged", "podman --privileged") in got
    assert ("capability", "SYS_ADMIN") in got
    assert found[1] == PrivilegeRequest("capability", "SYS_ADMIN")  # the worst first
    assert ("namespace", "host network") in got
    assert ("host path", "/etc at /host-etc") in got
    assert ("device", "all devices") in got
    assert ("device", "/dev/vda (b 254:0)") in got
    assert ("unconfined", "no seccomp filter") in got
    assert ("unconfined", "no masked /proc paths") in got
    # Its own storage (hosts, resolv.conf, shm, .containerenv) is not a host path.
    assert not any("overlay-containers" in r.detail for r in found)
    assert not any(r.detail.startswith(("CHOWN", "KILL")) for r in found)


def test_unconfined_host_namespaces_and_a_device() -> None:
    """--security-opt seccomp=unconfined,apparmor=unconfined --device /dev/fuse
    --pid=host --ipc=host --uts=host --group-add 0."""
    assert kinds(requests(*load("podman-unconfined-hostns"))) == {
        ("namespace", "host pid"), ("namespace", "host ipc"), ("namespace", "host uts"),
        ("host path", "/dev/shm at /dev/shm"),  # the host's /dev/shm, with --ipc=host
        ("device", "/dev/fuse (c 10:229)"),
        ("unconfined", "no seccomp filter"), ("unconfined", "AppArmor unconfined"),
    }  # and group 0 is not flagged: the process is root already


def test_privileged_from_config_alone() -> None:
    _, config = load("podman-privileged")
    assert requests({}, config) == [PrivilegeRequest("privileged", "podman --privileged")]


def test_default_capabilities_are_the_documented_set() -> None:
    assert {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
            "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT", "AUDIT_WRITE", "MKNOD",
            "NET_RAW"} == DEFAULT_CAPABILITIES
    spec, config = load("podman-default")
    caps = spec["process"]["capabilities"]
    caps["bounding"] = [*caps["bounding"], "CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE"]
    assert requests(spec, config) == []


# --- hostile or unusual specs ---------------------------------------------------------------


def default() -> tuple[dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(load("podman-default"))


def test_bind_escaping_own_storage_with_dotdot() -> None:
    spec, config = default()
    userdata = f"/var/lib/containers/storage/overlay-containers/{config['id']}/userdata"
    spec["mounts"].append({"destination": "/x", "type": "bind",
                           "source": f"{userdata}/../../../../../../etc", "options": ["rbind"]})
    assert kinds(requests(spec, config)) == {("host path", f"{userdata}/../../../../../../etc"
                                                           " at /x")}


def test_another_containers_storage_is_a_host_path() -> None:
    spec, config = default()
    other = "/var/lib/containers/storage/overlay-containers/" + "e" * 64 + "/userdata/shm"
    spec["mounts"].append({"destination": "/x", "type": "none", "source": other,
                           "options": ["bind"]})
    assert kinds(requests(spec, config)) == {("host path", f"{other} at /x")}


def test_unnamed_volume_path_outside_default_roots_is_a_host_path() -> None:
    spec, config = default()
    spec["mounts"].append({"destination": "/x", "type": "bind",
                           "source": "/srv/volumes/secret/_data", "options": ["rbind"]})
    assert len(requests(spec, config)) == 1


def test_block_device_filesystem_mount() -> None:
    spec, config = default()
    spec["mounts"].append({"destination": "/host", "type": "ext4", "source": "/dev/vda1"})
    assert kinds(requests(spec, config)) == {("host path", "ext4 mount of /dev/vda1 at /host")}


def test_namespace_joined_by_proc_path() -> None:
    spec, config = default()
    for ns in spec["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = "/proc/1/ns/net"
    assert kinds(requests(spec, config)) == {
        ("namespace", "network of another process (/proc/1/ns/net)")}


def test_device_judged_by_numbers_not_name() -> None:
    spec, config = default()
    spec["linux"]["devices"] = [
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
        {"path": "/dev/zero", "type": "b", "major": 8, "minor": 0},  # /dev/sda in disguise
    ]
    assert kinds(requests(spec, config)) == {("device", "/dev/zero (b 8:0)")}


def test_device_cgroup_rules() -> None:
    spec, config = default()
    spec["linux"]["resources"]["devices"] += [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # default
        {"allow": True, "type": "c", "major": 136, "minor": 4, "access": "rw"},  # a pts
        {"allow": True, "type": "b", "access": "m"},  # mknod only
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "rw"},
        {"allow": True, "type": "c", "access": "rwm"},
    ]
    assert kinds(requests(spec, config)) == {("device", "access to b 8:0"),
                                            ("device", "all c devices")}


def test_allow_all_seccomp_and_apparmor_unconfined() -> None:
    spec, config = default()
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW"}
    spec["process"]["apparmorProfile"] = "unconfined"
    assert kinds(requests(spec, config)) == {("unconfined", "no seccomp filter"),
                                            ("unconfined", "AppArmor unconfined")}


def test_group_zero_for_a_non_root_process() -> None:
    spec, config = default()
    spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [0]}
    assert kinds(requests(spec, config)) == {("group", "supplementary group 0 (root)")}


def test_malformed_spec_is_judged_conservatively() -> None:
    found = requests({"process": "x", "linux": {"namespaces": "nope", "devices": [1, None]},
                      "mounts": [None, {"type": "bind"}]}, {"privileged": "yes"})
    got = kinds(found)
    assert ("namespace", "host network") in got
    assert ("host path", " at ") in got  # a bind without a source is not own storage
    assert ("unconfined", "no seccomp filter") in got


def test_runc_bundle_template() -> None:
    """The runc engine's own template has no seccomp filter, and it is what runc restores
    on, whatever the archive's spec.dump says: so runc archives are not judged by it."""
    spec = json.loads((ROOT / "bundles" / "default" / "config.json").read_text())
    assert requests(spec, None) == [PrivilegeRequest("unconfined", "no seccomp filter")]


# --- docker's inspect document ----------------------------------------------------------------


def docker_config(**host: Any) -> dict[str, Any]:
    return {"Id": "d" * 64, "Name": "/web", "Config": {"Image": "busybox"},
            "HostConfig": {"NetworkMode": "bridge", "Privileged": False, "CapAdd": None,
                           "Binds": None, "SecurityOpt": None, **host}}


def test_docker_default_container_asks_for_nothing() -> None:
    assert requests({}, docker_config(Binds=["data:/data"], CapAdd=["NET_RAW"])) == []


def test_docker_privileges() -> None:
    config = docker_config(
        Privileged=True, CapAdd=["CAP_NET_ADMIN", "SYS_ADMIN"], NetworkMode="host",
        PidMode="container:abc", Binds=["/etc:/host-etc:ro", "named:/data"],
        Mounts=[{"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/sock"}],
        Devices=[{"PathOnHost": "/dev/kvm", "PathInContainer": "/dev/kvm"}],
        SecurityOpt=["seccomp:unconfined", "apparmor=unconfined", "no-new-privileges"])
    assert kinds(requests({}, config)) == {
        ("privileged", "docker --privileged"), ("capability", "SYS_ADMIN"),
        ("capability", "NET_ADMIN"), ("namespace", "host network"),
        ("namespace", "pid of container:abc"), ("host path", "/etc:/host-etc:ro"),
        ("host path", "/var/run/docker.sock:/sock"), ("device", "/dev/kvm"),
        ("unconfined", "seccomp:unconfined"), ("unconfined", "apparmor=unconfined"),
    }


def test_docker_volume_with_driver_options_is_a_request() -> None:
    """--mount type=volume,volume-opt=o=bind,volume-opt=device=/: a host path in disguise."""
    bind_root = {"Name": "local", "Options": {"type": "none", "o": "bind", "device": "/"}}
    config = docker_config(Mounts=[
        {"Type": "volume", "Source": "root", "Target": "/host",
         "VolumeOptions": {"DriverConfig": bind_root}},
        {"Type": "volume", "Source": "plain", "Target": "/data", "VolumeOptions": {}},
    ])
    assert kinds(requests({}, config)) == {
        ("volume", "root at /host (local driver options)")}


# --- check --------------------------------------------------------------------------------------


def test_check_refuses_with_the_hint_and_allows_on_request(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    found = requests(*load("podman-privileged"))
    with pytest.raises(PrivilegeError) as caught:
        check(found, allow_privileged=False)
    text = str(caught.value)
    assert "SYS_ADMIN" in text and "host network" in text and "/etc at /host-etc" in text
    assert caught.value.hint == ("pass --allow-privileged (allow_privileged=True) if you "
                                 "trust this archive")
    assert "more" in text and len(text) < 1000  # grouped and bounded, not 40 items
    check(found, allow_privileged=True)
    assert "allowed" in caplog.text
    check([], allow_privileged=False)


# --- from archives ----------------------------------------------------------------------------


def write(path: Path, engine: str, name: str | None, compression: str = "none",
          cores: dict[int, bytes] | None = None) -> Manifest:
    with atomic_output(path) as out:
        w = ArchiveWriter(out, compression)  # type: ignore[arg-type]
        w.add_bytes("checkpoint/inventory.img", b"inv")
        for pid, core in (cores or {}).items():
            w.add_bytes(f"checkpoint/core-{pid}.img", core)
        if name:
            spec, config = load(name)
            w.add_bytes("config.dump", json.dumps(config).encode())
            w.add_bytes("spec.dump", json.dumps(spec).encode())
        return w.finish(Manifest(engine=engine, container=ContainerRecord(name="c", id="1")))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_archive_privileges(tmp_path: Path, compression: str) -> None:
    write(tmp_path / "p.tar", "podman", "podman-privileged", compression)
    assert ("capability", "SYS_ADMIN") in kinds(archive_privileges(tmp_path / "p.tar"))
    write(tmp_path / "d.tar", "podman", "podman-default", compression)
    assert archive_privileges(tmp_path / "d.tar") == []
    write(tmp_path / "n.tar", "podman", None, compression)
    assert archive_privileges(tmp_path / "n.tar") == []


def test_runc_and_process_archives_take_nothing_from_the_declared_config(tmp_path: Path
                                                                          ) -> None:
    write(tmp_path / "runc.tar", "runc", "podman-privileged")
    assert archive_privileges(tmp_path / "runc.tar") == []
    write(tmp_path / "process.tar", "process", "podman-privileged")
    assert archive_privileges(tmp_path / "process.tar") == [
        PrivilegeRequest("host process", "runs on the host")]
    write(tmp_path / "other.tar", "someengine", "podman-privileged")
    assert archive_privileges(tmp_path / "other.tar")


# --- what the CRIU images hold ----------------------------------------------------------------

SYS_ADMIN, NET_ADMIN = 1 << 21, 1 << 12
CRIU = Path(__file__).resolve().parents[1] / "data" / "criu"


def core(caps: int = 0, bounding: int | None = None, uid: int = 0) -> bytes:
    from tests.unit.test_hostile_archives import make_hostile
    return bytes(make_hostile.core_image(make_hostile.creds_message(
        uid=uid, caps=make_hostile.PODMAN_CAPS | caps,
        bounding=None if bounding is None else make_hostile.PODMAN_CAPS | bounding)))


@pytest.mark.parametrize("engine", ["podman", "docker", "runc", "someengine"])
def test_image_capabilities_are_judged_for_every_engine(tmp_path: Path, engine: str) -> None:
    write(tmp_path / "a.tar", engine, "podman-default", cores={1: core(SYS_ADMIN), 7: core()})
    assert archive_privileges(tmp_path / "a.tar") == [
        PrivilegeRequest("capability", "task 1 holds CAP_SYS_ADMIN in its CRIU image")]


def test_ordinary_image_capabilities_ask_for_nothing(tmp_path: Path) -> None:
    docker_defaults = (1 << 13) | (1 << 27) | (1 << 29)  # NET_RAW, MKNOD, AUDIT_WRITE
    write(tmp_path / "a.tar", "podman", "podman-default", "zstd",
          cores={1: core(docker_defaults), 2: core(uid=1000)})
    assert archive_privileges(tmp_path / "a.tar") == []


def test_image_bounding_set_counts_and_tasks_are_grouped(tmp_path: Path) -> None:
    write(tmp_path / "a.tar", "runc", None,
          cores={1: core(bounding=SYS_ADMIN | NET_ADMIN), 2: core(bounding=SYS_ADMIN | NET_ADMIN),
                 3: core(bounding=(1 << 41) - 1)})
    assert archive_privileges(tmp_path / "a.tar") == [
        PrivilegeRequest("capability",
                         "tasks 1 and 2 hold CAP_SYS_ADMIN and CAP_NET_ADMIN in their CRIU images"),
        PrivilegeRequest("capability", "task 3 holds all capabilities in its CRIU image")]


def test_image_capabilities_the_config_declares_are_not_listed_twice(tmp_path: Path) -> None:
    write(tmp_path / "p.tar", "podman", "podman-privileged", cores={1: core((1 << 41) - 1)})
    found = archive_privileges(tmp_path / "p.tar")
    assert found == requests(*load("podman-privileged"))  # --privileged says it all
    spec, config = default()
    spec["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "spec.dump").write_text(json.dumps(spec))
    (tmp_path / "x" / "config.dump").write_text(json.dumps(config))
    (tmp_path / "x" / "core-1.img").write_bytes(core(SYS_ADMIN | NET_ADMIN))
    manifest = Manifest(engine="podman", container=ContainerRecord(name="c"),
                        files={n: FileEntry(1, "") for n in ("spec.dump", "config.dump",
                                                            "core-1.img")})
    assert archive_requests(tmp_path / "x", manifest, extracted=True) == [
        PrivilegeRequest("capability", "SYS_ADMIN"),
        PrivilegeRequest("capability", "task 1 holds CAP_NET_ADMIN in its CRIU image")]


def test_real_core_images(tmp_path: Path) -> None:
    cores = {1: (CRIU / "core-netraw-sysadmin.img").read_bytes()}
    write(tmp_path / "a.tar", "podman", "podman-default", cores=cores)
    assert archive_privileges(tmp_path / "a.tar") == [
        PrivilegeRequest("capability", "task 1 holds CAP_SYS_ADMIN in its CRIU image")]


def test_process_archive_is_a_host_process(tmp_path: Path) -> None:
    root = (CRIU / "core-root.img").read_bytes()
    write(tmp_path / "p.tar", "process", None, cores={40: root})
    assert archive_privileges(tmp_path / "p.tar") == [PrivilegeRequest(
        "host process", "runs on the host as uid 0 with CAP_SYS_ADMIN, CAP_SYS_MODULE, "
                        "CAP_SYS_RAWIO and 37 more")]
    write(tmp_path / "q.tar", "process", None,
          cores={40: core((1 << 41) - 1), 41: core(0, uid=1000)})
    assert archive_privileges(tmp_path / "q.tar") == [PrivilegeRequest(
        "host process", "runs on the host as uid 0 and 1000 with all capabilities")]
    with pytest.raises(PrivilegeError, match="host process runs on the host as uid 0") as caught:
        check(archive_privileges(tmp_path / "q.tar"), allow_privileged=False)
    assert caught.value.hint and "--allow-privileged" in caught.value.hint


def test_oversized_or_malformed_core_images_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.tar", "podman", None, cores={1: b"\0" * (MAX_CORE_IMAGE_BYTES + 1)})
    with pytest.raises(CriuImageError, match="implausibly large"):
        archive_privileges(tmp_path / "a.tar")
    write(tmp_path / "b.tar", "podman", None, cores={1: core()[:-1]})
    with pytest.raises(CriuImageError, match=r"core-1\.img"):
        archive_privileges(tmp_path / "b.tar")


def test_unreadable_spec_is_an_archive_error(tmp_path: Path) -> None:
    for data in (b"{not json", b"[1, 2]", b"[" * 100_000):
        with atomic_output(tmp_path / "bad.tar") as out:
            w = ArchiveWriter(out)
            w.add_bytes("spec.dump", data)
            w.finish(Manifest(engine="podman", container=ContainerRecord(name="c")))
        with pytest.raises(ArchiveError, match=r"spec\.dump"):
            archive_privileges(tmp_path / "bad.tar")


# --- the restore hook ---------------------------------------------------------------------------


class FakeMigrator(BaseMigrator):
    """Records whether restore reached the engine."""

    engine: ClassVar[str] = "podman"
    restore_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def version(self) -> str:
        return "0"

    def list(self) -> list[ContainerInfo]:
        return []

    def exists(self, container: str) -> bool:
        return False

    def remove(self, container: str) -> None: ...

    def logs(self, container: str) -> str:
        return ""

    def _describe(self, container: str) -> ContainerRecord:
        raise NotImplementedError

    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        raise NotImplementedError

    def _has_image(self, ref: str) -> bool:
        self.calls.append("image")
        return True

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        self.calls.append("restore")
        return "restored"


class ExtractingFake(FakeMigrator):
    needs_extracted: ClassVar[bool] = True


class FileFake(FakeMigrator):
    needs_extracted: ClassVar[bool] = False


@pytest.mark.parametrize("cls", [ExtractingFake, FileFake])
def test_restore_refuses_privileged_archive_before_the_engine(
    tmp_path: Path, cls: type[FakeMigrator], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    override_settings(monkeypatch, lock_dir=tmp_path / "locks")
    arc = tmp_path / "p.tar.zst"
    write(arc, "podman", "podman-privileged", "zstd")
    m = cls()
    with pytest.raises(PrivilegeError, match="SYS_ADMIN"):
        m.restore(arc)
    assert m.calls == []
    with arc.open("rb") as stream, pytest.raises(PrivilegeError):
        m.restore(io.BytesIO(stream.read()))  # a stream too
    assert m.calls == []
    assert m.restore(arc, allow_privileged=True) == "restored"
    assert m.calls == ["restore"]
    write(tmp_path / "d.tar", "podman", "podman-default")
    assert cls().restore(tmp_path / "d.tar") == "restored"


def test_allow_privileged_is_honoured_by_every_engine(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The base handles allow_privileged, so an adapter need not list it; others still
    refuse what they do not list."""
    override_settings(monkeypatch, lock_dir=tmp_path / "locks")
    write(tmp_path / "d.tar", "podman", "podman-default")
    assert FileFake().restore(tmp_path / "d.tar", allow_privileged=True) == "restored"
    with pytest.raises(OptionError, match="tcp_established"):
        FileFake().restore(tmp_path / "d.tar", tcp_established=True)
