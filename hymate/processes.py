"""Child process groups that never outlive the command that started them.

``hymate-server`` and ``hymate-client`` run Flower's SuperLink and SuperNode as children,
and those start executors of their own. Each child leads a new process group, so stopping
it stops everything it started. If the parent dies (a crash, ``kill -9``) the kernel sends
the child SIGTERM (Linux), and the group id is kept in a pid file, so the next start (for
example ``hymate-server --resume``) ends whatever the crashed incarnation left running
instead of finding its port taken and its ServerApp still writing to the run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _program(args: Sequence[str]) -> str:
    """What identifies ``args``'s program in a command line: the module of ``python -m MODULE``, else its file's name."""
    if len(args) > 2 and args[1] == "-m":
        return args[2]
    return Path(args[0]).name


def _group_runs(pgid: int, program: str) -> bool:
    """Whether a process of group ``pgid`` runs ``program`` (so a recycled id is left alone)."""
    proc = Path("/proc")
    if not proc.exists():
        return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and program in (stat.parent / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def _end_groups(
    pgids: Collection[int],
    timeout: float,
    own: subprocess.Popen | None = None,
    found_later: Callable[[], set[int]] | None = None,
) -> None:
    """SIGTERM to every group at once, SIGKILL to what is left of them after ``timeout`` seconds.

    All at once: a simulation's SuperLink, flwr-simulation and Ray each lead a group, and
    stopping them one after another let each use its whole ``timeout`` (Ctrl-C took over 40 s
    on a loaded machine). ``own``: our own child leading a group, reaped while we wait (a
    zombie still counts as a group member until its parent collects it). ``found_later``:
    groups that appear while we wait (a SuperLink that starts flwr-simulation as it is being
    stopped) are ended with the rest.
    """
    alive = set(pgids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            for pgid in sorted(alive - signalled):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
                signalled.add(pgid)
            if own is not None:
                own.poll()
            if found_later is not None:
                alive |= found_later()
            alive = {pgid for pgid in alive if _group_alive(pgid)}
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not alive:
            return
        if sig == signal.SIGTERM:
            log.warning("process group(s) %s did not stop in %.0f s; killing them", sorted(alive), timeout)


def _child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The parent's environment with this Python's bin folder first on PATH, minus numba's pool size.

    Flower's SuperLink and SuperNode start helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name; when the project runs from a virtual environment that is not
    activated (``.venv/bin/hymate-server``, CI), those names must still resolve to the same venv.
    """
    environment = {**os.environ, **(extra or {})}
    # hymate.ssm sizes numba's thread pool to this process's torch threads through this
    # variable; a child (a Ray actor confined to one CPU, say) must size its own. Inherited,
    # it gave every single-CPU actor an idle numba thread spinning on the other core: after a
    # centralized run in the same hymate-sim, federated rounds ran 3-4x slower.
    environment.pop("NUMBA_NUM_THREADS", None)
    bin_dir = str(Path(sys.executable).parent)
    path = environment.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        environment["PATH"] = os.pathsep.join(filter(None, [bin_dir, path]))
    return environment


def start_child(
    args: Sequence[str], log_path: Path, pid_file: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start ``args`` as a new process group logging to ``log_path``; ends a stale group from ``pid_file`` first."""
    if pid_file.exists():
        try:
            stale = int(pid_file.read_text().strip())
        except ValueError:
            stale = 0
        if stale > 0 and _group_alive(stale) and _group_runs(stale, _program(args)):
            log.warning("ending process group %d left behind by an earlier run (%s)", stale, pid_file)
            _end_groups({stale}, timeout=10.0)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env=_child_environment(env), preexec_fn=_child_setup
        )
    pid_file.write_text(f"{process.pid}\n")
    return process


def run_command(
    args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)``, but the child is reaped however we leave.

    On Ctrl-C, ``subprocess.run`` kills its child and re-raises without waiting for it
    (bpo-25942), so the killed child stays a zombie in our process group until init collects
    it after we exit. A terminal or supervisor that checks the group is empty then sees it:
    an interrupted ``hymate-sim`` whose Ctrl-C landed during a ``flwr list`` left one behind.
    """
    with subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
    return subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr)


def stop_child(process: subprocess.Popen, pid_file: Path, timeout: float = 10.0) -> None:
    """Stop the child's whole process group (SIGTERM, then SIGKILL) and forget its pid file.

    Groups the child's own descendants started are stopped too: Flower's SuperLink starts
    ``flwr-simulation`` (and with it Ray's GCS, dashboard and workers) in a session of its own,
    which outlived an interrupted ``hymate-sim`` by a minute when only the SuperLink's group was ended.
    """

    def groups_below() -> set[int]:  # read while the child lives: once it is gone, its children belong to init
        return _descendant_groups(process.pid) if process.poll() is None else set()

    _end_groups({process.pid} | groups_below(), timeout, own=process, found_later=groups_below)
    process.wait()
    pid_file.unlink(missing_ok=True)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process (empty without /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendant_groups(pid: int) -> set[int]:
    """The process groups of every process below ``pid``."""
    table, below, frontier = _process_table(), set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in table.items() if ppid in frontier and p not in below}
        below |= frontier
    return {table[p][1] for p in below}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
