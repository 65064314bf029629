"""hymate.processes.run_command: a child interrupted by Ctrl-C is gone, not a zombie in our group."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from hymate.processes import run_command


def _interrupt(*_):
    raise KeyboardInterrupt


def test_ctrl_c_during_a_command_leaves_no_zombie(tmp_path):
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)  # Ctrl-C arrives while the command runs
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run_command([sys.executable, "-c", child], timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    assert not (Path("/proc") / str(pid)).exists(), (Path("/proc") / str(pid) / "status").read_text()[:200]


def test_a_command_returns_its_output_and_code():
    done = run_command(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 30
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
