"""Simulation overhead and scale, measured in one run.

1. Overhead: a federated simulation of 4 synthetic hospitals; per round, the round's wall
   time over the summed compute time its clients reported (training + evaluation). Below 1
   means clients ran in parallel; the goal is at most 1.2.
2. Scale: 200 virtual hospitals (synthetic, small model): wall time and peak memory.

Peak memory is the machine's memory in use (MemTotal - MemAvailable, /proc/meminfo, sampled
every 0.5 s) above what was in use when the run started: Ray, the SuperLink and the actors
are separate processes, so one process's RSS would miss most of it. Run it on an otherwise
idle machine.

    python bench/sim.py [--rounds 3] [--scale-sites 200]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from hymate.model import ModelOptions
from hymate.train import TrainConfig
from server.run_dir import RunDirectory
from simulation.engine import EngineSettings
from simulation.partitioners import PartitionScheme
from simulation.protocols import Experiment, SimulationSpec


def memory_in_use_mb() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = lambda key: float(info[key].split()[0])  # noqa: E731
    return (kb("MemTotal") - kb("MemAvailable")) / 1024


class PeakMemory:
    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = memory_in_use_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, memory_in_use_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def above_baseline_mb(self) -> float:
        return self.peak - self.baseline


def run(out: Path, sites: int, stays: int, rounds: int, d_model: int) -> tuple[Experiment, float, PeakMemory]:
    spec = SimulationSpec(
        out=out,
        dataset_options={"n_sites": sites, "stays_per_site": stays},
        partition=PartitionScheme("natural"),
        min_site_size=10,
        rounds=rounds,
        model=ModelOptions(d_model=d_model, n_heads=2),
        train=TrainConfig(),
        engine=EngineSettings(timeout=3600),
        bootstrap=20,
    )
    start = time.perf_counter()
    with PeakMemory() as memory:
        experiment = Experiment(spec)
        experiment.run()
    return experiment, time.perf_counter() - start, memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale-sites", type=int, default=200)
    p.add_argument("--scale-stays", type=int, default=40)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hymate-bench-sim-"))

    experiment, wall, memory = run(root / "overhead", sites=4, stays=500, rounds=args.rounds, d_model=32)
    run_dir = next(iter(experiment.result.federated_runs.values()))
    print("overhead: 4 sites x 500 stays, d_model 32")
    print(f"{'round':>6}{'wall s':>9}{'client compute s':>18}{'ratio':>8}")
    for m in RunDirectory(run_dir).history():
        compute = sum(v["seconds"] for phase in ("train", "evaluate") for v in m["sites"][phase].values())
        print(f"{m['round']:>6}{m['seconds']:>9.1f}{compute:>18.1f}{m['seconds'] / compute:>8.2f}")
    print(f"whole run {wall:.0f} s, peak memory {memory.above_baseline_mb:.0f} MB above baseline")

    experiment, wall, memory = run(root / "scale", sites=args.scale_sites, stays=args.scale_stays, rounds=1, d_model=16)
    print(
        f"scale: {len(experiment.sites)} sites x {args.scale_stays} stays, 1 round, d_model 16: "
        f"{wall:.0f} s, peak memory {memory.above_baseline_mb:.0f} MB above baseline"
    )


if __name__ == "__main__":
    main()
