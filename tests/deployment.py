"""Real federations on loopback for tests: hymate-server and hymate-client as processes.

Every process runs in its own process group and is ended by group at teardown; every wait
has a deadline. Ports are free ones on 127.0.0.1, so tests never reach another machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.site_keys import write_site_key_pair
from hymate.processes import free_port
from server.certs import create_federation_keys

BIN = Path(sys.executable).parent

# scripts/test.sh runs the suite in two pytest-xdist workers (--dist loadgroup). The tests that
# start a federation of real processes, or a Ray cluster, run one at a time within their group:
# their time-outs are sized for one such test on two cores, and the unit tests fill the other
# core. A federation and a Ray simulation may overlap (free ports; each Ray has its own tmpdir).
ONE_FEDERATION_AT_A_TIME = pytest.mark.xdist_group("federation")
ONE_RAY_CLUSTER_AT_A_TIME = pytest.mark.xdist_group("ray")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def as_a_foreground_job() -> None:
    """``preexec_fn``: SIGINT at its default, as in a terminal's foreground job or a service.

    A job started in the background of a non-interactive shell (a CI runner, ``nohup ... &``)
    inherits SIGINT ignored, and Python then keeps ignoring it. Tests that start real processes
    restore it, so that what a SIGINT does there (Ctrl-C, or a library signalling its own process)
    is what it does at a hospital, whichever way the suite was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Deployment:
    """A coordinator and its sites under ``root``, keyed the production way.

    ``hymate-server init-certs`` writes only the CA and the server certificate; each site
    ``hospital-i`` makes its own key pair with ``hymate-client init-key <root>/site{i}-key --name
    hospital-i``, and only its ``.pub`` is copied into ``keys/sites/`` for the coordinator to register.
    """

    root: Path
    n_sites: int = 3
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The same functions `hymate-server init-certs` and `hymate-client init-key` call, in-process:
        # each CLI start imports torch (~10 s per key on two busy cores). The README deployment
        # test runs the commands themselves.
        self.keys = self.root / "keys"
        create_federation_keys(self.keys, [], ["127.0.0.1", "localhost"])
        (self.keys / "sites").mkdir()
        for i in range(1, self.n_sites + 1):
            private = write_site_key_pair(self.key_dir(i), self.site_name(i))
            shutil.copy(private.with_name(f"{self.site_name(i)}.pub"), self.keys / "sites")
        self.run_dir = self.root / "run"

    @staticmethod
    def site_name(i: int) -> str:
        return f"hospital-{i}"

    def key_dir(self, i: int) -> Path:
        return self.root / f"site{i}-key"

    def site_key(self, i: int) -> Path:
        """Site ``i``'s private key, made at the site; the coordinator has only its .pub."""
        return self.key_dir(i) / self.site_name(i)

    def _start(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.root / log_name, "ab") as log:
            process = subprocess.Popen(
                [str(a) for a in args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=as_a_foreground_job,
                # OMP_WAIT_POLICY=PASSIVE comes with os.environ (tests/conftest.py).
                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})},
            )
        self.processes.append(process)
        return process

    def start_server(self, *extra: str, resume: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
        args = [
            BIN / "hymate-server",
            "--run-dir",
            self.run_dir,
            "--address",
            f"127.0.0.1:{self.port}",
            "--ssl-ca-certfile",
            self.keys / "ca.crt",
            "--ssl-certfile",
            self.keys / "server.crt",
            "--ssl-keyfile",
            self.keys / "server.key",
            "--site-keys",
            self.keys / "sites",
            "--d-model",
            "16",
            "--round-timeout",
            "90",
            "--wait-for-clients",
            "120",
            "--timeout",
            "600",
            "-v",
            *extra,
        ]
        return self._start(args + (["--resume"] if resume else []), "server.log", env)

    def start_client(self, i: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Site ``i`` (1-based) holds the synthetic data's site-(i-1)."""
        args = [
            BIN / "hymate-client",
            "--server",
            f"127.0.0.1:{self.port}",
            "--dataset",
            "synthetic",
            "--site",
            f"site-{i - 1}",
            "--name",
            self.site_name(i),
            "--state-dir",
            self.state_dir(i),
            "--root-cert",
            self.keys / "ca.crt",
            "--auth-key",
            self.site_key(i),
            "-v",
            *extra,
        ]
        return self._start(args, f"client{i}.log", env)

    def state_dir(self, i: int) -> Path:
        return self.root / f"site{i}"

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnosis(self, chars: int = 2000) -> str:
        """The end of the server's log and of each site's, without the per-request noise: what a
        failed assertion shows, so that a failure on CI can be read without its machine."""
        parts = []
        for name in ["server.log", *(f"client{i}.log" for i in range(1, self.n_sites + 1))]:
            lines = [line for line in self.log(name).splitlines() if "HTTP Request" not in line]
            parts.append(f"--- {name} ---\n" + "\n".join(lines)[-chars:])
        return "\n".join(parts)

    def rounds_done(self) -> list[int]:
        if not self.run_dir.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.run_dir.glob("round-[0-9]*") if p.is_dir())

    def wait_server(self, server: subprocess.Popen, timeout: float) -> int:
        try:
            return server.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"hymate-server still running after {timeout:.0f} s\n--- server log ---\n{self.log('server.log')[-3000:]}"
            ) from None

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                kill_group(process, signal.SIGTERM)
