"""The README's deployment walk-through, run as written, so the text cannot drift from the code.

The commands come from README.md itself: every ```bash block preceded by a
``<!-- deploy: ROLE[, runs until ...] -->`` marker, in order. ROLE ``coordinator`` runs once,
``site`` once per hospital; a block that "runs until" something is started in the background.
Only the strings in ``PLACEHOLDERS`` (paths, host names, the port) and, for the second
hospital, ``SECOND_SITE`` are replaced; each block runs under ``bash -euo pipefail`` with the
installation on PATH, as the README asks, on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hymate.processes import free_port
from tests.deployment import BIN, ONE_FEDERATION_AT_A_TIME, as_a_foreground_job, kill_group, wait_until

# About 3-4 min on two quiet cores; the bounds leave room for a machine shared with other work.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), ONE_FEDERATION_AT_A_TIME]

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(
    r"<!-- deploy: (?P<role>coordinator|site)(?P<background>, runs until [^>]*)? -->\s*```bash\n(?P<script>.*?)```",
    re.S,
)


@dataclass(frozen=True)
class Step:
    role: str
    background: bool
    script: str


def deployment_steps(text: str) -> list[Step]:
    return [Step(m["role"], m["background"] is not None, m["script"]) for m in BLOCK.finditer(text)]


def test_the_readme_walk_through_has_every_step():
    steps = deployment_steps(README.read_text())
    assert [(s.role, s.background) for s in steps] == [
        ("coordinator", False),
        ("site", False),
        ("site", False),
        ("coordinator", True),
        ("site", True),
    ]
    assert "hymate-client init-key" in steps[1].script and "hymate-server init-certs" in steps[0].script


def test_the_readme_deployment_runs_as_written(tmp_path):
    port = free_port()
    placeholders = {
        "/srv/hymate": str(tmp_path),
        "coordinator.example.org": "127.0.0.1",
        "0.0.0.0": "127.0.0.1",
        "9093": str(port),
    }
    sites = [{}, {"hospital-1": "hospital-2", "site-0": "site-1"}]  # the second hospital does the same
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    background: list[subprocess.Popen] = []

    def script(step: Step, site: dict[str, str]) -> str:
        text = step.script
        for old, new in (placeholders | site).items():
            text = text.replace(old, new)
        return text

    def run(step: Step, site: dict[str, str], log_name: str) -> subprocess.Popen | None:
        command = ["bash", "-euo", "pipefail", "-c", script(step, site)]
        if not step.background:
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{log_name} failed:\n{script(step, site)}\n{done.stdout}\n{done.stderr}"
            return None
        with open(tmp_path / log_name, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=as_a_foreground_job,
            )
        background.append(process)
        return process

    def log(name: str) -> str:
        path = tmp_path / name
        return path.read_text(errors="replace") if path.exists() else ""

    server, server_log = None, ""
    try:
        for n, step in enumerate(deployment_steps(README.read_text())):
            if step.role == "coordinator":
                process = run(step, {}, f"step{n}-coordinator.log")
                if process is not None:
                    server, server_log = process, f"step{n}-coordinator.log"
                    wait_until(lambda name=server_log: " started: " in log(name), 150, "the coordinator's run")
            else:
                for i, site in enumerate(sites, start=1):
                    run(step, site, f"step{n}-hospital-{i}.log")
        assert server is not None
        try:
            code = server.wait(600)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hymate-server still running:\n{log(server_log)[-3000:]}") from None
        assert code == 0, log(server_log)[-3000:]
    finally:
        for process in background:
            if process.poll() is None:
                kill_group(process, signal.SIGTERM)
        for pid_file in tmp_path.glob("*/state/supernode.pid"):  # a SuperNode that outlived its hymate-client
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)

    run_dir = tmp_path / "coordinator" / "runs" / "first"
    card = json.loads((run_dir / "model_card.json").read_text())
    assert (run_dir / "model.pt").is_file() and "hospital-1" in json.dumps(card) and "hospital-2" in json.dumps(card)
    for name in ("hospital-1", "hospital-2"):
        sent = [json.loads(line) for line in (tmp_path / name / "state" / "outgoing.jsonl").read_text().splitlines()]
        trained = [line for line in sent if line["type"] == "train"]
        assert [line["round"] for line in trained] == [1] and len(trained[0]["arrays_sha256"]) == 64
