"""A SuperNode that restarts under a task costs that task, never the site.

After a restart the SuperNode answers the old task's token with 401. Flower's stock retry
invoker answers a 401 by sending SIGINT to its own process, which in ``hymate-client`` ended the
whole site mid-federation (the CI failure of the coordinator-crash deployment test). These run
the site's runner against a loopback stand-in for such a SuperNode, in this process, and watch
for the signal.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flwr.clientapp import ClientApp

from client.runner import SiteRunner
from hymate.processes import free_port


class _ForgotEveryToken(BaseHTTPRequestHandler):
    """Every Runtime API call gets what a freshly restarted SuperNode gives a stale token."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"code": 1008, "message": "Runtime task-token authentication failed."}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_) -> None:
        pass


@pytest.fixture
def restarted_supernode() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ForgotEveryToken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def sigints() -> Iterator[list[int]]:
    """The SIGINTs this process receives while the test runs (none may arrive)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: received.append(signum))
    yield received
    signal.signal(signal.SIGINT, previous)


def _runner(address: str, patience: float = 60.0) -> SiteRunner:
    return SiteRunner(address, b"secret", ClientApp(), task_patience_s=patience)


def test_a_stale_task_is_let_go_without_signalling_the_site(restarted_supernode, sigints, caplog):
    runner = _runner(restarted_supernode)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hymate-client.runner"):
        runner.run_task("token-of-the-supernode-before-its-restart")
    assert sigints == [], "the runner signalled hymate-client"
    assert time.monotonic() - started < 10, "a 401 was retried instead of giving the task up"
    assert runner.tasks_run == 1
    assert "let go of a task its SuperNode no longer serves" in caplog.text and "401" in caplog.text


def test_waiting_for_tasks_at_a_supernode_that_refuses_keeps_the_site_up(restarted_supernode, sigints):
    runner = _runner(restarted_supernode)
    runner.start()
    time.sleep(2.5)  # several acquire attempts, each answered 401
    runner.stop()
    assert sigints == [] and runner.tasks_run == 0


def test_a_task_whose_supernode_is_gone_is_let_go_after_the_patience(sigints, caplog):
    runner = _runner(f"127.0.0.1:{free_port()}", patience=2.0)  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hymate-client.runner"):
        runner.run_task("token")
    elapsed = time.monotonic() - started
    assert sigints == []
    # The pull and the failure report each wait out the patience, then the task is let go.
    assert 2.0 <= elapsed < 15, elapsed
    assert "let go of a task its SuperNode no longer serves" in caplog.text
