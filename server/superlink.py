"""Driving Flower's own CLIs for a coordinator: SuperLink up, sites registered, one run.

Only Flower's stable surface is used: the ``flower-superlink`` and ``flwr`` commands, the
SuperLink's ``/health`` endpoint and ``$FLWR_HOME/config.toml``. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hymate.processes import run_command, start_child, stop_child

log = logging.getLogger(__name__)

CONNECTION = "hymate"


class SuperLinkError(RuntimeError):
    """The SuperLink or a flwr command failed; carries what Flower said."""


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    cert: Path
    key: Path


def _flwr_bin(name: str) -> str:
    """A Flower executable beside this Python (a venv's bin), else from PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SuperLinkError(f"{name} not found: is flwr installed in this environment?")
    return found


class SuperLink:
    """A SuperLink started (and stopped) by us, with its own FLWR_HOME under the run dir."""

    def __init__(
        self,
        state_dir: Path,
        host: str,
        port: int,
        tls: TLSFiles | None,
        simulation: bool = False,
        env: dict | None = None,
    ):
        self.state_dir = Path(state_dir)
        # Listening on every interface (0.0.0.0, the coordinator's default), we still reach our
        # own SuperLink over loopback, which the server certificate always covers.
        self.address = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        self.host, self.port, self.tls = host, port, tls
        self.simulation = simulation  # run ServerApp and ClientApps on Flower's Simulation Engine (Ray)
        self.extra_env = env or {}
        self.flwr_home = self.state_dir / "flwr"
        self.pid_file = self.state_dir / "superlink.pid"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0", **self.extra_env}

    def write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        lines.append(f'root-certificates = "{self.tls.ca_cert.resolve()}"' if self.tls else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        self.write_connection()
        args = [
            _flwr_bin("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            # Offline sites and coordinators: never install an app's dependencies at run time.
            "--disable-runtime-dependency-installation",
        ]
        if self.simulation:
            args += ["--simulation"]
        if self.tls:
            args += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.cert),
                "--ssl-keyfile",
                str(self.tls.key),
                "--enable-supernode-auth",
            ]
        else:
            args += ["--insecure"]
        self.process = start_child(args, self.state_dir / "superlink.log", self.pid_file, self.env)
        self._wait_healthy(timeout)
        log.info("SuperLink up at %s (pid %d, TLS %s)", self.address, self.process.pid, "on" if self.tls else "OFF")

    def _wait_healthy(self, timeout: float) -> None:
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert)) if self.tls else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SuperLinkError(
                    f"SuperLink exited with code {self.process.returncode}; see {self.state_dir / 'superlink.log'}"
                )
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
                pass
            time.sleep(0.5)
        raise SuperLinkError(
            f"SuperLink at {self.address} not healthy within {timeout:.0f} s; see {self.state_dir / 'superlink.log'}"
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process, self.pid_file)
            self.process = None

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run ``flwr ARGS --format json`` against this SuperLink; its JSON answer, or SuperLinkError."""
        command = [_flwr_bin("flwr"), *args, "--format", "json"]
        try:
            done = run_command(command, timeout, env={**os.environ, **self.env})
        except subprocess.TimeoutExpired as e:
            raise SuperLinkError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from e
        try:
            answer = json.loads(done.stdout[done.stdout.find("{") :])
        except json.JSONDecodeError:
            raise SuperLinkError(
                f"`flwr {' '.join(args)}` failed: {done.stdout.strip()} {done.stderr.strip()}"
            ) from None
        if not answer.get("success", False):
            raise SuperLinkError(f"`flwr {' '.join(args)}` failed: {answer.get('error-message', answer)}")
        return answer

    def register(self, public_key: Path, name: str) -> None:
        try:
            self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)
            log.info("registered site %s (%s)", name, public_key)
        except SuperLinkError as e:
            if "already" not in str(e).lower():
                raise
            log.info("site %s was already registered", name)

    def run_app(self, app_dir: Path, run_config: Path, federation_config: str | None = None) -> str:
        args = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config)]
        if federation_config:
            args += ["--federation-config", federation_config]
        return str(self.flwr(*args)["run-id"])

    def wait_for_run(
        self,
        run_id: str,
        timeout: float,
        poll: float = 10.0,
        on_poll: Callable[[], None] | None = None,
        finished_hint: Callable[[], bool] | None = None,
    ) -> str:
        """The run's final status (``finished:completed``, ``finished:failed: <details>``, ...).

        Each ``flwr list`` is a new Python process (about one CPU-second), so Flower is asked
        only every ``poll`` seconds, or as soon as the cheap ``finished_hint`` (for example the
        model card appearing) says the run is probably over.
        """
        deadline = time.monotonic() + timeout
        next_ask = time.monotonic()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SuperLinkError(f"SuperLink exited with code {self.process.returncode} during run {run_id}")
            if on_poll is not None:
                on_poll()
            if time.monotonic() >= next_ask or (finished_hint is not None and finished_hint()):
                runs = self.flwr("list", CONNECTION, "--run-id", run_id).get("runs", [])
                status = runs[0]["status"] if runs else "unknown"
                if status == "finished:completed":
                    return status
                if status.startswith("finished"):
                    return f"{status}: {runs[0].get('status-details', '')}"
                next_ask = time.monotonic() + poll
            time.sleep(0.5)
        raise SuperLinkError(f"run {run_id} did not finish within {timeout:.0f} s")

    def run_log(self, run_id: str) -> str:
        done = run_command([_flwr_bin("flwr"), "log", run_id, CONNECTION, "--show"], 60, env={**os.environ, **self.env})
        return done.stdout + done.stderr
