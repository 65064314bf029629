"""client.supernode_launcher: the installed flower-supernode, polling every 0.25 s instead of every 3 s."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

from flwr.supernode import start_client_internal

from client import supernode_launcher


def test_flwrs_supernode_still_waits_3_s_between_empty_pulls():
    # The reason the launcher exists; when a new flwr drops this wait, drop the launcher too.
    assert "time.sleep(3)" in inspect.getsource(start_client_internal.start_client_internal)


def test_the_launcher_caps_the_supernode_loops_waits_and_nothing_else(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    supernode_launcher.shorten_idle_poll()
    patched = start_client_internal.time
    started = time.monotonic()
    patched.sleep(3)
    assert time.monotonic() - started < 1.0
    assert patched.monotonic is time.monotonic and patched.time is time.time
    assert time.sleep is not patched.sleep  # the process's own time module is untouched


def test_the_launcher_is_flower_supernode_with_the_same_arguments():
    done = subprocess.run(
        [sys.executable, "-m", "client.supernode_launcher", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage: flower-supernode" in done.stdout and "--superlink" in done.stdout
