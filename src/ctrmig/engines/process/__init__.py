"""The plain-process engine: checkpoint a process tree on this host with CRIU.

A "container" here is a process tree named by the PID of its root. ``checkpoint("1234",
...)`` runs ``criu dump -t 1234`` into a private directory and archives the images
under ``checkpoint/`` plus ``config.dump``, a JSON record of what the process depends on
outside its memory: the executable (path and sha256), argv, cwd, the regular files it
holds open or has mapped (path, size, sha256 when small enough), and how its stdio was
connected.

A process archive always needs ``allow_privileged`` (``--allow-privileged``) to restore:
it runs on the host with the uid and capabilities its CRIU images record, outside any
container (see :mod:`ctrmig.archive.privileges`).

Restore checks those facts before CRIU runs: it refuses a changed executable, a missing
file, a file whose size changed under a saved offset, and PIDs already taken (CRIU
restores a plain process under its original PIDs). Stdio that pointed outside the tree
(a pipe, a socket, a terminal) cannot come back as it was; CRIU is handed new fds for it
(``--inherit-fd``): the ones given to the constructor, else ``/dev/null`` for stdin and
a log file in ``state_dir`` for stdout/stderr; a terminal only by a terminal (the given
one, else ours, else restore refuses). A file opened for writing only that grew (or
shrank) since the checkpoint is handed back opened ``O_APPEND``, so the process goes on
writing at its end instead of over what was added (CRIU itself refuses a size change,
except for files opened ``O_WRONLY|O_APPEND``).

Limits: only the root's stdio is reconnected (a child's own pipe to the outside comes
back dangling); other connections out of the tree (a unix socket to a daemon, TCP
without ``tcp_established``) make CRIU refuse the dump, and its error is quoted. The
process must live in this host's mount and PID namespaces (containers have their
engines).

Without ``leave_running`` CRIU leaves the tree stopped until the archive is complete;
then the tree is killed and the images stay in ``state_dir/checkpoints/PID`` (as podman and
runc keep theirs), so that :meth:`ProcessMigrator.resume` can run it again here if a
migration fails later; ``remove()``, ``resume()`` or a restore of that PID drop them.

``list()`` shows only the processes this engine restored that still run, and the kept
checkpoints: listing every process of the host as a "container" would be noise.

The package: :mod:`.migrator` (the adapter), :mod:`.tree` (the tree's facts, from /proc),
:mod:`.criu` (dump and restore argv), :mod:`.checks` (what restore refuses),
:mod:`.inherit` (the fds CRIU is handed at restore), :mod:`.records` (the state dir).
"""

from ctrmig.engines.process.migrator import ProcessMigrator

__all__ = ["ProcessMigrator"]
