"""hymate-sim end to end on Flower's Simulation Engine (Ray), on small synthetic federations."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hymate.processes import free_port
from simulation.cli import main
from tests.deployment import ONE_RAY_CLUSTER_AT_A_TIME

pytestmark = [pytest.mark.slow, ONE_RAY_CLUSTER_AT_A_TIME]

SMALL = ["--synthetic-sites", "3", "--synthetic-stays", "150", "--d-model", "16", "--epochs", "2", "--bootstrap", "20"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(400)
def test_a_short_simulation_writes_results_plots_and_report(tmp_path, capsys):
    out = tmp_path / "sim"
    args = SMALL + [
        "--rounds",
        "2",
        "--protocol",
        "federated,local,centralized",
        "--keep-round",
        "best",
        "--average-rounds",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err

    results = pd.read_csv(out / "results.csv")
    sites = ["site-0", "site-1", "site-2"]
    tests = sites + ["pooled"]
    metrics = {"auroc", "auprc", "brier", "ece"}
    assert set(results["metric"]) == metrics
    assert len(results) == 4 * (len(tests) + len(tests) + len(sites) * len(tests))  # federated + centralized + local
    fed = results[results["protocol"] == "federated"]
    assert (
        set(fed["test_site"]) == set(tests)
        and set(fed["train_sites"]) == {"all"}
        and set(fed["strategy"]) == {"fedavg"}
    )
    local = results[results["protocol"] == "local"]
    assert set(zip(local["train_sites"], local["test_site"], strict=True)) == {(a, b) for a in sites for b in tests}
    auroc = results[results["metric"] == "auroc"]
    assert auroc["value"].between(0, 1).all()
    assert (auroc["ci_low"] <= auroc["value"]).all() and (auroc["value"] <= auroc["ci_high"]).all()
    pooled = results[(results["test_site"] == "pooled") & (results["metric"] == "brier")]
    assert (pooled["n"] == sum(pd.read_csv(out / "sites.csv")["test"])).all()

    curves = pd.read_csv(out / "curves.csv")
    assert sorted(curves["round"].unique()) == [1, 2]
    assert set(sites) <= set(curves["site"])
    for png in ("curves.png", "heatmap_auroc.png", "heatmap_auprc.png", "importance.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, png
    report = (out / "report.md").read_text()
    for section in (
        "Discrimination and calibration",
        "Cross-site generalisation",
        "round by round",
        "What the model looks at",
    ):
        assert section in report
    # The real sites reported validation metrics through Flower, and the coordinator chose by them;
    # it saved the mean of the rounds up to the kept one (round 1 alone: nothing to average).
    kept = [
        re.fullmatch(r"\| federated-seed0 \| (\d) \| 2 \| best validation AUROC \+ AUPRC \| (.*) \|", row)
        for row in report.splitlines()
    ]
    kept = [m for m in kept if m]
    assert len(kept) == 1, report
    assert kept[0].group(2) == ("1, 2" if kept[0].group(1) == "2" else "-"), report
    importance = pd.read_csv(out / "importance.csv")
    assert len(importance) == 14 and importance["importance"].sum() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.timeout(120)
def test_an_output_folder_that_holds_a_simulation_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "report.md").write_text("earlier report")
    assert main(SMALL + ["--out", str(tmp_path)]) == 2
    assert "already holds a simulation" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_an_unreachable_ray_cluster_ends_the_run_with_an_error_at_once(tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    assert main(SMALL + ["--rounds", "1", "--ray-address", address, "--out", str(tmp_path)]) == 2
    assert f"hymate-sim: error: no Ray cluster answers at {address}" in capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "--net", "--fork", "true"], capture_output=True).returncode == 0


@pytest.mark.timeout(400)
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --net` (root) for a loopback-only Ray cluster")
def test_the_same_command_runs_on_an_existing_ray_cluster(tmp_path):
    """A real Ray head started inside private network and PID namespaces (only lo up: Ray binds
    the machine's interface otherwise), used through --ray-address. The namespace's first
    process is the test's own bash: when it exits, the kernel ends every process in the
    namespace, Ray's head included; `ray stop` (which would end every Ray process on the
    machine) is never called."""
    out, ray_tmp = tmp_path / "sim", Path("/tmp") / f"hymate-raytest-{os.getpid()}"
    script = f"""
set -e
ip link set lo up
export RAY_TMPDIR={ray_tmp} RAY_USAGE_STATS_ENABLED=0
{Path(sys.executable).parent}/ray start --head --node-ip-address=127.0.0.1 --port=6380 --num-cpus=2 \\
    --include-dashboard=false --disable-usage-stats > {tmp_path}/ray.log 2>&1
{sys.executable} -m simulation.cli {" ".join(SMALL)} --rounds 1 --protocol fedbn --ray-address 127.0.0.1:6380 --timeout 240 --out {out}
ls {ray_tmp}/ray/session_latest/logs > {tmp_path}/ray_logs.txt
"""
    process = subprocess.Popen(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=360)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert process.returncode == 0, output[-3000:]
    # The simulation's driver connected to this head: its log sits in the head's session.
    assert "python-core-driver" in (tmp_path / "ray_logs.txt").read_text()
    # FedBN (one federation; plain federated is the short simulation's): every site kept its
    # own normalisation layers and was tested with them, at home.
    fedbn = pd.read_csv(out / "results.csv")
    assert set(fedbn["protocol"]) == {"fedbn"}
    sites = ["site-0", "site-1", "site-2"]
    assert set(zip(fedbn["train_sites"], fedbn["test_site"], strict=True)) == {(f"all+{s}", s) for s in sites}
    assert all((out / "runs" / "fedbn-seed0" / "sites" / s / "local-norms.npz").exists() for s in sites)
