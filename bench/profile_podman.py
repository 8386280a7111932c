"""Where does ctrmig's podman migrate spend its time? One migration, its phases timed.

    .venv/bin/python -m bench.profile_podman [--mib 1024] [--tmpfs-tmpdir]

Runs one ``ctrmig.migrate`` from host A to host B (as bench.migrate_bench does) with
timers wrapped around the steps of the pipeline (the source and target run concurrently,
so the phases are given as a timeline from the start of the migration):

- ``source.describe``     podman inspect
- ``source.headers``      podman's checkpoint response starts (podman dumped with CRIU and
                          wrote its export tar to a temp file first)
- ``source.repack_end``   podman's stream fully read, re-packed, hashed, into the pipe
- ``target.spool_end``    the target saved the stream to its spool file
- ``target.verify_end``   ...and re-read it, checking every sha256 against the manifest
- ``target.import_end``   podman's import (upload, its own spool and extract, CRIU restore)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tests.hosts import TwoHosts

from bench.migrate_bench import PodmanBench
from ctrmig.host import proc

PROFILE_SCRIPT = r"""
import json, sys, time, ctrmig, logging
logging.basicConfig(level=logging.INFO)
import importlib
base = importlib.import_module("ctrmig.engines.base")
podman = importlib.import_module("ctrmig.engines.podman.migrator")
direct = importlib.import_module("ctrmig.engines.podman.direct")
bundle = importlib.import_module("ctrmig.engines.podman.bundle")
reader = importlib.import_module("ctrmig.archive.reader")
writer = importlib.import_module("ctrmig.archive.writer")
T0 = time.monotonic()
marks = {}
def mark(k):
    marks.setdefault(k, round(time.monotonic() - T0, 3))

def wrap(obj, attr, before=None, after=None):
    orig = getattr(obj, attr, None)
    if orig is None:  # a step this version of ctrmig no longer has
        return
    def w(*a, **kw):
        if before: mark(before)
        try:
            return orig(*a, **kw)
        finally:
            if after: mark(after)
    setattr(obj, attr, w)

wrap(podman.PodmanMigrator, "_describe", "source.describe_start", "source.describe_end")
wrap(podman.PodmanMigrator, "_bundle_ready", "source.checkpoint_answered")
wrap(writer.ArchiveWriter, "copy_tar", "source.headers", "source.repack_end")
wrap(bundle, "write_bundle", "source.bundle_start", "source.bundle_end")
wrap(base, "verify", "target.spool_end", "target.verify_end")
wrap(reader, "extracted", "target.extract_start")
wrap(podman.PodmanMigrator, "_dump", "source.checkpoint_call")
wrap(direct.DirectTarget, "_restore", "target.restore_start", "target.restore_end")
wrap(base, "extracted", "target.extract_start")
wrap(direct.DirectTarget, "_check_archive", "target.extract_end")
wrap(direct.DirectTarget, "_create", "target.create_start", "target.create_end")
wrap(bundle, "place", "target.place_start", "target.place_end")
wrap(podman.PodmanMigrator, "_import", "target.import_start", "target.import_end")
direct_route = sys.argv[6] == "direct"
src = ctrmig.migrator("podman", url=sys.argv[1], direct=direct_route)
dst = ctrmig.migrator("podman", url=sys.argv[2], workdir=sys.argv[5] or None,
                      direct=direct_route)
T0 = time.monotonic()
report = ctrmig.migrate(sys.argv[3], source=src, target=dst, compression=sys.argv[4],
                        insecure=True)
mark("done")
print(json.dumps({"marks": dict(sorted(marks.items(), key=lambda kv: kv[1])),
                  "downtime": report.downtime_s, "bytes": report.bytes_moved}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_podman", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--disk-spool", action="store_true",
                    help="spool on disk (default: podman's TMPDIR and ctrmig's spool in tmpfs)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--api", action="store_true",
                    help="podman's export and import only (no direct route), to B over TCP")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ctrmig-profile-", dir=args.workdir))
    try:
        with TwoHosts(work / "hosts") as hosts:
            bench = PodmanBench(hosts, work, args.compression, not args.disk_spool)
            bench.setup()
            name, _ = bench._start(args.mib)
            try:
                target = hosts.b.podman_tcp if args.api else f"unix://{hosts.b.podman_socket}"
                res = hosts.a.run([sys.executable, "-c", PROFILE_SCRIPT,
                                   f"unix://{hosts.a.podman_socket}", target,
                                   name, args.compression, bench.spool,
                                   "api" if args.api else "direct"], timeout=1800)
                if res.returncode != 0:
                    print(res.stderr.decode(errors="replace"), file=sys.stderr)
                    return 1
                print(proc.tail(res.stderr.decode(errors="replace"), 20), file=sys.stderr)
                out = json.loads(res.stdout.decode().strip().splitlines()[-1])
                print(json.dumps(out, indent=1))
            finally:
                bench._rm(hosts.a, name)
                bench._rm(hosts.b, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
