"""What a deployed round costs beyond the sites' own work, and the memory each role holds.

Starts a real federation on 127.0.0.1 (hymate-server and N hymate-client processes, TLS and
node authentication, synthetic sites) and reports, per round, the round's wall time over the
slowest site's local work (its train plus evaluate handler seconds, as the site measured
them), with the peak RSS of the coordinator's and each site's whole process tree.

    .venv/bin/python bench/deployment_round.py --sites 3 --rounds 4 [--d-model 64]

The ratio shows the fixed cost per round (about 2 s: polling at each hop, transfers,
checkpoints); at a toy width such as 16 that cost dominates. Round 1 includes one-off start-up
(imports, numba's compiled kernels, the data); the median over the later rounds is the steady
state. Run it on a quiet machine: every process here shares the same cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.run_dir import RunDirectory  # noqa: E402
from tests.deployment import Deployment, wait_until  # noqa: E402


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            children.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1e6


class PeakMemory(threading.Thread):
    """Samples the RSS of several process trees twice a second and keeps each one's peak."""

    def __init__(self, roots: dict[str, int]):
        super().__init__(daemon=True)
        self.roots, self.peaks, self.done = roots, dict.fromkeys(roots, 0.0), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, pid in self.roots.items():
                self.peaks[name] = max(self.peaks[name], tree_rss_mb(pid))


@dataclass
class FederationRun:
    rounds: list[dict]  # each round's metrics as the coordinator wrote them (server.run_dir)
    total_seconds: float
    peaks: dict[str, float]  # peak RSS (MB) of each role's whole process tree


def federation(sites: int, rounds: int, d_model: int, *flags: str) -> FederationRun:
    """A real federation on 127.0.0.1: hymate-server and ``sites`` hymate-clients, each given ``flags``."""
    with tempfile.TemporaryDirectory(prefix="hymate-bench-") as tmp:
        d = Deployment(Path(tmp), n_sites=sites)
        started = time.monotonic()
        server = d.start_server("--rounds", str(rounds), "--min-clients", str(sites), "--d-model", str(d_model), *flags)
        wait_until(lambda: f"registered site {d.site_name(sites)}" in d.log("server.log"), 120, "the sites' keys")
        clients = {f"site {i}": d.start_client(i, *flags).pid for i in range(1, sites + 1)}
        memory = PeakMemory({"coordinator": server.pid, **clients})
        memory.start()
        try:
            code = d.wait_server(server, 1800)
        finally:
            memory.done.set()
            d.stop()
        if code != 0:
            raise RuntimeError(d.log("server.log")[-3000:])
        run = RunDirectory(d.run_dir)
        metrics = [run.read_round(r).metrics for r in range(1, rounds + 1)]
        return FederationRun(metrics, time.monotonic() - started, dict(memory.peaks))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--d-model",
        type=int,
        default=64,
        help="model width: 64 is the default model (the sites' local work grows with it)",
    )
    args = p.parse_args()
    run = federation(args.sites, args.rounds, args.d_model)
    print(f"{args.sites} sites, {args.rounds} rounds, {run.total_seconds:.0f} s from start to finish")
    print("round  wall s  slowest site's train+evaluate s  ratio")
    ratios = []
    for r, m in enumerate(run.rounds, start=1):
        local = max(
            m["sites"]["train"][s]["seconds"] + m["sites"]["evaluate"].get(s, {}).get("seconds", 0.0)
            for s in m["sites"]["train"]
        )
        ratios.append(m["seconds"] / local)
        print(f"{r:5d}  {m['seconds']:6.1f}  {local:32.1f}  {ratios[-1]:5.2f}")
    steady = ratios[1:] or ratios
    print(f"median ratio over rounds 2-{args.rounds}: {statistics.median(steady):.2f}")
    for name, peak in run.peaks.items():
        print(f"peak RSS {name}: {peak:.0f} MB (whole process tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
