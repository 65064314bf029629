"""Ctrl-C in hymate-sim: exit 130 with one plain line, and nothing it started keeps running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deployment import ONE_RAY_CLUSTER_AT_A_TIME, as_a_foreground_job

pytestmark = [pytest.mark.slow, ONE_RAY_CLUSTER_AT_A_TIME]

BIN = Path(sys.executable).parent
TINY = ["--synthetic-sites", "2", "--synthetic-stays", "80", "--d-model", "8", "--heads", "2", "--bootstrap", "5"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), fields[19])
    return found


def _descendants(roots: set[int]) -> dict[int, str]:
    """The roots and every process below them, with their start times (to tell a reused pid apart)."""
    table, tree = _processes(), set(roots)
    while True:
        more = {pid for pid, (ppid, _) in table.items() if ppid in tree} - tree
        if not more:
            return {pid: table[pid][1] for pid in tree if pid in table}
        tree |= more


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


@pytest.mark.timeout(260)
def test_ctrl_c_stops_hymate_sim_with_exit_130_and_leaves_no_process(tmp_path):
    out = tmp_path / "sim"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        sim = subprocess.Popen(
            [BIN / "hymate-sim", *TINY, "--rounds", "200", "--out", str(out)],
            start_new_session=True,  # its own group, as a terminal's foreground job would be
            preexec_fn=as_a_foreground_job,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline, started = time.monotonic() + 75, {}
        while time.monotonic() < deadline and sim.poll() is None:
            pid_files = list(out.glob("runs/*/superlink/superlink.pid"))
            superlink = {int(p.read_text().split()[0]) for p in pid_files if p.read_text().strip()}
            started = _descendants({sim.pid} | superlink)
            if superlink and any("raylet" in _cmdline(pid) for pid in started):
                break  # the SuperLink and the Ray cluster under it run
            time.sleep(0.5)
        assert sim.poll() is None, stderr.read_text()[-2000:]
        assert len(started) > 1
        os.killpg(sim.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = sim.wait(timeout=150)  # Ray's shutdown once took over 70 s inside the full suite (31 s alone)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sim.pid, signal.SIGKILL)
    text = stderr.read_text()
    assert code == 130, text[-2000:]
    assert "hymate-sim: interrupted" in text and "Traceback" not in text
    with pytest.raises(ProcessLookupError):
        os.killpg(sim.pid, 0)  # nothing of its group is left
    time.sleep(1.0)
    alive = _processes()
    leftover = [pid for pid, start in started.items() if pid in alive and alive[pid][1] == start]
    assert leftover == [], [_cmdline(pid) for pid in leftover]
