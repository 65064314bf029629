"""Pair two models' saved test predictions over seeds: what one change did, with intervals.

A DP run draws its noise and sampling from the OS, so no two DP runs are the same even on one
seed, and a lever's effect has to be read over several runs, often made by separate bench
invocations (other seeds, later days). ``bench/dp_utility.py --predictions DIR`` keeps each
row's pooled test predictions as ``DIR/<row>_seed<N>.npz``; this script pairs two sets of such
files by seed (they must score the same stays in the same order) and prints, per seed, both
models' AUROC/AUPRC, A over B, and A − B with a paired bootstrap 95 % interval; then over the
common seeds the mean ± sd of each, a 95 % t interval over the seeds (the seed-to-seed and, for
DP, the noise-to-noise variation), and the paired bootstrap of the seed-averaged difference (the
test stays' sampling noise).

    python bench/pair_predictions.py 'runs/dp/summary/DP_seed*.npz' 'runs/dp/base/DP_seed*.npz'
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hymate.metrics import METRICS, paired_bootstrap_difference  # noqa: E402
from simulation.evaluation import Predictions  # noqa: E402

SEED_IN_NAME = re.compile(r"seed(\d+)")


def save_predictions(folder: Path, row: str, seed: int, predictions: Predictions) -> Path:
    """Write one run's pooled test predictions where ``load_by_seed`` finds them."""
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9.]+", "_", f"{row} seed{seed}").strip("_")
    path = folder / f"{name}.npz"
    np.savez(path, labels=predictions.labels, probs=predictions.probs)
    return path


def load_by_seed(pattern: str) -> dict[int, Predictions]:
    """The prediction files matching ``pattern``, by the seed their names carry."""
    found: dict[int, Predictions] = {}
    for path in sorted(glob.glob(pattern)):
        match = SEED_IN_NAME.search(Path(path).name)
        if match is None:
            raise ValueError(f"{path}: the file name carries no seed (seed<N>)")
        seed = int(match.group(1))
        if seed in found:
            raise ValueError(f"{pattern} matches two files of seed {seed}: give a pattern that picks one row")
        with np.load(path) as saved:
            found[seed] = Predictions(saved["labels"], saved["probs"])
    if not found:
        raise ValueError(f"no prediction files match {pattern}")
    return found


@dataclass(frozen=True)
class Summary:
    """Mean, sd and 95 % t interval of one quantity over the seeds (sd and interval need two)."""

    mean: float
    sd: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        x = np.asarray(values, dtype=float)
        if len(x) < 2:
            return cls(float(x.mean()), float("nan"), float("nan"), float("nan"))
        sd = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(x) - 1)) * sd / np.sqrt(len(x))
        return cls(float(x.mean()), sd, float(x.mean()) - half, float(x.mean()) + half)

    def __str__(self) -> str:
        if np.isnan(self.sd):
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.sd:.4f} [{self.low:.4f}, {self.high:.4f}]"


def pair(a: dict[int, Predictions], b: dict[int, Predictions], n_resamples: int = 1000) -> list[str]:
    """The comparison of A with B on their common seeds, as printable lines."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common: A has {sorted(a)}, B has {sorted(b)}")
    for seed in seeds:
        if not np.array_equal(a[seed].labels, b[seed].labels):
            raise ValueError(f"seed {seed}: A and B were not scored on the same test stays in the same order")
    lines = [f"seeds {seeds} ({len(a[seeds[0]].labels)} test stays)"]
    for metric in ("auroc", "auprc"):
        name = metric.upper()
        va = [METRICS[metric](a[s].labels, a[s].probs) for s in seeds]
        vb = [METRICS[metric](b[s].labels, b[s].probs) for s in seeds]
        for seed, x, y in zip(seeds, va, vb, strict=True):
            d = paired_bootstrap_difference(metric, a[seed].labels, [a[seed].probs], [b[seed].probs], n_resamples)
            lines.append(
                f"  seed {seed}: {name} A {x:.4f}  B {y:.4f}  A/B {x / y:.3f}  "
                f"A-B {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
            )
        lines.append(f"  {name} A: {Summary.of(va)}")
        lines.append(f"  {name} B: {Summary.of(vb)}")
        lines.append(f"  {name} A/B over the seeds: {Summary.of([x / y for x, y in zip(va, vb, strict=True)])}")
        lines.append(f"  {name} A-B over the seeds: {Summary.of([x - y for x, y in zip(va, vb, strict=True)])}")
        if all(np.array_equal(a[s].labels, a[seeds[0]].labels) for s in seeds):
            d = paired_bootstrap_difference(
                metric, a[seeds[0]].labels, [a[s].probs for s in seeds], [b[s].probs for s in seeds], n_resamples
            )
            lines.append(f"  {name} A-B seed-averaged, paired bootstrap: {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="glob of model A's prediction files (one per seed)")
    parser.add_argument("b", help="glob of model B's prediction files (one per seed)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = parser.parse_args(argv)
    try:
        lines = pair(load_by_seed(args.a), load_by_seed(args.b), args.bootstrap)
    except ValueError as error:
        print(f"bench/pair_predictions.py: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
