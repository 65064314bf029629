"""A site the coordinator does not know stops quickly, with the reason and a documented exit code.

Real processes on 127.0.0.1: hymate-server with TLS and SuperNode authentication (the sites
hospital-1..2 registered), and a hymate-client whose key the coordinator never registered.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from client.supernode_errors import EXIT_REFUSED
from tests.deployment import BIN, Deployment, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_an_unregistered_key_is_refused_with_the_plain_reason_and_exit_code_3(tmp_path):
    d = Deployment(tmp_path, n_sites=2)
    try:
        d.start_server("--rounds", "1", "--min-clients", "2")
        wait_until(lambda: "registered site hospital-2" in d.log("server.log"), 120, "the SuperLink to register sites")
        subprocess.run(
            [BIN / "hymate-client", "init-key", tmp_path / "stranger-key", "--name", "stranger"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        started = time.monotonic()
        # --max-restarts 0: a refusal is permanent, so no restart could help; this also bounds the test
        # whatever the restart policy is.
        client = d._start(
            [
                BIN / "hymate-client",
                "--server",
                f"127.0.0.1:{d.port}",
                "--dataset",
                "synthetic",
                "--site",
                "site-0",
                "--name",
                "hospital-1",
                "--state-dir",
                tmp_path / "stranger",
                "--root-cert",
                d.keys / "ca.crt",
                "--auth-key",
                tmp_path / "stranger-key" / "stranger",
                "--max-restarts",
                "0",
            ],
            "stranger.log",
        )
        code = client.wait(90)
        elapsed = time.monotonic() - started
        log = d.log("stranger.log")
        assert code == EXIT_REFUSED, log
        assert "hymate-client: error: this site's key is not registered with the coordinator" in log
        assert elapsed < 60, f"took {elapsed:.0f} s"
    finally:
        d.stop()
