"""What secure aggregation costs: a deployed round with and without Flower's SecAgg+.

Runs the same federation twice on 127.0.0.1 (hymate-server and N hymate-client processes, TLS
and node authentication, synthetic sites, the same model and seed): once plain, once with
``--secure-aggregation`` (and every site's own ``--secure-aggregation``). Reports each round's
wall time, the median over rounds 2..R (round 1 carries one-off start-up), their ratio, and the
peak RSS of the coordinator's and each site's whole process tree.

    .venv/bin/python bench/secagg_round.py --sites 4 --rounds 4 [--d-model 16]

Run it on a quiet machine: every process here shares the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deployment_round import federation  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--d-model", type=int, default=16, help="model width (the update SecAgg+ masks grows with it)")
    args = p.parse_args()
    print(f"{args.sites} sites, {args.rounds} rounds, d_model {args.d_model}; load average {os.getloadavg()}")
    flags = {"plain": (), "secure": ("--secure-aggregation",)}
    runs = {name: federation(args.sites, args.rounds, args.d_model, *f) for name, f in flags.items()}
    seconds = {name: [m["seconds"] for m in run.rounds] for name, run in runs.items()}
    print("round  plain s  secure s")
    for r in range(args.rounds):
        print(f"{r + 1:5d}  {seconds['plain'][r]:7.1f}  {seconds['secure'][r]:8.1f}")
    medians = {name: statistics.median(s[1:] or s) for name, s in seconds.items()}
    print(
        f"median round over rounds 2-{args.rounds}: plain {medians['plain']:.1f} s, secure {medians['secure']:.1f} s, "
        f"ratio {medians['secure'] / medians['plain']:.2f}"
    )
    for name, run in runs.items():
        peaks = ", ".join(f"{role} {mb:.0f} MB" for role, mb in run.peaks.items())
        print(f"{name}: {run.total_seconds:.0f} s start to finish; peak RSS (process trees): {peaks}")
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
