"""Where does a runc direct migration spend its time? One migration, its steps timed.

    .venv/bin/python -m bench.profile_runc [--mib 1024] [--route direct|archive|postcopy]

Runs one ``ctrmig.migrate`` between two runc "hosts" (as bench.migrate_bench does: two
state directories in a tmpfs on this machine) with timers wrapped around the steps: every
command ctrmig runs (runc pause/checkpoint/restore, criu), the page relays (first and
last byte, bytes), the archive's extraction and check, the page merge, and the restore.
The output is a timeline in seconds from the start of the migration (source and target
run concurrently), then the report's phases and memhog's own longest stall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from bench import migrate_bench, workload

T0 = [0.0]
#: Post-copy: CRIU's logs (-v4, timestamped) are copied here: the source's dump.log and
#: the target's restore.log and lazy-pages.log, each as ctrmig-profile-NAME.
KEPT_LOGS = Path(tempfile.gettempdir())
MARKS: list[tuple[float, str]] = []
_LOCK = threading.Lock()


def mark(what: str) -> None:
    with _LOCK:
        MARKS.append((time.monotonic() - T0[0], what))


def wrap(obj: Any, attr: str, label: Callable[..., str] | str) -> None:
    orig = getattr(obj, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        what = label(*args, **kwargs) if callable(label) else label
        mark(f"{what} start")
        try:
            return orig(*args, **kwargs)
        finally:
            mark(f"{what} end")

    setattr(obj, attr, timed)


def _argv_label(argv: Any, *args: Any, **kwargs: Any) -> str:
    words = [str(a) for a in argv]
    tool = Path(words[0]).name
    verbs = [w for w in words[1:] if not w.startswith("-") and "/" not in w][:1]
    return "run " + " ".join([tool, *verbs])


def instrument() -> None:
    from ctrmig.archive import spool
    from ctrmig.direct import lazy, pages, relay
    from ctrmig.engines import base
    from ctrmig.engines.runc import migrator
    from ctrmig.host import proc

    wrap(proc, "run", _argv_label)
    wrap(proc, "spawn", lambda argv, *a, **k: "spawn " + _argv_label(argv)[4:])
    wrap(pages, "merge", "pages.merge (check + move)")
    wrap(pages.Receiver, "finish", "receiver.finish")
    wrap(migrator.RuncMigrator, "_restore", "runc._restore")
    wrap(migrator.RuncMigrator, "_write_members", "runc._write_members")
    wrap(base.BaseMigrator, "restore", "target.restore")
    wrap(base.BaseMigrator, "checkpoint", "source.checkpoint")
    wrap(base.BaseMigrator, "_check_archive", "target._check_archive")
    wrap(spool, "spooled", "target.spooled")
    orig_copy = relay.Relay._copy

    def copy(self: relay.Relay, src: Any, dst: Any, tally: relay.Tally, hashed: bool) -> None:
        name = threading.current_thread().name
        mark(f"{name} start")
        cpu = time.thread_time()
        try:
            orig_copy(self, src, dst, tally, hashed)
        finally:
            first = f"{tally.stamps[0] - T0[0]:.3f}" if tally.stamps else "-"
            mark(f"{name} end ({tally.bytes >> 20} MiB, first byte {first}, "
                 f"thread cpu {time.thread_time() - cpu:.2f} s)")

    relay.Relay._copy = copy  # type: ignore[method-assign]
    finish = lazy._finish

    def keep_logs(daemon: Any, work: Path, *args: Any) -> None:
        try:
            finish(daemon, work, *args)
        finally:
            for log in (lazy.LAZY_LOG, "restore.log"):
                keep(work / log)

    lazy._finish = keep_logs  # type: ignore[assignment]
    end_dump = lazy.end_dump

    def keep_dump_log(child: Any, *, log_file: Path, **kwargs: Any) -> None:
        try:
            end_dump(child, log_file=log_file, **kwargs)
        finally:
            keep(log_file)

    lazy.end_dump = keep_dump_log  # type: ignore[assignment]


def keep(log: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copy(log, KEPT_LOGS / f"ctrmig-profile-{log.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_runc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--route", default="direct", choices=("direct", "archive", "postcopy"))
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--criu-log-level", type=int, default=None, metavar="N",
                    help="the log level of the CRIU calls ctrmig makes (2; 4 logs every "
                         "lazy fault, and slows them: memhog's stall at 1 GiB 0.99 s "
                         "against 0.58 s)")
    args = ap.parse_args(argv)
    import ctrmig
    from ctrmig.host import criu

    if args.criu_log_level is not None:
        criu.LOG_LEVEL = args.criu_log_level
    instrument()
    work = Path(tempfile.mkdtemp(prefix="ctrmig-profile-", dir=args.workdir))
    bench = migrate_bench.RuncBench(work)
    try:
        bench.setup()
        name, before = bench._start(args.mib)
        # As in a bench run after its first migration: B has the image unpacked.
        bench.b.images.get(workload.IMAGE)
        lazy = args.route == "postcopy"
        try:
            T0[0] = time.monotonic()
            cpu = time.process_time()
            rep = ctrmig.migrate(name, source=cast(ctrmig.Migrator, bench.a),
                                 target=cast(ctrmig.Migrator, bench.b),
                                 route="archive" if args.route == "archive" else "direct",
                                 restore_options={"lazy_pages": True} if lazy else None)
            mark("migrate returned")
            cpu = time.process_time() - cpu
            ok, stall = migrate_bench.check_after(lambda: bench.b.logs(name), before)
            rounds = [(int(r), int(g)) for r, _, _, g in
                      workload._OK.findall(bench.b.logs(name)) if int(r) > before.last_round]
            print("memhog rounds after the freeze (round, gap ms):", rounds[:12])
        finally:
            with contextlib.suppress(Exception):
                bench.a.remove(name)
            with contextlib.suppress(Exception):
                bench.b.remove(name)
        for t, what in MARKS:
            print(f"{t:8.3f}  {what}")
        print(json.dumps({"downtime": round(rep.downtime_s, 3), "freeze": round(rep.freeze_s, 3),
                          "dump": round(rep.dump_s, 3), "transfer": round(rep.transfer_s, 3),
                          "restore": round(rep.restore_s, 3),
                          "ctrmig_process_cpu": round(cpu, 2),
                          "memhog_stall": stall, "memory_ok": ok}))
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
