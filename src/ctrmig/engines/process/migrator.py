"""The process engine's adapter: the Migrator hooks, over the tree's facts
(:mod:`.tree`), CRIU's argv (:mod:`.criu`), the restore checks (:mod:`.checks`), the fds
handed to CRIU (:mod:`.inherit`) and the state dir (:mod:`.records`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from ctrmig import settings
from ctrmig.archive import ArchiveWriter, ContainerRecord, Manifest
from ctrmig.archive.layout import CHECKPOINT_DIR, CONFIG_DUMP
from ctrmig.direct import lazy, pages
from ctrmig.engines.base import BaseMigrator, Dump
from ctrmig.engines.process import checks, criu, inherit, records, tree
from ctrmig.engines.process.tree import alive, pid_of
from ctrmig.errors import CheckpointError, CommandError, ContainerNotFoundError, OptionError
from ctrmig.host import criu as host_criu
from ctrmig.host import proc
from ctrmig.host.files import write_private
from ctrmig.protocol import CheckpointOptions, ContainerInfo, RestoreOptions


class ProcessMigrator(pages.SendsPages, BaseMigrator):
    """Checkpoint and restore a plain process tree (named by its root PID) with CRIU."""

    engine = "process"
    checkpoint_options: ClassVar[frozenset[str]] = frozenset({"tcp_established", "file_locks"})
    restore_options: ClassVar[frozenset[str]] = frozenset(
        {"tcp_established", "file_locks", "lazy_pages"})

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        timeout: float = 900.0,
        stdin: inherit.Stdio = None,
        stdout: inherit.Stdio = None,
        stderr: inherit.Stdio = None,
        state_dir: str | os.PathLike[str] | None = None,
    ):
        """``stdin``/``stdout``/``stderr`` (an fd or a file object) replace, on restore,
        stdio that was a pipe, socket or terminal; ``state_dir`` holds kept checkpoints
        and the logs and records of restored processes."""
        super().__init__(workdir=workdir, timeout=timeout)
        self.stdio: dict[int, inherit.Stdio] = {0: stdin, 1: stdout, 2: stderr}
        self.state_dir = Path(state_dir or settings.current().process_state_dir)
        self.state = records.StateDir(self.state_dir)
        self.kept_dir = self.state.kept_dir
        # PID -> start time of a process a checkpoint of ours ended: a later remove(PID)
        # then means that process, not another one now under the same PID (the target of
        # a same-host migration, restored meanwhile by another migrator).
        self._ended: dict[int, int | None] = {}
        # Root PID -> the PIDs of a tree the direct route's dump left stopped (its pages
        # went to the target): resume() continues it, remove() ends it.
        self._held: dict[int, list[int]] = {}

    # --- facts about this host -------------------------------------------------------------

    def version(self) -> str:
        """CRIU's version: the process engine has no engine of its own."""
        return host_criu.version()

    def list(self) -> list[ContainerInfo]:
        """The processes this engine restored here that still run, those it checkpointed
        here whose images it keeps (state "checkpointed"), and those a ctrmig killed
        during their migration left ("stopped", or "running" once: see orphans)."""
        found: dict[int, ContainerInfo] = {}
        for config in self.state.kept_configs():
            with contextlib.suppress(ValueError):
                pid = int(config["pid"])
                found[pid] = ContainerInfo(engine=self.engine, name=str(pid), id=str(pid),
                                           image=str(config["exe"]), state="checkpointed")
        for orphan in self.state.orphans():
            found[orphan.pid] = ContainerInfo(engine=self.engine, name=str(orphan.pid),
                                              id=str(orphan.pid), image="",
                                              state=orphan.state)
        for data in self.state.records():
            pid = int(data["pid"])
            found[pid] = ContainerInfo(engine=self.engine, name=str(pid), id=str(pid),
                                       image=str(data.get("exe", "")), state="running")
        return [found[pid] for pid in sorted(found)]

    def exists(self, container: str) -> bool:
        """Whether a live (not zombie) process has that PID."""
        try:
            return alive(pid_of(container))
        except ContainerNotFoundError:
            return False

    def remove(self, container: str) -> None:
        """Stop a process the caller owns (SIGTERM, then SIGKILL) and drop the checkpoint
        kept of it; no error if it is gone.

        After this migrator's checkpoint ended the process, a different process now under
        that PID (e.g. the one a same-host migration restored) is left alone.
        """
        pid = pid_of(container)
        if pid == 1 or pid == os.getpid():
            raise OptionError(f"refusing to stop PID {pid}", hint="it is init or ctrmig itself")
        if pid in self._held:
            _signal(self._held.pop(pid), signal.SIGKILL)
            self.state.drop_dumps(pid)
        for orphan in self.state.orphans(pid):  # a killed migration's (ctrmig recover)
            _signal(orphan.pids, signal.SIGKILL)
            shutil.rmtree(orphan.path, ignore_errors=True)
        ended = self._ended.pop(pid, -1)
        if alive(pid) and (ended == -1 or proc.start_time(pid) == ended):
            proc.stop_pid(pid)
            self.state.forget(pid)
        self.state.drop_kept(pid)

    def logs(self, container: str) -> str:
        """Output of a process whose stdout/stderr is a file, or that this engine restored
        with its stdio sent to a log file."""
        pid = pid_of(container)
        paths: list[str] = []
        if alive(pid):
            paths = [f.target for f in tree.fds(pid) if f.fd in (1, 2) and f.kind == "file"]
        record = self.state.record(pid)
        if record and record.get("log") and record["log"] not in paths:
            paths.append(record["log"])
        if not paths:
            if not alive(pid):
                raise ContainerNotFoundError(f"no process with PID {pid}")
            raise OptionError(
                f"logs of PID {pid} are not captured: its stdout and stderr are not files",
                hint="run it with output to a file, or read the pipe or terminal it writes to",
            )
        texts = []
        for path in dict.fromkeys(paths):
            with contextlib.suppress(FileNotFoundError):
                texts.append(Path(path).read_text(errors="replace"))
        return "".join(texts)

    # --- checkpoint ------------------------------------------------------------------------

    def _describe(self, container: str) -> ContainerRecord:
        return tree.describe(pid_of(container))

    def _dump(self, record: ContainerRecord, opts: CheckpointOptions) -> Dump:
        """``criu dump`` the tree. Without ``leave_running`` CRIU leaves it stopped: it is
        killed only once the archive is complete (its images then kept for
        :meth:`resume`), and let run on if anything fails before that."""
        pid = pid_of(record.name)
        config = tree.facts(pid, opts)
        dump = self.state.new_dump(pid, config["tree"]["pids"])
        if self.page_sink is not None:  # the direct route (ctrmig.direct)
            return self._direct_dump(pid, config, dump, opts, self.page_sink)
        try:
            criu.dump(pid, dump / CHECKPOINT_DIR, config, leave_running=opts.leave_running,
                      tcp_established=opts.tcp_established, workdir=self.workdir,
                      timeout=self.timeout)
        except BaseException:
            shutil.rmtree(dump, ignore_errors=True)  # CRIU let the tree run on
            raise
        stopped: list[int] = [] if opts.leave_running else config["tree"]["pids"]

        def write(writer: ArchiveWriter) -> dict[str, Any]:
            tree.hash_files(config)  # the tree is stopped (or runs on): sizes as dumped
            write_private(dump / CONFIG_DUMP, json.dumps(config, indent=2))
            writer.add_tree(dump / CHECKPOINT_DIR, CHECKPOINT_DIR)
            writer.add_file(CONFIG_DUMP, dump / CONFIG_DUMP)
            return tree.manifest_extra(config)

        def rollback() -> None:
            """Let the tree CRIU left stopped run on; drop the images."""
            for p in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)
            shutil.rmtree(dump, ignore_errors=True)

        def commit() -> None:
            """End the stopped tree, as a plain ``criu dump`` would, and keep its images
            for resume() (none are kept with leave_running)."""
            if not stopped:
                shutil.rmtree(dump, ignore_errors=True)
                return
            self._ended[pid] = proc.start_time(pid)
            for p in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while any(alive(p) for p in stopped) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.state.keep(dump, pid)

        return Dump(write=write, rollback=rollback, commit=commit)

    # --- the direct route (ctrmig.direct) ----------------------------------------------

    def _direct_dump(self, pid: int, config: dict[str, Any], dump: Path,
                     opts: CheckpointOptions, sink: pages.PageSink) -> Dump:
        """Pre-copy: the tree is left stopped, its memory intact, until the migration ends
        (rollback: it continues; remove(): it ends). Post-copy: the dump serves the pages
        on the sink's port and CRIU ends the tree once the target took the last one."""
        work = dump / "work"
        work.mkdir()
        argv = criu.dump_argv(pid, dump / CHECKPOINT_DIR, work, config,
                              leave_running=False, tcp_established=opts.tcp_established,
                              page_server=sink.port, lazy=sink.lazy)
        what = f"criu dump of PID {pid}"
        sink.mark("freeze")
        serving: subprocess.Popen[bytes] | None = None
        try:
            if sink.lazy:
                serving = lazy.start_dump(argv, what=what, log_file=work / "dump.log")
                sink.serving, sink.images = serving, dump / CHECKPOINT_DIR
            else:
                proc.run(argv, timeout=self.timeout, log_file=work / "dump.log", what=what)
        except BaseException as e:
            shutil.rmtree(dump, ignore_errors=True)  # CRIU let the tree run on
            if isinstance(e, CommandError):
                raise CheckpointError(f"checkpoint of PID {pid} failed: "
                                      f"{criu.error_text(e)}", stderr=e.stderr) from e
            raise
        sink.mark("dumped")
        pids: list[int] = config["tree"]["pids"]

        def write(writer: ArchiveWriter) -> dict[str, Any]:
            tree.hash_files(config)
            (dump / CONFIG_DUMP).write_text(json.dumps(config, indent=2))
            writer.add_tree(dump / CHECKPOINT_DIR, CHECKPOINT_DIR)
            writer.add_file(CONFIG_DUMP, dump / CONFIG_DUMP)
            extra = tree.manifest_extra(config)
            if not sink.lazy:
                extra[pages.PAGE_STREAM] = sink.sent()
            return extra

        def served() -> None:
            """Post-copy: wait for the dump to end (the target took the last page)."""
            try:
                assert serving is not None
                lazy.end_dump(serving, what=what, log_file=work / "dump.log",
                              timeout=self.timeout)
            finally:
                shutil.rmtree(dump, ignore_errors=True)

        def commit() -> None:
            sink.mark("written")
            if serving is not None:  # the pages flow on until the last one: see served
                self._ended[pid] = proc.start_time(pid)
                sink.served = served
                return
            self._held[pid] = pids
            # its images went to the target; its owner.json stays while the tree is held
            # stopped, for a ctrmig recover should this ctrmig be killed (orphans)
            shutil.rmtree(dump / CHECKPOINT_DIR, ignore_errors=True)

        def rollback() -> None:
            if serving is not None:
                proc.kill_group(serving)  # the serving CRIU lets go: the tree runs on
            else:
                _signal(pids, signal.SIGCONT)
            shutil.rmtree(dump, ignore_errors=True)

        return Dump(write=write, rollback=rollback, commit=commit)

    def resume(self, container: str) -> None:
        """Run a checkpointed process again here, from the images its checkpoint kept
        (the rollback of a failed migration)."""
        pid = pid_of(container)
        if pid in self._held:  # stopped by the direct route: its memory is still there
            _signal(self._held.pop(pid), signal.SIGCONT)
            self.state.drop_dumps(pid)
            return
        for orphan in self.state.orphans(pid):
            if orphan.state == "stopped":
                # left stopped by a migration whose ctrmig was killed (ctrmig recover)
                _signal(orphan.pids, signal.SIGCONT)
                shutil.rmtree(orphan.path, ignore_errors=True)
                return
        if not self.state.has_kept(pid):
            raise CheckpointError(f"no checkpoint of PID {pid} is kept here",
                                  hint="restore it from its archive instead")
        with self._lock(str(pid), "restoring"):
            kept = self.state.kept(pid)
            config = records.read_config(kept)
            checks.check_config(config, self.stdio)
            checks.check_pids_free(checks.tree_pids(config))
            self._criu_restore(kept, config, tcp_established=False)

    # --- restore ---------------------------------------------------------------------------

    def _check_archive(self, manifest: Manifest, source: Path, opts: RestoreOptions) -> None:
        super()._check_archive(manifest, source, opts)
        config = records.read_config(source)
        pid = int(config["pid"])
        if opts.name is not None and opts.name != str(pid):
            raise OptionError(
                f"a plain process is restored under its original PID {pid}, not {opts.name!r}",
                hint=f"omit the name, or pass {pid}",
            )
        checks.check_config(config, self.stdio)

    def _check_name_free(self, name: str, source: Path | None = None) -> None:
        """The name is the root PID: it, and every other PID and TID of the archive's
        tree, must be free (CRIU restores a plain process under its original PIDs)."""
        pids = [pid_of(name)]
        if source is not None:
            pids = checks.tree_pids(records.read_config(source))
        checks.check_pids_free(pids)

    def _restore(self, source: Path, manifest: Manifest, opts: RestoreOptions) -> str:
        if opts.page_images:  # the direct route: pages a page server received
            pages.merge(Path(opts.page_images), manifest.extra.get(pages.PAGE_STREAM),
                        source / CHECKPOINT_DIR)
        lazy_pages = None
        if opts.lazy_pages:
            def lazy_pages(work: Path) -> contextlib.AbstractContextManager[None]:
                return lazy.serving(source / CHECKPOINT_DIR, work, self.timeout,
                                    opts.lazy_page_server, opts.on_running)
        return self._criu_restore(source, records.read_config(source), opts.tcp_established,
                                  lazy_pages)

    def _criu_restore(self, source: Path, config: dict[str, Any], tcp_established: bool,
                      lazy_pages: criu.LazyPages | None = None) -> str:
        """``criu restore -d`` from ``source`` (an extracted archive or a kept checkpoint)."""
        pid = int(config["pid"])
        with contextlib.ExitStack() as stack:
            fds, logfile = inherit.inherited_fds(config, self.stdio,
                                                 lambda: self.state.log_file(pid), stack)
            restored = criu.restore(source / CHECKPOINT_DIR, config,
                                    tcp_established=tcp_established, inherit=fds,
                                    workdir=self.workdir, timeout=self.timeout,
                                    lazy_pages=lazy_pages)
        self.state.write_record(restored, config, logfile)
        # It runs again: a checkpoint kept of it here must not run it a second time.
        self.state.drop_kept(pid)
        self._ended.pop(pid, None)
        return str(restored)


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
