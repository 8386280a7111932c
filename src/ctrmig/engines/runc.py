"""The runc adapter: containers run straight from OCI bundles, no daemon.

Layout under ``state_dir`` (default /var/lib/ctrmig/runc)::

    runc-root/          runc's own --root
    images/HEX/         one image, keyed by its manifest digest: layout/ (skopeo's OCI
                        layout), rootfs/ (umoci's pristine unpack), image-config.json
    bundles/NAME/       config.json, meta.json, rootfs/ (an overlay mount whose lower
                        layer is the pristine image), diff/upper (the container's
                        changes: exactly what goes into rootfs-diff.tar), diff/work
    logs/NAME.log       what the container wrote on stdout/stderr
    tmp/                work directories of checkpoints and restores

The container's stdio are pipes drained by a small supervisor process
(:mod:`ctrmig.engines.runc_supervisor`), since CRIU cannot dump a host file as stdio;
runc records the pipes in descriptors.json and a restore hands it new ones.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest
from ctrmig.archive.layers import apply_rootfs_diff, write_rootfs_diff
from ctrmig.engines.base import BaseMigrator
from ctrmig.errors import (
    ArchiveError,
    CheckpointError,
    CommandError,
    CommandTimeoutError,
    ContainerNotFoundError,
    CtrmigError,
    EngineError,
    ImageNotFoundError,
    NameInUseError,
    OptionError,
    RestoreError,
)
from ctrmig.host import criu, mounts, proc
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions

log = logging.getLogger(__name__)

#: The bundle template shipped at the top of the repository (see bundles/README.md).
TEMPLATE = Path(__file__).resolve().parents[3] / "bundles" / "default" / "config.json"
TRANSPORTS = ("containers-storage:", "docker-daemon:", "oci:", "oci-archive:",
              "docker-archive:", "dir:")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TOOL_TIMEOUT = 120.0
IMAGE_TIMEOUT = 600.0
LAZY_SOCKET = "lazy-pages.socket"
_MISSING_IMAGE = re.compile(
    r"does not exist|not found|no such|unknown image|identifier is not an image|"
    r"not known|cannot find", re.IGNORECASE)


@dataclass(frozen=True)
class _Image:
    ref: str            # as the user gave it
    transport_ref: str  # what skopeo reads
    digest: str         # sha256:... of the source manifest
    rootfs: Path        # pristine unpack (overlay lower layer)
    config: dict[str, Any]  # the OCI image config's "config" object


def transport_ref(image: str) -> str:
    """The skopeo reference of ``image``; a bare reference means containers-storage."""
    if image.startswith(TRANSPORTS):
        return image
    if "://" in image:
        raise OptionError(
            f"image {image!r}: only local transports are supported",
            hint="use containers-storage:, docker-daemon:, oci:, oci-archive:, "
                 "docker-archive: or dir:",
        )
    return f"containers-storage:{image}"


class RuncMigrator(BaseMigrator):
    """Run, checkpoint and restore runc containers from local images."""

    engine: ClassVar[str] = "runc"
    commits_in_restore: ClassVar[bool] = True  # right before `runc restore`
    checkpoint_options: ClassVar[frozenset[str]] = frozenset({"tcp_established", "file_locks"})
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "lazy_pages"})

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        template: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 900.0,
    ):
        super().__init__(workdir=workdir, timeout=timeout)
        self.state_dir = Path(state_dir or settings.current().runc_state_dir).absolute()
        self.template = Path(template) if template is not None else TEMPLATE
        self.runc_root = self.state_dir / "runc-root"
        self.images_dir = self.state_dir / "images"
        self.bundles_dir = self.state_dir / "bundles"
        self.logs_dir = self.state_dir / "logs"
        self.tmp_dir = self.state_dir / "tmp"
        for d in (self.runc_root, self.images_dir, self.bundles_dir, self.logs_dir,
                  self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        # overlayfs options are comma/colon separated: refuse paths that would break them
        if re.search(r"[,:\s]", str(self.state_dir)):
            raise OptionError(f"state_dir {self.state_dir} holds ',', ':' or whitespace",
                              hint="pick a plain path")

    # --- public API ----------------------------------------------------------------------

    @property
    def lock_scope(self) -> str:
        """This instance of runc: the state dir."""
        return str(self.state_dir)

    def version(self) -> str:
        text = proc.output(["runc", "--version"], timeout=TOOL_TIMEOUT)
        return text.splitlines()[0] if text else ""

    def run(
        self,
        image: str,
        *,
        name: str | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None,
    ) -> str:
        """Start a detached container from a local image; return its name.

        ``command`` replaces the image's CMD (its ENTRYPOINT stays); ``env`` adds to the
        image's environment.
        """
        name = name or f"ctrmig-{uuid.uuid4().hex[:8]}"
        self._check_name(name)
        self._check_name_free(name)
        img = self._image_for(image)
        cfg = img.config
        entrypoint = list(cfg.get("Entrypoint") or [])
        args = entrypoint + (list(command) if command else list(cfg.get("Cmd") or []))
        if not args:
            raise OptionError(f"image {image!r} has no ENTRYPOINT or CMD; pass command=")
        full_env = _merge_env(list(cfg.get("Env") or []), env)
        uid, gid = _user(str(cfg.get("User") or ""))
        process = {"args": args, "env": full_env, "cwd": cfg.get("WorkingDir") or "/",
                   "uid": uid, "gid": gid, "hostname": name[:63]}
        meta = {"name": name, "image": image, "transport_ref": img.transport_ref,
                "digest": img.digest, "process": process,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        bundle = self._make_bundle(name, img, meta)
        try:
            self._start(name, bundle, ["run", "--detach", "--bundle", str(bundle), name],
                        work=None, error=EngineError, what=f"runc run {name}")
        except BaseException:
            self._cleanup(name)
            raise
        return name

    def list(self) -> list[ContainerInfo]:
        states = {s["id"]: s for s in self._runc_list()}
        busy = self._in_flight()
        out = []
        for name in self._bundle_names():
            meta = self._meta(name)
            state = self._status(name, states) if meta else "broken"  # remove() clears it
            state = busy.get(name, state)
            out.append(ContainerInfo(engine=self.engine, name=name, id=name,
                                     image=(meta or {}).get("image", ""), state=state))
        return out

    def exists(self, container: str) -> bool:
        if not NAME_RE.fullmatch(container):
            return False
        return (self.bundles_dir / container).exists() or self._runc_state(container) is not None

    def remove(self, container: str) -> None:
        if not NAME_RE.fullmatch(container):
            return
        self._cleanup(container)

    def logs(self, container: str) -> str:
        path = self._log_path(container)
        if not path.exists():
            if not self.exists(container):
                raise ContainerNotFoundError(f"no runc container named {container!r}")
            return ""
        return path.read_text(errors="replace")

    # --- checkpoint ------------------------------------------------------------------------

    def _describe(self, container: str) -> ContainerRecord:
        meta = self._meta(container) if NAME_RE.fullmatch(container) else None
        if meta is None:
            raise ContainerNotFoundError(f"no runc container named {container!r}",
                                         hint="see ctrmig list --engine runc")
        return ContainerRecord(name=container, id=container, image=meta["image"],
                               image_id=meta["digest"], command=meta["process"]["args"])

    def _dump(
        self, record: ContainerRecord, opts: CheckpointOptions, writer: ArchiveWriter
    ) -> dict[str, Any]:
        name = record.name
        state = self._runc_state(name)
        status = state.get("status") if state else self._status(name, {})
        if status not in ("running", "paused"):
            raise CheckpointError(f"runc container {name!r} is {status}, not running",
                                  hint="restore or resume it first" if status ==
                                  "checkpointed" else None)
        bundle = self.bundles_dir / name
        meta = self._meta(name) or {}
        images = bundle / "checkpoint"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        with self._workdir("checkpoint") as work:
            argv = self._runc("checkpoint", "--image-path", str(images),
                              "--work-path", str(work))
            if opts.leave_running:
                argv.append("--leave-running")
            if opts.tcp_established:
                argv.append("--tcp-established")
            if opts.file_locks:
                argv.append("--file-locks")
            started = time.monotonic()
            try:
                proc.run([*argv, name], timeout=self.timeout, log_file=work / "dump.log",
                         what=f"runc checkpoint {name}")
            except CommandError as e:
                shutil.rmtree(images, ignore_errors=True)
                text = (e.stderr or "") + "\n--- CRIU dump.log ---\n" + _criu_tail(
                    _read(work / "dump.log"))
                kept = self._keep_logs(name, work)
                after = self._runc_state(name)
                left = (f"the container is {after.get('status')}" if after
                        else "the container is gone")
                raise CheckpointError(
                    f"runc checkpoint of {name!r} failed: {_summary(text)}", stderr=text,
                    hint=f"{left}; full logs kept in {kept}" if kept else left,
                ) from e
            dump_seconds = time.monotonic() - started
            if not opts.leave_running:
                self._drained(name)  # so that logs() holds all it wrote before the dump
            try:
                writer.add_tree(images, "checkpoint")
                writer.add_file("spec.dump", bundle / "config.json")
                writer.add_bytes("config.dump", _json(self._config_dump(meta)))
                diff = work / "rootfs-diff.tar"
                deleted = write_rootfs_diff(bundle / "diff" / "upper", diff)
                writer.add_file("rootfs-diff.tar", diff)
                if deleted:
                    writer.add_bytes("deleted.files", _json(deleted))
                for stats in (work / "stats-dump", images / "stats-dump"):
                    if stats.is_file():  # CRIU's dump statistics, where podman keeps them
                        writer.add_file("stats-dump", stats)
                        break
            except BaseException as e:
                if not opts.leave_running:
                    self._rollback(name, e)
                raise
            finally:
                if opts.leave_running:
                    shutil.rmtree(images, ignore_errors=True)
        # Without leave_running the images stay in the bundle until the container is
        # removed, so that _rollback_checkpoint can bring it back if the archive fails.
        return {
            "runc_root": str(self.runc_root),
            "image_transport": meta.get("transport_ref", ""),
            "image_digest": meta.get("digest", ""),
            "dump_seconds": round(dump_seconds, 3),
            "rootfs_deleted_paths": deleted,
        }

    def _rollback_checkpoint(self, record: ContainerRecord, opts: CheckpointOptions) -> None:
        self._rollback(record.name, None)

    def _rollback(self, name: str, cause: BaseException | None) -> None:
        """Bring a container stopped by a checkpoint back; never raise (the caller does)."""
        log.warning("checkpoint of %s failed after the dump (%s); resuming it", name, cause)
        try:
            self.resume(name)
        except CtrmigError as e:
            log.error("could not resume %s after a failed checkpoint: %s", name, e)

    def resume(self, container: str) -> None:
        """Run again a container that a checkpoint stopped, from the images it kept."""
        bundle = self.bundles_dir / container
        images = bundle / "checkpoint"
        if self._meta(container) is None:
            raise ContainerNotFoundError(f"no runc container named {container!r}")
        if self._runc_state(container) is not None:
            raise CheckpointError(f"runc container {container!r} is already running")
        if not (images / "inventory.img").is_file():
            raise CheckpointError(f"runc container {container!r} has no kept checkpoint",
                                  hint="restore it from its archive instead")
        with self._workdir("resume") as work:
            self._start(container, bundle,
                        ["restore", "--detach", "--image-path", str(images),
                         "--work-path", str(work), "--bundle", str(bundle), container],
                        work=work, error=RestoreError, what=f"runc restore {container}")
        shutil.rmtree(images, ignore_errors=True)

    def _has_image(self, ref: str) -> bool:
        """Whether ``ref`` was unpacked here before or skopeo finds it now."""
        tref = transport_ref(ref)
        for known in self.images_dir.glob("*/source-refs"):
            if tref in known.read_text().splitlines():
                return True
        try:
            self._inspect_digest(ref, tref)
        except ImageNotFoundError:
            return False
        return True

    def _export_image(self, ref: str, dest: Path) -> str:
        """Save the image the container runs as an oci-archive, tagged by its digest."""
        digests = {m.get("digest") for m in map(self._meta, self._bundle_names())
                   if m and m.get("image") == ref}
        # Several containers from different versions of ref: take the current one.
        digest = str(digests.pop()) if len(digests) == 1 else self._image_for(ref).digest
        cache = self._cache_dir(digest)
        if not (cache / "layout" / "index.json").is_file():
            raise ImageNotFoundError(f"image {ref!r} ({digest}) is not in the image cache")
        proc.run(["skopeo", "copy", "--quiet", f"oci:{cache / 'layout'}:latest",
                  f"oci-archive:{dest}:{_digest_tag(digest)}"], timeout=IMAGE_TIMEOUT,
                 what=f"skopeo copy {ref} to the archive")
        return "oci-archive"

    def _load_image(self, path: Path, fmt: str) -> None:
        """Unpack an image carried in an archive into the cache, under its source digest."""
        if fmt != "oci-archive":
            raise ImageNotFoundError(f"the archive carries its image as {fmt!r}; the runc "
                                     "engine reads oci-archive only")
        tag = _oci_archive_tag(path)
        digest = tag.replace("-", ":", 1)
        cache = self._cache_dir(digest)
        with _flock(cache.with_suffix(".lock")):
            if not (cache / "rootfs").is_dir():
                self._unpack(f"oci-archive:{path}:{tag}", cache)
        log.info("unpacked the archive's image %s", digest)

    def _bundle_names(self) -> builtins.list[str]:
        return sorted(p.name for p in self.bundles_dir.iterdir() if p.is_dir())

    # --- restore ---------------------------------------------------------------------------

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        try:
            config = json.loads((source / "config.dump").read_text())
            process = config["process"]
            image_ref = str(config["image"])
            if not (isinstance(process, dict)
                    and all(isinstance(process.get(k), list) and process[k]
                            and all(isinstance(a, str) for a in process[k])
                            for k in ("args", "env"))):
                raise ValueError("process.args and process.env must be lists of strings")
            for key in ("uid", "gid"):
                int(process.get(key, 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RestoreError(f"archive's config.dump is missing or malformed: {e}") from None
        name = opts.name or manifest.container.name
        if opts.name is None and self.exists(name):
            name = f"{name}-{uuid.uuid4().hex[:6]}"
        self._check_name(name)
        carried = manifest.extra.get("image_archive")
        digest = config.get("digest")
        if (isinstance(carried, dict) and carried.get("member") in manifest.files
                and digest and not (self._cache_dir(digest) / "rootfs").is_dir()):
            self._load_image(source / str(carried["member"]), str(carried.get("format")))
        img = self._image_for(image_ref, config.get("transport_ref"), digest)
        meta = {"name": name, "image": image_ref, "transport_ref": img.transport_ref,
                "digest": img.digest, "process": process,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "restored_from": manifest.container.name}
        bundle = self._make_bundle(name, img, meta)
        lazy: subprocess.Popen[bytes] | None = None
        try:
            diff = source / "rootfs-diff.tar"
            if diff.exists():
                apply_rootfs_diff(diff, bundle / "rootfs")
            images = source / "checkpoint"
            with self._workdir("restore") as work:
                argv = ["restore", "--detach", "--image-path", str(images),
                        "--work-path", str(work), "--bundle", str(bundle)]
                if opts.tcp_established:
                    argv.append("--tcp-established")
                if opts.file_locks:
                    argv.append("--file-locks")
                if opts.lazy_pages:
                    argv.append("--lazy-pages")
                    lazy = self._start_lazy_pages(images, work)
                opts.commit()  # runc restore runs on in its own session if we die
                self._start(name, bundle, [*argv, name], work=work, error=RestoreError,
                            what=f"runc restore {name}")
                if lazy is not None:
                    self._finish_lazy_pages(lazy, work)
                    lazy = None
        except BaseException as e:
            if lazy is not None:
                proc.stop(lazy)
            self._cleanup(name)
            if isinstance(e, CtrmigError) and not isinstance(e, (RestoreError, ArchiveError)):
                raise RestoreError(f"restore of {name!r} failed: {e.message}",
                                   stderr=e.stderr, hint=e.hint) from e
            raise
        return name

    def _start_lazy_pages(self, images: Path, work: Path) -> subprocess.Popen[bytes]:
        """Start ``criu lazy-pages`` serving ``images``; wait until its socket listens."""
        daemon = proc.spawn(["criu", "lazy-pages", "--images-dir", str(images),
                             "--work-dir", str(work), "--log-file", "lazy-pages.log", "-v4"])
        deadline = time.monotonic() + 30
        while not (work / LAZY_SOCKET).exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                proc.stop(daemon)
                raise RestoreError("criu lazy-pages did not start",
                                   stderr=proc.tail(_read(work / "lazy-pages.log")))
            time.sleep(0.02)
        log.debug("criu lazy-pages %d serving %s", daemon.pid, images)
        return daemon

    def _finish_lazy_pages(self, daemon: subprocess.Popen[bytes], work: Path) -> None:
        """The container runs; wait until the daemon handed over every page and exited."""
        started = time.monotonic()
        try:
            code = daemon.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.stop(daemon)
            raise RestoreError(
                f"criu lazy-pages did not finish within {self.timeout:g} s",
                stderr=proc.tail(_read(work / "lazy-pages.log"))) from None
        log.debug("lazy pages done %.2f s after the container started",
                  time.monotonic() - started)
        if code != 0:
            raise RestoreError(f"criu lazy-pages failed (exit {code})",
                               stderr=proc.tail(_read(work / "lazy-pages.log")))

    # --- images and bundles ----------------------------------------------------------------

    def _image_for(self, image: str, recorded_transport: str | None = None,
                      digest: str | None = None) -> _Image:
        """The unpacked image, from the cache or copied with skopeo and unpacked by umoci.

        With ``digest`` (a restore), a cached copy of that digest is used as is;
        otherwise the image is read from ``recorded_transport`` (or ``image``) and must
        still have that digest.
        """
        ref = recorded_transport or transport_ref(image)
        if digest and (self._cache_dir(digest) / "rootfs").is_dir():
            return self._cached(image, ref, digest)
        found = self._inspect_digest(image, ref)
        if digest and found != digest:
            raise ImageNotFoundError(
                f"image {image!r} with digest {digest} is not on this host "
                f"({ref} now has digest {found})",
                hint="make the original image available (e.g. skopeo copy it here)",
            )
        cache = self._cache_dir(found)
        with _flock(cache.with_suffix(".lock")):
            if not (cache / "rootfs").is_dir():
                self._unpack(ref, cache)
            refs = _read(cache / "source-refs").splitlines()
            if ref not in refs:
                (cache / "source-refs").write_text("\n".join([*refs, ref]) + "\n")
        return self._cached(image, ref, found)

    def _cache_dir(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise ImageNotFoundError(f"bad image digest {digest!r}")
        return self.images_dir / hexpart

    def _cached(self, image: str, ref: str, digest: str) -> _Image:
        cache = self._cache_dir(digest)
        config = json.loads((cache / "image-config.json").read_text())
        return _Image(image, ref, digest, cache / "rootfs", config.get("config") or {})

    def _inspect_digest(self, image: str, ref: str) -> str:
        res = proc.run(["skopeo", "inspect", "--format", "{{.Digest}}", ref],
                       timeout=IMAGE_TIMEOUT, check=False)
        err = res.stderr.decode(errors="replace")
        if res.returncode != 0:
            if _MISSING_IMAGE.search(err):
                raise ImageNotFoundError(f"image {image!r} not found ({ref})",
                                         stderr=proc.tail(err),
                                         hint="build or load it locally; registries are "
                                              "not used")
            raise CommandError(f"skopeo inspect {ref} failed (exit {res.returncode})",
                               argv=res.args, returncode=res.returncode,
                               stderr=proc.tail(err))
        digest = res.stdout.decode().strip()
        if not digest.startswith("sha256:"):
            raise CommandError(f"skopeo inspect {ref} printed no digest: {digest!r}",
                               stderr=proc.tail(err))
        return digest

    def _unpack(self, ref: str, cache: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="image-", dir=self.tmp_dir))
        try:
            proc.run(["skopeo", "copy", "--quiet", ref, f"oci:{tmp / 'layout'}:latest"],
                     timeout=IMAGE_TIMEOUT, what=f"skopeo copy {ref}")
            proc.run(["umoci", "unpack", "--image", f"{tmp / 'layout'}:latest",
                      str(tmp / "bundle")], timeout=IMAGE_TIMEOUT, what="umoci unpack")
            (tmp / "image-config.json").write_bytes(_json(_image_config(tmp / "layout")))
            (tmp / "bundle" / "rootfs").rename(tmp / "rootfs")
            shutil.rmtree(tmp / "bundle")
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _make_bundle(self, name: str, img: _Image, meta: dict[str, Any]) -> Path:
        """bundles/NAME with an overlay rootfs on the pristine image and config.json."""
        bundle = self.bundles_dir / name
        try:
            bundle.mkdir()
        except FileExistsError:
            raise NameInUseError(f"a runc container named {name!r} already exists",
                                 hint="pick another name or remove that container") from None
        try:
            (bundle / "meta.json").write_bytes(_json(meta))
            for d in ("rootfs", "diff/upper", "diff/work"):
                (bundle / d).mkdir(parents=True)
            opts = (f"lowerdir={img.rootfs},upperdir={bundle / 'diff/upper'},"
                    f"workdir={bundle / 'diff/work'}")
            proc.run(["mount", "-t", "overlay", "-o", opts, "overlay", str(bundle / "rootfs")],
                     timeout=TOOL_TIMEOUT, what=f"mount overlay rootfs of {name}")
            netns = self._netns(name)
            proc.run(["ip", "netns", "add", netns], timeout=TOOL_TIMEOUT,
                     what=f"create the network namespace of {name}")
            proc.run(["ip", "-n", netns, "link", "set", "lo", "up"], timeout=TOOL_TIMEOUT,
                     what=f"bring up loopback for {name}")
            (bundle / "config.json").write_bytes(_json(self._spec(meta["process"], netns)))
        except BaseException:
            self._cleanup(name)
            raise
        return bundle

    def _netns(self, name: str) -> str:
        """The named network namespace we make for a container (unique per state dir).

        Ours, not runc's: runc brings up loopback in a namespace it creates only on run,
        not on restore, where CRIU then cannot reconnect TCP sockets ("Network is
        unreachable"). A namespace with a path is also what runc treats as external on
        checkpoint and joins on restore, as podman's own network namespaces are.
        """
        digest = hashlib.sha256(f"{self.state_dir}\0{name}".encode()).hexdigest()[:16]
        return f"ctrmig-runc-{digest}"

    def _spec(self, process: dict[str, Any], netns: str) -> dict[str, Any]:
        """config.json from the bundle template and the container's process settings."""
        if self.template == TEMPLATE and not TEMPLATE.exists():
            spec = self._runc_spec()  # installed without the repository's bundles/
        else:
            try:
                spec = json.loads(self.template.read_text())
            except (OSError, ValueError) as e:
                raise OptionError(f"bundle template {self.template} is unusable: {e}") from None
        spec = copy.deepcopy(spec)
        p = spec.setdefault("process", {})
        p["terminal"] = False  # CRIU dumps pipes, not a terminal we do not own
        p["args"] = [str(a) for a in process["args"]]
        p["env"] = [str(e) for e in process["env"]]
        p["cwd"] = str(process.get("cwd") or "/")
        p["user"] = {"uid": int(process.get("uid", 0)), "gid": int(process.get("gid", 0))}
        spec["root"] = {"path": "rootfs", "readonly": False}
        spec["hostname"] = str(process.get("hostname") or "ctrmig")
        namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
        namespaces[:] = [ns for ns in namespaces if ns.get("type") != "network"]
        namespaces.append({"type": "network", "path": f"/run/netns/{netns}"})
        return spec

    def _runc_spec(self) -> dict[str, Any]:
        """``runc spec``, changed as bundles/README.md explains (no cgroup mount)."""
        with self._workdir("spec") as work:
            proc.run(["runc", "spec"], cwd=work, timeout=TOOL_TIMEOUT)
            spec: dict[str, Any] = json.loads((work / "config.json").read_text())
        spec["mounts"] = [m for m in spec.get("mounts", [])
                          if m.get("destination") != "/sys/fs/cgroup"]
        return spec

    @staticmethod
    def _config_dump(meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": meta.get("name"),
            "image": meta.get("image"),
            "transport_ref": meta.get("transport_ref"),
            "digest": meta.get("digest"),
            "command": meta.get("process", {}).get("args", []),
            "env": meta.get("process", {}).get("env", []),
            "process": meta.get("process", {}),
            "created": meta.get("created"),
        }

    # --- starting and cleaning up -----------------------------------------------------------

    def _start(self, name: str, bundle: Path, args: builtins.list[str], *, work: Path | None,
               error: type[CtrmigError], what: str) -> None:
        """Run ``runc ARGS`` (run --detach / restore --detach) with pipes as the
        container's stdout/stderr, drained by a new supervisor into the log."""
        runc_log = (work or bundle) / "runc.log"
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            supervisor = proc.spawn(
                [sys.executable, "-m", "ctrmig.engines.runc_supervisor",
                 str(self._log_path(name)), str(out_r), str(err_r)],
                pass_fds=(out_r, err_r))
            meta = self._meta(name) or {}
            meta["supervisor_pid"] = supervisor.pid
            (bundle / "meta.json").write_bytes(_json(meta))
            argv = [*self._runc(), "--log", str(runc_log), *args]
            runc = proc.spawn(argv, stdout=out_w, stderr=err_w)
        finally:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
        started = time.monotonic()
        try:
            code = runc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill_group(runc)
            raise CommandTimeoutError(f"{what} timed out after {self.timeout:g} s",
                                      argv=argv, stderr=self._failure_text(runc_log, work),
                                      ) from None
        except BaseException:
            proc.kill_group(runc)
            raise
        log.debug("%s: exit %d after %.2f s", what, code, time.monotonic() - started)
        if code != 0:
            text = self._failure_text(runc_log, work)
            kept = self._keep_logs(name, work)
            raise error(f"{what} failed (exit {code}): {_summary(text)}", stderr=text,
                        hint=f"full logs kept in {kept}" if kept else None)

    @staticmethod
    def _failure_text(runc_log: Path, work: Path | None) -> str:
        text = proc.tail(_read(runc_log), 10)
        if work is not None:
            for name in ("restore.log", "dump.log", "lazy-pages.log"):
                criu_log = _read(work / name)
                if criu_log:
                    text += f"\n--- CRIU {name} ---\n" + _criu_tail(criu_log)
        return text

    def _keep_logs(self, name: str, work: Path | None) -> Path | None:
        """Copy the logs of a failed runc/CRIU run out of its work dir, which goes away."""
        if work is None:
            return None
        logs = sorted(work.glob("*.log"))
        if not logs:
            return None
        dest = self.logs_dir / "failed" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for f in logs:
            shutil.copy2(f, dest / f.name)
        return dest

    def _cleanup(self, name: str) -> None:
        """Forget a container entirely: runc state, supervisor, rootfs mount, bundle, log."""
        if self._runc_state(name) is not None:
            with contextlib.suppress(CtrmigError):
                proc.run([*self._runc(), "delete", "--force", name], timeout=TOOL_TIMEOUT,
                         check=False)
        bundle = self.bundles_dir / name
        pid = self._drained(name)
        if pid is not None:
            proc.stop_pid(pid, timeout=5)
        rootfs = bundle / "rootfs"
        for attempt in range(20):
            if not mounts.is_mounted(rootfs):
                break
            res = proc.run(["umount", str(rootfs)], timeout=TOOL_TIMEOUT, check=False)
            if res.returncode != 0:
                if attempt == 19:
                    raise EngineError(f"cannot unmount {rootfs}",
                                      stderr=res.stderr.decode(errors="replace"))
                time.sleep(0.1)
        if bundle.exists():
            shutil.rmtree(bundle)
        netns = self._netns(name)
        if Path("/run/netns", netns).exists():
            proc.run(["ip", "netns", "delete", netns], timeout=TOOL_TIMEOUT, check=False)
        self._log_path(name).unlink(missing_ok=True)

    def _drained(self, name: str, timeout: float = 2.0) -> int | None:
        """Wait until the supervisor wrote all the (gone) container's output and exited;
        return its PID if it still runs after ``timeout``."""
        pid = (self._meta(name) or {}).get("supervisor_pid")
        if not isinstance(pid, int) or not self._is_our_supervisor(pid, name):
            return None
        deadline = time.monotonic() + timeout
        while proc.alive(pid):
            if time.monotonic() > deadline:
                return pid
            time.sleep(0.02)
        return None

    def _is_our_supervisor(self, pid: int, name: str) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (b"ctrmig.engines.runc_supervisor" in cmdline
                and str(self._log_path(name)).encode() in cmdline)

    # --- small helpers --------------------------------------------------------------------

    def _runc(self, *args: str) -> builtins.list[str]:
        return ["runc", "--root", str(self.runc_root), *args]

    def _runc_list(self) -> builtins.list[dict[str, Any]]:
        text = proc.output([*self._runc(), "list", "--format", "json"], timeout=TOOL_TIMEOUT)
        data = json.loads(text or "null")
        return data if isinstance(data, list) else []

    def _in_flight(self) -> dict[str, str]:
        """Containers that a ``runc checkpoint``/``runc restore`` on our root is working
        on now -> "checkpointing"/"restoring". It may be the orphan of a killed ctrmig:
        ``ctrmig recover`` waits for it instead of deciding on a state about to change."""
        root = str(self.runc_root).encode()
        verbs = {b"checkpoint": "checkpointing", b"restore": "restoring"}
        found: dict[str, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if (len(argv) < 4 or os.path.basename(argv[0]) != b"runc"
                    or argv[1:3] != [b"--root", root]):
                continue
            verb = next((verbs[a] for a in argv[3:] if a in verbs), None)
            if verb:
                found[argv[-1].decode(errors="replace")] = verb
        return found

    def _runc_state(self, name: str) -> dict[str, Any] | None:
        res = proc.run([*self._runc(), "state", name], timeout=TOOL_TIMEOUT, check=False)
        if res.returncode != 0:
            return None
        data = json.loads(res.stdout or b"null")
        return data if isinstance(data, dict) else None

    def _status(self, name: str, states: dict[str, dict[str, Any]]) -> str:
        if name in states:
            return str(states[name].get("status", ""))
        if (self.bundles_dir / name / "checkpoint").is_dir():
            return "checkpointed"
        return "stopped"

    def _meta(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.bundles_dir / name / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise OptionError(f"invalid container name {name!r}",
                              hint="letters, digits, '_', '.', '-'; at most 128")

    @contextlib.contextmanager
    def _workdir(self, what: str) -> Iterator[Path]:
        work = Path(tempfile.mkdtemp(prefix=f"{what}-", dir=self.tmp_dir))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --- misc helpers -----------------------------------------------------------------------


def _digest_tag(digest: str) -> str:
    """An OCI tag that carries a digest ("sha256:HEX" -> "sha256-HEX")."""
    return digest.replace(":", "-", 1)


def _oci_archive_tag(path: Path) -> str:
    """The digest tag of the one image in an oci-archive we wrote (from its index.json)."""
    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("index.json")
            index = json.loads(member.read(1 << 20)) if member else {}
        tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    except (OSError, tarfile.TarError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ImageNotFoundError(f"the archive's image {path.name} is unreadable: {e}") from None
    if not isinstance(tag, str) or not re.fullmatch(r"sha256-[0-9a-f]{64}", tag):
        raise ImageNotFoundError(f"the archive's image is not tagged by digest ({tag!r})")
    return tag


def _image_config(layout: Path) -> dict[str, Any]:
    """The OCI image config of the only image in an OCI layout."""
    def blob(digest: str) -> dict[str, Any]:
        algo, _, hexpart = digest.partition(":")
        data: dict[str, Any] = json.loads((layout / "blobs" / algo / hexpart).read_text())
        return data

    index = json.loads((layout / "index.json").read_text())
    manifest = blob(index["manifests"][0]["digest"])
    return blob(manifest["config"]["digest"])


def _merge_env(base: list[str], extra: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    merged: dict[str, str] = {}
    for item in base:
        k, _, v = item.partition("=")
        merged[k] = v
    if extra is not None:
        items = (extra.items() if isinstance(extra, Mapping)
                 else (e.partition("=")[::2] for e in extra))
        for k, v in items:
            merged[str(k)] = str(v)
    merged.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return [f"{k}={v}" for k, v in merged.items()]


def _user(user: str) -> tuple[int, int]:
    if not user:
        return 0, 0
    u, _, g = user.partition(":")
    if u.isdigit() and (not g or g.isdigit()):
        return int(u), int(g or 0)
    raise OptionError(f"image user {user!r} is not numeric; the runc engine needs uid[:gid]")


def _criu_tail(text: str) -> str:
    """CRIU's error lines (the last 10), without the harmless rlimit line."""
    return proc.tail("\n".join(criu.error_lines(text)) or text, 10)


def _summary(text: str) -> str:
    """One line for an error message: CRIU's first real error, else runc's last message."""
    first = criu.first_error(text)
    if first:
        return first
    msgs = re.findall(r'msg="((?:[^"\\]|\\.)*)"', text)
    if msgs:
        return str(msgs[-1]).split("\\n")[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2).encode() + b"\n"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
