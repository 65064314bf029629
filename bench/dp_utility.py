"""What differential privacy costs in utility: the same federation with and without DP-SGD.

Takes hymate-sim's flags (``--dp-epsilon`` is required), runs the federated protocol twice
on the same partition, splits and training settings, once with every site private and once
without, and prints pooled and mean per-site test AUROC/AUPRC of both with the DP/non-DP
ratio (issue bar: DP AUROC at least 0.95 of non-DP at epsilon 8, delta 1e-5).

    python bench/dp_utility.py --synthetic-stays 1500 --rounds 20 --local-epochs 2 \
        --dp-epsilon 8 --dp-delta 1e-5 --batch-size 128 --learning-rate 3e-3 --dropout 0
    python bench/dp_utility.py --dataset physionet2012 --data .cache/data/physionet2012 \
        --d-model 32 --max-events 400 --rounds 10 --dp-epsilon 8 --dp-delta 1e-5 ...
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from simulation.cli import build_parser, spec_from_args
from simulation.protocols import Experiment
from simulation.report import results_frame


def federated_scores(spec) -> tuple[dict[str, float], float]:
    """Pooled and mean per-site AUROC/AUPRC of the federated model, and the run's wall time."""
    start = time.perf_counter()
    rows = results_frame(Experiment(spec).run().rows)
    rows = rows[rows["protocol"] == "federated"]
    pooled = rows[rows["test_site"] == "pooled"].groupby("metric")["value"].mean()
    per_site = rows[rows["test_site"] != "pooled"].groupby("metric")["value"].mean()
    scores = {f"pooled {m}": float(pooled[m]) for m in ("auroc", "auprc")}
    scores |= {f"per-site mean {m}": float(per_site[m]) for m in ("auroc", "auprc")}
    return scores, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(tempfile.mkdtemp(prefix="hymate-bench-dp-utility-"))
    spec = spec_from_args(build_parser().parse_args(argv))
    if not spec.privacy:
        print("bench/dp_utility.py: give --dp-epsilon (and --dp-delta): the budget of the DP run", file=sys.stderr)
        return 2
    private = dataclasses.replace(spec, protocols=("federated",), out=root / "dp")
    plain = dataclasses.replace(private, out=root / "plain", privacy=None)
    results = {}
    for label, spec in (("non-DP", plain), ("DP", private)):
        results[label], seconds = federated_scores(spec)
        print(f"{label}: {seconds:.0f} s, {results[label]}", flush=True)
    table = pd.DataFrame(results)
    table["DP / non-DP"] = table["DP"] / table["non-DP"]
    budget = f"epsilon {private.privacy.epsilon:g}, delta {private.privacy.delta:g}"
    print(f"\nfederated, {private.rounds} rounds x {private.local_epochs} local epochs, DP at every site: {budget}")
    print(table.to_string(float_format=lambda x: f"{x:.4f}"))
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
