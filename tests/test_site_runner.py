"""A hospital runs only the code it installed: the app bundles its runner accepts and refuses."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tomli_w
from flwr.supercore.fab import Fab

from client.runner import INSTALLED_CLIENTAPP, AppPolicy, AppRefused
from server.superlink import SuperLink, TLSFiles
from tests.deployment import ONE_FEDERATION_AT_A_TIME, Deployment, wait_until

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = (REPO / "pyproject.toml").read_text()


def fab_of(files: dict[str, str]) -> Fab:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, text in files.items():
            bundle.writestr(name, text)
    content = buffer.getvalue()
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


@pytest.fixture(scope="module")
def genuine_fab(tmp_path_factory) -> Fab:
    """The bundle `flwr run` ships for this project, built by Flower itself from a copy."""
    app = tmp_path_factory.mktemp("app")
    for part in ("server", "strategies", "client", "hymate"):
        shutil.copytree(REPO / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", app)
    shutil.copy(REPO / "README.md", app)
    subprocess.run(
        [Path(sys.executable).with_name("flwr"), "build", "--app", str(app)],
        cwd=app,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = app.glob("*.fab")
    content = built.read_bytes()
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def test_the_projects_own_bundle_carries_no_site_code_and_is_accepted(genuine_fab):
    with zipfile.ZipFile(io.BytesIO(genuine_fab.content)) as bundle:
        tops = {name.split("/", 1)[0] for name in bundle.namelist()}
    assert "server" in tops and "strategies" in tops
    assert not tops & {"client", "hymate"}
    AppPolicy().check(genuine_fab)  # no exception: accepted
    AppPolicy(frozenset({genuine_fab.hash_str})).check(genuine_fab)


@pytest.mark.parametrize(
    "files, reason",
    [
        ({"pyproject.toml": PYPROJECT, "client/app.py": "app = None\n"}, r"carries site-side code \(client/app.py\)"),
        (
            {"pyproject.toml": PYPROJECT, "hymate/privacy/dp_sgd.py": "# no noise\n"},
            r"site-side code \(hymate/privacy/dp_sgd.py\)",
        ),
        (
            {"pyproject.toml": PYPROJECT.replace(INSTALLED_CLIENTAPP, "evil.app:app"), "evil/app.py": "app = 1\n"},
            r"names ClientApp 'evil.app:app'; this site runs only client.app:app",
        ),
    ],
)
def test_a_bundle_that_would_replace_site_code_is_refused_with_the_reason(files, reason):
    with pytest.raises(AppRefused, match=reason):
        AppPolicy().check(fab_of(files))


def test_a_site_that_pins_bundle_hashes_refuses_any_other(genuine_fab):
    other = fab_of({"pyproject.toml": PYPROJECT})
    with pytest.raises(AppRefused, match=r"is not among the 1 app hash\(es\) this site accepts"):
        AppPolicy(frozenset({genuine_fab.hash_str})).check(other)


def test_a_corrupt_bundle_is_refused_not_crashed_on():
    content = b"not a zip at all"
    with pytest.raises(AppRefused, match="is not a readable Flower app"):
        AppPolicy().check(Fab(hashlib.sha256(content).hexdigest(), content, {}))


HOSTILE_CLIENTAPP_PREFIX = """
# Prepended by a hostile coordinator: proof that this file ran at a hospital.
from pathlib import Path as _Path
_Path({marker!r}).write_text("coordinator code ran at the site")
"""


@pytest.mark.slow
@ONE_FEDERATION_AT_A_TIME
@pytest.mark.timeout(420)
def test_a_hostile_coordinator_cannot_run_its_clientapp_at_a_site(tmp_path):
    """Real processes, TLS and node authentication: a coordinator ships a modified ClientApp
    through `flwr run`; the site never imports it, refuses the run, and both sides see why."""
    d = Deployment(tmp_path, n_sites=1)
    marker = tmp_path / "PWNED"
    hostile = tmp_path / "hostile-app"
    for part in ("server", "strategies", "client"):
        shutil.copytree(REPO / part, hostile / part, ignore=shutil.ignore_patterns("__pycache__"))
    app_py = hostile / "client" / "app.py"
    app_py.write_text(HOSTILE_CLIENTAPP_PREFIX.format(marker=str(marker)) + app_py.read_text())
    (hostile / "pyproject.toml").write_text(
        PYPROJECT.replace('fab-include = ["server/**/*.py"', 'fab-include = ["client/**/*.py", "server/**/*.py"')
    )
    (hostile / "README.md").write_text("hostile\n")
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(
        tomli_w.dumps(
            {
                "num-server-rounds": 1,
                "min-clients": 1,
                "run-dir": str(tmp_path / "run"),
                "wait-for-clients": 120.0,
                "round-timeout": 90.0,
                "d-model": 16,
            }
        )
    )
    link = SuperLink(
        tmp_path / "superlink",
        "127.0.0.1",
        d.port,
        TLSFiles(d.keys / "ca.crt", d.keys / "server.crt", d.keys / "server.key"),
    )
    try:
        link.start()
        for public_key in sorted((d.keys / "sites").glob("*.pub")):
            link.register(public_key, public_key.stem)
        d.start_client(1)
        run_id = link.run_app(hostile, run_config)
        status = link.wait_for_run(run_id, timeout=300, poll=3.0)
        run_log = link.run_log(run_id)
    finally:
        link.stop()
        d.stop()

    assert not marker.exists(), "the coordinator's ClientApp ran at the site"
    assert status.startswith("finished:failed"), status
    # The coordinator's side: the site's reply names the refusal and its reason.
    assert "site refused the app: the coordinator's app carries site-side code (client/" in run_log, run_log[-3000:]
    # The site's side: its own log says what it refused.
    site_log = d.log("client1.log")
    assert "refused a message of run" in site_log and "this site runs only its installed hymate-fl" in site_log


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@ONE_FEDERATION_AT_A_TIME
@pytest.mark.timeout(180)
def test_a_killed_site_leaves_no_process_behind(tmp_path):
    """SIGKILL to hymate-client (no clean-up code runs): its SuperNode ends too, and no
    per-message process exists that could be left retrying."""
    d = Deployment(tmp_path, n_sites=1)  # no coordinator: the SuperNode keeps trying to connect
    client = d.start_client(1)
    pid_file = d.state_dir(1) / "supernode.pid"
    try:
        wait_until(lambda: pid_file.exists() and _running(int(pid_file.read_text())), 120, "the SuperNode")
        supernode = int(pid_file.read_text())
        time.sleep(2)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(30)
        wait_until(lambda: not _running(supernode), 30, "the SuperNode to end with its hymate-client")
    finally:
        d.stop()
    assert not _running(supernode)
    assert "flwr-clientapp" not in d.log("client1.log")
